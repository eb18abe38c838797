"""Figures of a scan, attention sinks and weight outliers (seaborn on matplotlib Figures; no pyplot state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from outliers.analysis.criteria import Criteria, per_dim
from outliers.analysis.stats import HIST_EDGES, OutlierStats, SpaceStat, Stat

if TYPE_CHECKING:
    from outliers.analysis.sinks import SinkResult
    from outliers.analysis.weights import WeightHistogram, WeightStats

__all__ = [
    "layer_dim_heatmap",
    "layers_vs_positions",
    "magnitude_histogram",
    "kurtosis_by_block",
    "sink_heatmap",
    "sink_norms",
    "weight_layers",
    "weight_reconstructions",
]


def layer_dim_heatmap(stats: OutlierStats, space: str = "hidden", top: int = 24) -> Figure:
    """Blocks x the ``top`` dims by max |x|: each cell the block's largest |x| in that dim."""
    pts = [p for p in stats.points if p.space == space]
    layers = sorted({p.layer for p in pts})
    absmax = torch.stack(
        [
            torch.stack([stats.get(p.name, Stat.ABSMAX).cpu() for p in pts if p.layer == layer]).amax(0)
            for layer in layers
        ]
    )  # (blocks, dims)
    dims = absmax.amax(0).topk(min(top, absmax.shape[1])).indices.sort().values
    df = pd.DataFrame(absmax[:, dims].numpy(), index=layers, columns=dims.tolist())
    fig = Figure(figsize=(max(6, 0.32 * len(dims) + 2), max(4, 0.22 * len(layers) + 1.5)), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(
        df,
        ax=ax,
        cmap="magma",
        norm=LogNorm(vmin=max(df.values.min(), 1e-2), vmax=df.values.max()),
        cbar_kws={"label": "max |x|"},
    )
    ax.set(
        xlabel="feature dim",
        ylabel="block",
        title=f"{stats.meta.get('model', '')} {space} inputs: max |x| per block, top {len(dims)} dims",
    )
    return fig


def layers_vs_positions(stats: OutlierStats, criteria: Criteria | None = None) -> Figure:
    """Every dim of the space: % of layers against % of positions, the criteria as dashed lines."""
    criteria = criteria or Criteria()
    df = per_dim(stats, criteria)
    df = df.assign(outlier=(df.pct_layers >= 100 * criteria.layers) & (df.pct_positions >= 100 * criteria.positions))
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    sns.scatterplot(
        df,
        x="pct_layers",
        y="pct_positions",
        hue="outlier",
        size="max_abs",
        ax=ax,
        palette={False: "tab:gray", True: "tab:red"},
        sizes=(10, 200),
        alpha=0.7,
    )
    ax.axvline(100 * criteria.layers, ls="--", c="k", lw=0.8)
    ax.axhline(100 * criteria.positions, ls="--", c="k", lw=0.8)
    for _, r in df[df.outlier].iterrows():
        ax.annotate(
            str(int(r.dim)), (r.pct_layers, r.pct_positions), fontsize=8, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(0, 110)
    ax.set_xlim(-2, 102)
    ax.set(
        xlabel="% of layers where the dim reaches the threshold",
        ylabel="% of token positions",
        title=f"{stats.meta.get('model', '')} {criteria.space} dims ({criteria.scale} criterion)",
    )
    return fig


def magnitude_histogram(stats: OutlierStats, space: str = "hidden") -> Figure:
    """Counts of |x| over the space's capture points (log scale), the threshold marked."""
    counts = stats.get_space(space, SpaceStat.HIST).cpu().numpy()
    centers = ((HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2).numpy()
    last = int(np.nonzero(counts)[0].max()) + 1 if counts.any() else len(counts)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(centers[:last], counts[:last], width=float(HIST_EDGES[1] - HIST_EDGES[0]), color="tab:blue")
    ax.axvline(stats.threshold, c="tab:red", ls="--", label=f"threshold {stats.threshold:g}")
    ax.set_yscale("log")
    ax.set(
        xlabel="|x| (last bin: everything above)",
        ylabel="values",
        title=f"{stats.meta.get('model', '')} {space} inputs: magnitude histogram",
    )
    ax.legend()
    return fig


def kurtosis_by_block(stats: OutlierStats) -> Figure:
    """Token kurtosis per block and kind of point (log scale) and, where scanned, the block outputs' ∞-norm."""
    from outliers.analysis.moments import moments_table

    df = moments_table(stats)
    res = df[df.kind == "residual"]
    fig = Figure(figsize=(15 if len(res) else 6, 4), layout="constrained")
    axes = fig.subplots(1, 3 if len(res) else 1, squeeze=False)[0]
    sns.lineplot(df, x="layer", y="token_kurtosis", hue="kind", marker="o", ax=axes[0])
    axes[0].axhline(3, color="grey", lw=0.8, ls="--")  # a normal distribution's
    axes[0].set(yscale="log", xlabel="block", ylabel="token kurtosis (normal = 3)", title="per token, across dims")
    if len(res):
        sns.lineplot(res, x="layer", y="inf_norm", marker="o", ax=axes[1], color="C3")
        axes[1].set(yscale="log", xlabel="block", ylabel="∞-norm", title="block outputs: max |x| per sequence")
        sns.lineplot(res, x="layer", y="seq_kurtosis", marker="s", ax=axes[2], color="C0")
        axes[2].set(yscale="log", xlabel="block", ylabel="kurtosis", title="block outputs: kurtosis per sequence")
    return fig


def sink_heatmap(result: SinkResult) -> Figure:
    """Layers x heads: each head's mean attention to the first token (Gu et al. 2024), local layers marked."""
    grid = result.heads.pivot(index="layer", columns="head", values="score")
    local = sorted(set(result.heads[result.heads.local].layer))
    fig = Figure(figsize=(max(5, 0.4 * grid.shape[1] + 2.5), max(4, 0.25 * grid.shape[0] + 1.5)), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0, vmax=1, cbar_kws={"label": "mean attention to first token"})
    ax.set_yticks(np.arange(len(grid.index)) + 0.5, [f"{i}*" if i in local else str(i) for i in grid.index])
    ax.set(
        xlabel="head",
        ylabel="layer" + (" (* local: window shorter than the analysis window)" if local else ""),
        title=f"{result.meta.get('model', '')} attention sinks: sink rate {result.sink_rate:.1%} "
        f"(score > {result.epsilon:g})",
    )
    return fig


def sink_norms(result: SinkResult) -> Figure:
    """Per block: the mean L2 norm of the first token's hidden state beside that of the other tokens."""
    df = result.norms.melt("layer", var_name="token", value_name="norm")
    df["token"] = df.token.map({"first_token_norm": "first token", "other_tokens_norm": "other tokens"})
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(df, x="layer", y="norm", hue="token", marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set(
        xlabel="block",
        ylabel="mean L2 norm of the block output",
        title=f"{result.meta.get('model', '')} hidden-state norms: first token vs the others",
    )
    return fig


def weight_layers(result: WeightStats) -> Figure:
    """Per block and kind of linear: the largest |w| and the kurtosis of the weights (log scales)."""
    df = result.layers.dropna(subset=["block"]).astype({"block": int})  # linears outside blocks have no x
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, column, label in ((axes[0], "max_abs", "max |w|"), (axes[1], "kurtosis", "kurtosis (normal = 3)")):
        sns.lineplot(df, x="block", y=column, hue="kind", marker="o", ax=ax, legend=ax is axes[1])
        ax.set_yscale("log")
        ax.set(xlabel="block", ylabel=label)
    axes[1].axhline(3, c="k", ls="--", lw=0.8)
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), title="linear")
    fig.suptitle(f"{result.meta.get('model', '')} weights of the linears quantize_model replaces")
    return fig


def weight_reconstructions(hist: WeightHistogram) -> Figure:
    """One layer's weights beside their int8 reconstructions: counts over shared bins, log scale so tails show."""
    fig = Figure(figsize=(8, 2.2 * len(hist.counts) + 0.6), layout="constrained")
    axes = fig.subplots(len(hist.counts), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    palette = sns.color_palette("tab10", len(hist.counts))
    for ax, color, (series, counts) in zip(axes, palette, hist.counts.items(), strict=True):
        ax.stairs(counts, hist.edges, fill=True, color=color)
        ax.set_yscale("log")
        title = "original W"
        if series in hist.codes_used:
            title = f"{series} int8: {hist.codes_used[series]} codes used, ‖W − Ŵ‖/‖W‖ = {hist.rel_err[series]:.2%}"
        ax.set(ylabel="weights", title=title)
    axes[-1].set_xlabel("w")
    fig.suptitle(f"{hist.meta.get('model', '')} {hist.name}")
    return fig
