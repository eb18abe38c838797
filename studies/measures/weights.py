"""Weight outliers: per model, how heavy the tails of the quantizable weights are and what int8 costs them.

One run of ``outliers.analysis.weights`` per (model, corpus) over every
linear layer ``quantize_model`` replaces: the largest |w| and its layer, the
mean and largest Pearson kurtosis over layers (normal = 3), the share of all
weights beyond 6 σ of their layer, and the mean relative reconstruction error
‖W − Ŵ‖_F / ‖W‖_F over layers of int8 absmax and zeropoint (one statistic per
tensor) and absmax per output channel. The corpus is not read: a model's
rows for different corpora hold the same numbers.

It takes no settings, so the ``study.json`` and report of a study that does
not take this measure stay as they were; the result lives in the row's JSON
(no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import Context, Measure, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["WEIGHTS", "weight_table"]

_SUMMARY = (
    *("n_layers", "n_weights", "max_abs", "max_abs_layer", "mean_kurtosis", "max_kurtosis", "max_kurtosis_layer"),
    *("beyond_6sigma", "layers_beyond_6sigma"),
)


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.weights import weight_stats

    res = weight_stats(ctx.model, progress=ctx.progress)
    s = res.summary()
    return {
        "n_params": ctx.info.n_params,
        "weights": ctx.info.weights,
        "methods": list(res.methods),
        "skipped": res.skipped,
        **{k: s[k] for k in _SUMMARY},
        "mean_rel_err": {m: s[f"mean_rel_err_{m.replace('-', '_')}"] for m in res.methods},
        "max_rel_err": {m: s[f"max_rel_err_{m.replace('-', '_')}"] for m in res.methods},
    }


def weight_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): max |w|, kurtosis, the share beyond 6 σ, mean int8 error per method."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "weights") & (df.status == "done")].itertuples():
        res = r.result
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "layers": res["n_layers"],
                "max |w|": res["max_abs"],
                "at": res["max_abs_layer"],
                "mean kurtosis": res["mean_kurtosis"],
                "max kurtosis": res["max_kurtosis"],
                "beyond 6σ (%)": 100 * res["beyond_6sigma"],
                **{f"{m} error (%)": 100 * e for m, e in res["mean_rel_err"].items()},
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The weight-outlier table."""
    if not (df.kind == "weights").any():
        return ["No weight-outlier measurement is done yet.", ""]
    return [
        "## Weight outliers (the linears quantize_model replaces; kurtosis is Pearson's, normal = 3)",
        "",
        "Per model: the largest |w| over layers and its layer, the mean and largest kurtosis over layers, the "
        "share of all weights beyond 6 σ of their layer, and per int8 method the relative reconstruction error "
        "‖W − Ŵ‖_F / ‖W‖_F averaged over layers (absmax and zeropoint: one statistic per tensor; absmax-channel: "
        "one per output channel). The weights are as loaded: a GGUF model's are its dequantized 4-bit values.",
        "",
        Table(weight_table(df), "weights", ".3f"),
        "",
    ]


WEIGHTS = register_measure(Measure(name="weights", compute=compute, report=report))
