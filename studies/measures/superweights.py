"""Super weights: how many a model has, where the first one is, and what zeroing them does to perplexity.

Yu et al. 2024 ("The Super Weight in Large Language Models", arXiv
2411.07191): one run of ``outliers.analysis.superweights`` per (model,
corpus), detection on 2 windows of the study's ``window``, then
``outliers.analysis.superweight_effects`` on ``superweight_windows`` windows:
the original perplexity, the super weights zeroed, zeroed with the super
activation restored, and the ``superweight_control_k`` largest other
down-projection weights zeroed, each as a ratio to the original.

Its settings default to None (meaning 4 windows and k = 7000, the paper's),
so that the ``study.json`` and report of a study that does not take this
measure stay as they were; the result lives in the row's JSON (no new store
column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["SUPERWEIGHTS", "superweight_table"]

WINDOWS, CONTROL_K, DETECT_WINDOWS = 4, 7000, 2
SETTINGS = (
    Setting("superweight_windows", (int,), None),  # None: WINDOWS windows of the study's window
    Setting("superweight_control_k", (int,), None),  # None: CONTROL_K (the paper's control)
)


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.superweight_windows is None else int(cfg.superweight_windows)


def _control_k(cfg: StudyConfig) -> int:
    return CONTROL_K if cfg.superweight_control_k is None else int(cfg.superweight_control_k)


def validate(cfg: StudyConfig) -> None:
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"superweight_windows must be >= 1, got {cfg.superweight_windows}")
    if _control_k(cfg) < 0:
        raise InvalidArgumentError(f"superweight_control_k must be >= 0, got {cfg.superweight_control_k}")


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {
        "superweight_windows": _windows(cfg),
        "superweight_control_k": _control_k(cfg),
        "batch_size": cfg.batch_size,
    }


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.superweight_effects import super_weight_effects
    from outliers.analysis.superweights import super_weights

    cfg = ctx.cfg
    found = super_weights(ctx.model, ctx.ids, window=cfg.window, max_windows=DETECT_WINDOWS, batch_size=cfg.batch_size)
    eff = super_weight_effects(
        ctx.model,
        ctx.ids,
        found.weights,
        window=cfg.window,
        max_windows=_windows(cfg),
        batch_size=cfg.batch_size,
        control_k=_control_k(cfg),
        progress=ctx.progress,
    )
    d = eff.to_dict()
    first = found.weights[0] if found.weights else None

    def ratio(name: str) -> float | None:
        return d[f"ppl_{name}"] / d["ppl"] if d[f"ppl_{name}"] is not None else None

    return {
        "n_params": ctx.info.n_params,
        "n_tokens": eff.original.n_tokens,
        "n_super_weights": len(found.weights),
        "first": {k: getattr(first, k) for k in ("block", "row", "col", "value", "massive")} if first else None,
        "stop": found.stop,
        "window": cfg.window,
        "n_windows": eff.original.n_windows,
        **{k: d[k] for k in ("ppl", "ppl_zeroed", "ppl_restored", "ppl_control", "control_k")},
        "ratio_zeroed": ratio("zeroed"),
        "ratio_restored": ratio("restored"),
        "ratio_control": ratio("control"),
    }


def superweight_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): the super weights' count, the first one's place, the perplexity ratios."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "superweights") & (df.status == "done")].itertuples():
        res, first = r.result, r.result["first"]
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "super weights": res["n_super_weights"],
                "first (block, row, col)": f"{first['block']}, {first['row']}, {first['col']}" if first else "none",
                "ppl": res["ppl"],
                "zeroed / ppl": res["ratio_zeroed"],
                "restored / ppl": res["ratio_restored"],
                f"control ({res['control_k']}) / ppl": res["ratio_control"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The super-weight table."""
    if not (df.kind == "superweights").any():
        return ["No super-weight measurement is done yet.", ""]
    return [
        "## Super weights (Yu et al. 2024: single down-projection weights whose zeroing breaks the model)",
        "",
        f"Detection on {DETECT_WINDOWS} windows, perplexities on {_windows(cfg)} windows of {cfg.window} tokens: "
        "the original, the super weights zeroed, zeroed with the super activation restored, and the "
        f"{_control_k(cfg)} largest other down-projection weights zeroed (ratios to the original).",
        "",
        Table(superweight_table(df), "superweights", ".3f"),
        "",
    ]


SUPERWEIGHTS = register_measure(
    Measure(
        name="superweights",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
