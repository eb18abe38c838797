"""Figures of key-cache channels (``outliers.analysis.kvcache``): matplotlib Figures, no pyplot state."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from outliers.errors import InvalidArgumentError

if TYPE_CHECKING:
    from outliers.analysis.kvcache import KVCacheResult

__all__ = ["kv_heatmap", "kv_concentration", "LABELS"]

LABELS = {
    "keys": "keys, projected (pre-RoPE)",
    "keys_normed": "keys after the key norm (pre-RoPE)",
    "keys_cached": "keys as cached (post-RoPE)",
    "values": "values",
}


def kv_heatmap(result: KVCacheResult, kind: str = "keys") -> Figure:
    """Layers x channels (kv_head * head_dim + dim): each channel's max |x|, log colour, heads split by lines.

    Raises:
        InvalidArgumentError: a kind the result does not hold.
    """
    rows = result.channels[result.channels.kind == kind]
    if rows.empty:
        have = ", ".join(sorted(set(result.channels.kind)))
        raise InvalidArgumentError(f"no {kind!r} channels in this result; it has {have}")
    grid = rows.pivot(index="layer", columns="channel", values="absmax")
    values = grid.to_numpy()
    positive = values[values > 0]
    lo, hi = (float(positive.min()), float(positive.max())) if positive.size else (1e-6, 1.0)
    fig = Figure(figsize=(min(18, max(7, 0.03 * grid.shape[1] + 4)), max(4, 0.22 * len(grid) + 1.5)))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    sns.heatmap(
        grid.clip(lower=lo),
        ax=ax,
        cmap="magma",
        norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.01)),
        xticklabels=False,
        cbar_kws={"label": "max |x| over tokens"},
    )
    heads = np.arange(result.head_dim, grid.shape[1], result.head_dim)
    for x in heads:
        ax.axvline(x, color="white", lw=0.6, alpha=0.7)
    ax.set_xticks(np.arange(0, grid.shape[1], result.head_dim) + result.head_dim / 2)
    ax.set_xticklabels([f"h{h}" for h in range(grid.shape[1] // result.head_dim)])
    outliers = rows.groupby("layer").outlier.sum()
    ax.set(
        xlabel=f"channel, by kv head ({result.head_dim} dims each)",
        ylabel="layer",
        title=f"{result.meta.get('model', '')} {LABELS.get(kind, kind)}: "
        f"{int((outliers > 0).sum())} of {len(outliers)} layers with outlier channels (>= {result.k:g} x median)",
    )
    return fig


def kv_concentration(result: KVCacheResult) -> Figure:
    """Per layer and kind: the top channel's max |x| over the median channel's (log scale), k marked."""
    df = result.layers.assign(kind=result.layers.kind.map(lambda k: LABELS.get(k, k)))
    fig = Figure(figsize=(8, 4.5))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    sns.lineplot(df, x="layer", y="concentration", hue="kind", marker="o", ax=ax)
    ax.axhline(result.k, color="grey", ls="--", lw=1, label=f"k = {result.k:g}")
    ax.set_yscale("log")
    ax.legend()
    ax.set(
        xlabel="layer",
        ylabel="top channel max / median channel max",
        title=f"{result.meta.get('model', '')} channel concentration of keys and values",
    )
    return fig
