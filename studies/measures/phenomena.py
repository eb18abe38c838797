"""The phenomena found since LLM.int8(), per model, beside the outlier-feature emergence.

The scale study asks how each of them moves with parameters: outlier feature dims
(Dettmers et al. 2022), the block outputs' max ∞-norm and mean kurtosis
(Bondarenko et al. 2023), massive activations (Sun et al. 2024), the attention
sink rate (Gu et al. 2024) and super weights (Yu et al. 2024). Each comes from
its own measure's rows (``outliers``, ``sinks``, ``superweights``); a model
lacks a column where the study did not take that measure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["phenomena_table", "phenomena_figure"]

_PANELS = (
    ("outlier dims", "outlier feature dims (|x| >= t)"),
    ("max ∞-norm", "block outputs' max ∞-norm"),
    ("mean kurtosis", "block outputs' mean kurtosis"),
    ("sink rate", "attention sink rate"),
    ("super weights", "super weights"),
)


def phenomena_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus) with a done outlier scan: every phenomenon the study measured."""
    done = df[df.status == "done"]
    rows = []
    for r in done[done.kind == "outliers"].itertuples():
        m = r.result.get("moments") or {}
        row = {
            "model": r.model,
            "corpus": r.corpus,
            "params (M)": r.result["n_params"] / 1e6,
            "outlier dims": r.result["absolute"]["outlier_dims"],
            "max ∞-norm": m.get("max_inf_norm"),
            "mean kurtosis": m.get("avg_kurtosis"),
            "massive activations": r.result.get("massive_activations"),
        }
        same = done[(done.model == r.model) & (done.corpus == r.corpus)]
        sinks, supers = same[same.kind == "sinks"], same[same.kind == "superweights"]
        if len(sinks):
            row["sink rate"] = sinks.result.iloc[-1]["sink_rate"]
        if len(supers):
            sw = supers.result.iloc[-1]
            row["super weights"] = sw["n_super_weights"]
            row["zeroed / ppl"] = sw["ratio_zeroed"]
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]).reset_index(drop=True) if rows else pd.DataFrame()


def phenomena_figure(table: pd.DataFrame) -> Figure:
    """One panel per phenomenon the table holds, against parameters (log)."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    panels = [(col, title) for col, title in _PANELS if col in table and table[col].notna().any()]
    fig = Figure(figsize=(3.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (col, title) in zip(axes, panels, strict=True):
        sns.lineplot(table, x="params (M)", y=col, hue="corpus", marker="o", ax=ax, legend=ax is axes[0])
        for _, r in table.iterrows():
            name = str(r["model"]).rstrip("/").rsplit("/", 1)[-1]  # a local folder: its last part
            ax.annotate(name, (r["params (M)"], r[col]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        log = col in ("max ∞-norm", "mean kurtosis")
        ax.set(xscale="log", yscale="log" if log else "linear", title=title, ylabel="")
        ticks = sorted(table["params (M)"].unique())  # the models' own sizes: log minor labels overlap
        ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
    return fig
