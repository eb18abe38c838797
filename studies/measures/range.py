"""Number-format headroom: per model, how far its activations sit from float16's and bfloat16's range, what FP8
loses below its smallest subnormal, and whether an emulated float16 run stays finite.

One run of ``outliers.analysis.range`` per (model, corpus) over ``range_windows`` windows of the study's
``window``, every capture point (``attn_in``, ``attn_out``, ``ffn_in``, ``down_in``, ``residual``); the
result keeps the first point past each format's range, the largest |x| and where, the pooled underflow
shares (of nonzero values), the emulated float16 run's first non-finite tensor and perplexity, and the
per-point table (``docs/range.md``).

Its setting defaults to None (meaning 4 windows), so that the ``study.json`` and report of a study that
does not take this measure stay as they were; the result lives in the row's JSON (no new store column
beside ``n_tokens``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["RANGE", "range_table"]

WINDOWS = 4
SETTINGS = (Setting("range_windows", (int,), None),)  # None: WINDOWS windows of the study's window


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.range_windows is None else int(cfg.range_windows)


def validate(cfg: StudyConfig) -> None:
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"range_windows must be >= 1, got {cfg.range_windows}")


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"range_windows": _windows(cfg), "batch_size": cfg.batch_size}


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.range import format_headroom
    from outliers.eval.windows import PerplexitySettings

    cfg = ctx.cfg
    settings = PerplexitySettings("chunks", cfg.window, None, _windows(cfg), cfg.batch_size, cfg.bos)
    res = format_headroom(ctx.model, ctx.ids, settings, bos_token_id=ctx.bos_token_id, progress=ctx.progress)
    return {"n_params": ctx.info.n_params, **res.to_dict()}


def _where(loc: dict[str, Any] | None) -> str:
    if loc is None:
        return "none"
    return f"{'head' if loc['block'] is None else loc['block']}, {loc['tensor']}"


def range_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): the largest |x|, the first overflow per format, underflow shares (%),
    and the emulated float16 run."""
    import math

    import pandas as pd

    rows = []
    for r in df[(df.kind == "range") & (df.status == "done")].itertuples():
        res = r.result
        s, emu = res["summary"], res["emulated_float16"]
        top = s["max_abs"]
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "max |x|": top["value"],
                "at": top["point"],
                "fp16 margin (bits)": math.log2(res["formats"]["float16"]["max"] / top["value"]),
                "first past fp16": _where(res["first_overflow"]["float16"]),
                "first past bf16": _where(res["first_overflow"]["bfloat16"]),
                "below fp16 normal (%)": 100 * s["below_float16_normal"],
                "E4M3 tensor (%)": 100 * s["e4m3_tensor"],
                "E4M3 token (%)": 100 * s["e4m3_token"],
                "E5M2 tensor (%)": 100 * s["e5m2_tensor"],
                "E5M2 token (%)": 100 * s["e5m2_token"],
                "emulated fp16": "clean" if emu["clean"] else f"inf at {_where(emu['first_nonfinite'])}",
                "emulated ppl": emu["ppl"] if emu["ppl"] is not None else math.inf,
                "ppl": res["ppl"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The number-format headroom table."""
    if not (df.kind == "range").any():
        return ["No number-format headroom is measured yet.", ""]
    return [
        "## Number-format headroom (float16, bfloat16, FP8)",
        "",
        f"{_windows(cfg)} windows of {cfg.window} tokens per model and corpus, bos {cfg.bos}, every capture point "
        "(attn_in, attn_out, ffn_in, down_in, residual). fp16 margin: log2(65504 / max |x|), negative past "
        "float16's range; first past: the first (block, tensor) in forward order whose max |x| exceeds the "
        "format's largest finite value. Shares are of nonzero values: below float16's smallest normal, and "
        "below FP8's smallest subnormal with max |x| scaled to the format's max, one scale per (point, window) "
        "or per token. Emulated fp16: every block linear's input, the head's input and every block output "
        "rounded to float16, arithmetic in float32. The weights are as loaded: a GGUF model's are its "
        "dequantized 4-bit values.",
        "",
        Table(range_table(df), "range", ".3g"),
        "",
    ]


RANGE = register_measure(
    Measure(
        name="range",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
