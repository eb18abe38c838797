"""Key-value cache quantization: what quantizing the cache costs, per format, pairing and tokens kept in float.

One cell per (model, corpus, cache format, kept tokens): the model's keys (after
RoPE, as cached) and values quantized inside attention in the one forward pass
that scores each window (``outliers.quant.kv_cache``; a row of kind
``"kv-cache"``, ``outliers.eval.kv_rows``), scored against the float model on
the same windows: perplexity, its paired change, KL and top-1 agreement with
their intervals. Formats are spelled as ``outliers eval --kv-cache`` takes
them (``int4-kivi``, ``int8-token``, ``int2-channel-g64``); a cell's method is
the format and its kept tokens, ``int4-kivi+keep4``.

Its settings default to None (the nine int8/int4/int2 × token/channel/kivi
formats, keep 0 and 4, 8 windows of the study's window), so that the
``study.json`` and report of a study that does not take this measure stay as
they were; the result lives in the row's JSON beside the ``ppl`` and
``n_tokens`` columns.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Image, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from studies.config import StudyConfig

__all__ = ["KV_QUANT", "kv_quant_table", "kv_quant_figure", "cell_method", "parse_cell_method"]

SPECS = tuple(f"int{b}-{m}" for b in (8, 4, 2) for m in ("token", "channel", "kivi"))
KEEP, WINDOWS = (0, 4), 8
SETTINGS = (
    Setting("kv_quant_specs", (list,), None, items=(str,)),  # None: SPECS
    Setting("kv_quant_keep", (list,), None, items=(int,)),  # None: KEEP
    Setting("kv_quant_windows", (int,), None),  # None: WINDOWS windows of the study's window
)
_METHOD = re.compile(r"(?P<spec>\S+)\+keep(?P<keep>\d+)")


def _specs(cfg: StudyConfig) -> tuple[str, ...]:
    return SPECS if cfg.kv_quant_specs is None else tuple(cfg.kv_quant_specs)


def _keep(cfg: StudyConfig) -> tuple[int, ...]:
    return KEEP if cfg.kv_quant_keep is None else tuple(cfg.kv_quant_keep)


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.kv_quant_windows is None else int(cfg.kv_quant_windows)


def cell_method(spec: str, keep: int) -> str:
    """A cell's method: the format's canonical spelling and the kept tokens, ``int4-kivi+keep4``."""
    from outliers.quant.kv_spec import parse_kv_spec

    return f"{parse_kv_spec(spec).name}+keep{keep}"


def parse_cell_method(method: str) -> tuple[str, int]:
    """``int4-kivi+keep4`` -> ``("int4-kivi", 4)``."""
    m = _METHOD.fullmatch(method)
    if m is None:
        raise InvalidArgumentError(f"not a kv_quant cell method: {method!r}")
    return m["spec"], int(m["keep"])


def validate(cfg: StudyConfig) -> None:
    from outliers.quant.kv_spec import parse_kv_specs

    if not _specs(cfg):
        raise InvalidArgumentError("kv_quant_specs must name at least one cache format")
    parse_kv_specs(",".join(_specs(cfg)))  # a bad or repeated format, named
    if not _keep(cfg) or any(k < 0 for k in _keep(cfg)) or len(set(_keep(cfg))) < len(_keep(cfg)):
        raise InvalidArgumentError(f"kv_quant_keep must list distinct token counts >= 0, got {list(_keep(cfg))}")
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"kv_quant_windows must be >= 1, got {cfg.kv_quant_windows}")


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    return [{"method": cell_method(s, k), "threshold": None} for k in _keep(cfg) for s in _specs(cfg)]


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"kv_quant_windows": _windows(cfg), "window": cfg.window, "batch_size": cfg.batch_size}


def _evaluator(cell: dict[str, Any], ctx: Context) -> Any:
    """The row evaluator of this (model, corpus): the float model's states are kept for every cell."""
    from outliers.eval.rows import RowEvaluator
    from outliers.eval.windows import PerplexitySettings

    ev = ctx.cache.get("rows")
    if ev is None:
        cfg = ctx.cfg
        ev = ctx.cache["rows"] = RowEvaluator(
            ctx.model,
            ctx.ids,
            PerplexitySettings("chunks", cfg.window, None, _windows(cfg), cfg.batch_size, cfg.bos),
            bos_token_id=ctx.bos_token_id,
            model_name=cell["model"],
            corpus_name=cell["corpus"],
        )
    ev.progress = ctx.progress
    return ev


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.eval.kv_rows import KV_CACHE
    from outliers.eval.rows import Row

    spec, keep = parse_cell_method(cell["method"])
    row = Row(kind=KV_CACHE, options={"kv_cache": spec, "kv_keep": keep, "kv_rotate": False})
    r = _evaluator(cell, ctx).evaluate(row).result
    if not math.isfinite(r.ppl):
        raise FloatingPointError(f"perplexity is {r.ppl} (mean NLL {r.nll})")
    return {"n_params": ctx.info.n_params, **r.to_dict()}


_PAIRING = {
    "token": "token (k, v per token)",
    "channel": "channel (k, v per channel)",
    "kivi": "kivi (k channel, v token)",
}


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for r in df[(df.kind == "kv_quant") & (df.status == "done")].itertuples():
        res = r.result
        x = res["extra"]
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "cache": x["kv_cache"],
                "bits": x["kv_bits"],
                "pairing": x["kv_cache"].split("-")[1],
                "kept": x["kv_keep"],
                "ppl": res["ppl"],
                "vs fp32 (%)": res["delta_ppl_pct"],
                "ci": res["delta_ppl_pct_ci95"],
                "KL": res["kl_vs_ref"],
                "top-1 (%)": 100 * res["top1_agreement"],
                "windows": res["n_windows"],
            }
        )
    return pd.DataFrame(rows)


def kv_quant_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus, cache format, kept tokens): perplexity, its paired change against fp32 with the
    interval, KL and top-1 agreement."""
    rows = _rows(df)
    if not len(rows):
        return rows
    ci = rows.pop("ci")
    rows.insert(rows.columns.get_loc("vs fp32 (%)") + 1, "95 % CI", [_interval(c) for c in ci])
    order = rows.assign(_p=rows.pairing.map(list(_PAIRING).index))
    return order.sort_values(["params (M)", "corpus", "kept", "_p", "bits"], ascending=[True, True, True, True, False])[
        list(rows.columns)
    ]


def _interval(ci: Any) -> str:
    return "" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def kv_quant_figure(df: pd.DataFrame) -> Figure:
    """KL against the cache's bits, one panel per model (and corpus), one line per pairing, solid with no
    tokens kept in float and dashed with them."""
    from matplotlib.figure import Figure

    rows = _rows(df)
    panels = list(dict.fromkeys(zip(rows.model, rows.corpus, strict=True)))
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = {p: f"C{i}" for i, p in enumerate(_PAIRING)}
    for ax, (model, corpus) in zip(axes, panels, strict=True):
        here = rows[(rows.model == model) & (rows.corpus == corpus)]
        for (pairing, kept), g in here.groupby(["pairing", "kept"], sort=True):
            g = g.sort_values("bits")
            ax.plot(
                g.bits,
                g.KL,
                marker="o",
                color=colours.get(str(pairing), "k"),
                linestyle="-" if kept == 0 else "--",
                label=f"{_PAIRING.get(str(pairing), pairing)}, {kept} kept",
            )
        ax.set(yscale="log", xlabel="cache bits", ylabel="KL vs fp32 (nats/token)", title=f"{model} · {corpus}")
        ax.set_xticks(sorted(set(rows.bits)))
        ax.legend(fontsize=7)
    return fig


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The cache-quantization table and the KL-against-bits figure."""
    if not (df.kind == "kv_quant").any():
        return ["No key-value cache quantization is measured yet.", ""]
    table = kv_quant_table(df)
    parts: list = [
        "## Key-value cache quantization (token, channel, KIVI; sinks kept in float)",
        "",
        f"{_windows(cfg)} windows of {cfg.window} tokens per model and corpus, chunks, bos {cfg.bos}. Keys after "
        "RoPE (as cached) and values quantized inside attention in the forward that scores the window, asymmetric "
        "min-max: per token (over the head dim), per channel over complete groups of tokens (default 32; a "
        "query's incomplete group stays in float), or KIVI's pairing (keys per channel, values per token); the "
        "first `kept` tokens stay in float (docs/kvcache_quant.md). Against fp32 on the same windows: perplexity "
        "change with its paired 95 % interval, KL (nats/token) and top-1 agreement.",
        "",
        Table(table, "kv_quant", ".4g"),
        "",
    ]
    if len(table) and table.bits.nunique() > 1:
        parts += [Image(kv_quant_figure(df), "kv_quant.png", "KL against cache bits"), ""]
    return parts


KV_QUANT = register_measure(
    Measure(
        name="kv_quant",
        compute=compute,
        settings=SETTINGS,
        cells=cells,
        fingerprint=fingerprint,
        columns={"ppl": "REAL", "n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
