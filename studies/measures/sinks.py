"""Attention sinks: the share of heads that attend mostly to the first token, per model.

Gu et al. 2024 ("When Attention Sink Emerges in Language Models", arXiv
2410.10781) count a head as a sink when its mean attention to the first
token exceeds ε (0.3) and report the sink rate; Xiao et al. 2023 (arXiv
2309.17453) named the effect. One run of ``outliers.analysis.sinks`` per
(model, corpus) over ``sink_windows`` windows of the study's ``window``;
the result keeps the sink rate (local sliding-window layers left out, as
there), the rate over every head, the head counts, the most first-token-heavy
head and the largest first-token to other-token norm ratio of the block
outputs (massive activations, Sun et al. 2024, arXiv 2402.17762).

Its settings default to None (meaning ε = 0.3 and 4 windows), so that the
``study.json`` and report of a study that does not take this measure stay as
they were; the result lives in the row's JSON (no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["SINKS", "sink_table"]

EPSILON, WINDOWS = 0.3, 4
SETTINGS = (
    Setting("sink_epsilon", (int, float), None),  # None: EPSILON (Gu et al.'s default)
    Setting("sink_windows", (int,), None),  # None: WINDOWS windows of the study's window
)


def _epsilon(cfg: StudyConfig) -> float:
    return float(EPSILON if cfg.sink_epsilon is None else cfg.sink_epsilon)


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.sink_windows is None else int(cfg.sink_windows)


def validate(cfg: StudyConfig) -> None:
    if not 0 < _epsilon(cfg) < 1:
        raise InvalidArgumentError(f"sink_epsilon must be in (0, 1), got {cfg.sink_epsilon}")
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"sink_windows must be >= 1, got {cfg.sink_windows}")


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"sink_epsilon": _epsilon(cfg), "sink_windows": _windows(cfg), "batch_size": cfg.batch_size}


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.sinks import attention_sinks

    cfg = ctx.cfg
    res = attention_sinks(
        ctx.model,
        ctx.ids,
        window=cfg.window,
        max_windows=_windows(cfg),
        batch_size=cfg.batch_size,
        epsilon=_epsilon(cfg),
        bos_token_id=ctx.bos_token_id,
        progress=ctx.progress,
    )
    d = res.to_dict()
    top = res.top(1).iloc[0]
    ratio = res.norms.first_token_norm / res.norms.other_tokens_norm
    return {
        "n_params": ctx.info.n_params,
        "n_tokens": res.n_windows * res.window,
        **{k: d[k] for k in ("sink_rate", "sink_rate_all", "n_heads", "n_counted_heads", "n_sink_heads")},
        **{k: d[k] for k in ("local_layers", "epsilon", "window", "n_windows", "bos")},
        "top_head": {"layer": int(top["layer"]), "head": int(top["head"]), "score": float(top["score"])},
        "max_norm_ratio": float(ratio.max()),
        "max_norm_ratio_layer": int(res.norms.layer[ratio.idxmax()]),
    }


def sink_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): sink rate, head counts, the top head and the first-token norm ratio."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "sinks") & (df.status == "done")].itertuples():
        res = r.result
        top = res["top_head"]
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "sink rate": res["sink_rate"],
                "sink heads": f"{res['n_sink_heads']}/{res['n_counted_heads']}",
                "rate, all heads": res["sink_rate_all"],
                "top head (layer.head)": f"{top['layer']}.{top['head']} ({top['score']:.2f})",
                "max first/other norm": res["max_norm_ratio"],
                "at block": res["max_norm_ratio_layer"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The sink-rate table."""
    if not (df.kind == "sinks").any():
        return ["No attention-sink measurement is done yet.", ""]
    return [
        f"## Attention sinks (Gu et al. 2024: share of heads whose mean attention to the first token "
        f"exceeds {_epsilon(cfg):g}; local sliding-window layers left out of the rate)",
        "",
        f"{_windows(cfg)} windows of {cfg.window} tokens per model and corpus, bos {cfg.bos}. "
        "The last columns: the largest ratio over blocks of the first token's mean hidden-state norm to the "
        "other tokens' (massive activations, Sun et al. 2024).",
        "",
        Table(sink_table(df), "sinks", ".3f"),
        "",
    ]


SINKS = register_measure(
    Measure(
        name="sinks",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
