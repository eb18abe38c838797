"""Kurtosis and ∞-norm per capture point and per model: how quantizable the activations are.

Bondarenko et al. 2023 ("Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing", arXiv 2306.12929) track two numbers for
each transformer layer's output (here: the ``residual`` capture point, a
block's output): its ∞-norm and its kurtosis, taken per evaluation sequence
over all of the sequence's values (tokens x dims) and averaged over
sequences; the model's summary is the largest ∞-norm over layers and the
mean kurtosis over layers. Beside them, under its own name, the *token
kurtosis*: per token, the fourth standardized moment of its values across
the point's dims, averaged over tokens, at every capture point (the inputs
the quantizer sees). Kurtosis is Pearson's throughout (a normal
distribution has 3; a single outlier dim of size a among n ≈ 0 others gives
≈ n). The sums come from the scan itself (``OutlierStats.moments``;
``outliers.analysis.stats``), in bounded memory.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from outliers.analysis.stats import OutlierStats, PointStat, Stat
from outliers.errors import InvalidArgumentError

__all__ = ["moments_table", "layer_table", "quantizability"]

POINT_COLUMNS = [
    "point",
    "layer",
    "kind",
    "token_kurtosis",
    "token_kurtosis_max",
    "seq_kurtosis",
    "inf_norm",
    "max_abs",
    "tokens",
    "sequences",
]


def _check(stats: OutlierStats) -> None:
    if not stats.moments:
        raise InvalidArgumentError(
            "these statistics were taken without moments (a scan with moments=False, or a file saved before "
            "moments existed): scan again to get kurtosis and ∞-norms"
        )


def _ratio(total: float, n: float) -> float:
    return total / n if n else math.nan


def moments_table(stats: OutlierStats) -> pd.DataFrame:
    """Return one row per capture point: mean and largest token kurtosis, sequence kurtosis and ∞-norm.

    ``seq_kurtosis`` and ``inf_norm`` are means over sequences (Bondarenko et
    al.'s per-sequence numbers); ``max_abs`` is the largest |x| over everything
    scanned.
    """
    _check(stats)
    rows = []
    for p in stats.points:
        get = lambda s, p=p: stats.get_point(p.name, s)  # noqa: E731
        seqs = get(PointStat.SEQS)
        rows.append(
            {
                "point": p.name,
                "layer": p.layer,
                "kind": p.kind,
                "token_kurtosis": _ratio(get(PointStat.TOKEN_KURT), get(PointStat.KURT_TOKENS)),
                "token_kurtosis_max": get(PointStat.TOKEN_KURT_MAX) if get(PointStat.KURT_TOKENS) else math.nan,
                "seq_kurtosis": _ratio(get(PointStat.SEQ_KURT), seqs),
                "inf_norm": _ratio(get(PointStat.SEQ_INF), seqs),
                "max_abs": float(stats.get(p.name, Stat.ABSMAX).max()),
                "tokens": stats.tokens[p.name],
                "sequences": int(seqs),
            }
        )
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def layer_table(stats: OutlierStats) -> pd.DataFrame:
    """Return one row per block: the token kurtosis of each kind of point, the down projection's largest
    input where ``down_in`` was scanned, and the block output's sequence kurtosis and ∞-norm where the
    residual stream was."""
    df = moments_table(stats)
    out = df.pivot(index="layer", columns="kind", values="token_kurtosis")
    out.columns = [f"{k} token kurtosis" for k in out.columns]
    down = df[df.kind == "down_in"].set_index("layer")
    if len(down):
        out["down_in max |x|"] = down.max_abs
    res = df[df.kind == "residual"].set_index("layer")
    if len(res):
        out["output kurtosis"] = res.seq_kurtosis
        out["output ∞-norm"] = res.inf_norm
    return out.reset_index()


def quantizability(stats: OutlierStats) -> dict[str, Any]:
    """Return the model's summary: Bondarenko et al.'s max ∞-norm and mean kurtosis of the block outputs
    (None where the residual stream was not scanned) and the mean token kurtosis of each kind of point."""
    df = moments_table(stats)
    res = df[df.kind == "residual"]
    out: dict[str, Any] = {"max_inf_norm": None, "max_inf_norm_layer": None, "avg_kurtosis": None, "layers": len(res)}
    if len(res) and res.inf_norm.notna().any():
        top = res.loc[res.inf_norm.idxmax()]
        out.update(
            max_inf_norm=float(top.inf_norm),
            max_inf_norm_layer=int(top.layer),
            avg_kurtosis=float(res.seq_kurtosis.mean()),
        )
    out["token_kurtosis"] = {k: float(g.token_kurtosis.mean()) for k, g in df.groupby("kind", sort=False)}
    return out
