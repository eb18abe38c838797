"""Outlier-feature criteria: pure functions from ``OutlierStats`` to tables.

The paper (§4.1): a feature dim is an outlier feature when its magnitude is
>= 6.0 in >= 25 % of the layers and >= 6 % of the sequence positions. The
paper leaves open what "layer" and "sequence positions" mean; here:

``layer_unit="block"`` (default)  a dim counts for a transformer block when any
                                   capture point of that block (in the chosen
                                   space) has it >= t; ``"point"``: each capture
                                   point is a layer of its own.
``positions="union"`` (default)    the fraction of scanned token positions at which
                                   the dim is >= t at *any* point of the space
                                   ("across all hidden states"); ``"max"``: the
                                   largest per-point fraction; ``"mean"``: the
                                   mean per-point fraction.
``scale="absolute"`` (default)     ``|x| >= t``, the paper's; ``"relative"``:
                                   ``|x| >= k * rms(token)``, for models whose
                                   normal dims are not within about ±3.5 (Gemma).

The magnitude ``t`` and ``k`` are those the statistics were taken at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from outliers.analysis.fields import SpaceStat, Stat, Top
from outliers.errors import InvalidArgumentError

if TYPE_CHECKING:  # the statistics are read, never made, here: stats draws itself with these functions
    from outliers.analysis.stats import OutlierStats

__all__ = ["Criteria", "per_dim", "outlier_features", "summary", "massive_activations", "top_values"]


@dataclass(frozen=True)
class Criteria:
    layers: float = 0.25
    positions: float = 0.06
    layer_unit: str = "block"
    position_mode: str = "union"
    space: str = "hidden"
    scale: str = "absolute"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("layer_unit", self.layer_unit, ("block", "point")),
            ("position_mode", self.position_mode, ("union", "max", "mean")),
            ("scale", self.scale, ("absolute", "relative")),
        ):
            if value not in allowed:
                raise InvalidArgumentError(f"{name} must be one of {allowed}, got {value!r}")
        for name, fraction in (("layers", self.layers), ("positions", self.positions)):
            if not 0 <= fraction <= 1:
                raise InvalidArgumentError(f"{name} is a fraction in [0, 1], got {fraction!r}")


def per_dim(stats: OutlierStats, criteria: Criteria = Criteria()) -> pd.DataFrame:
    """Return one row per dim of ``criteria.space``: % layers, % positions, magnitudes, sidedness."""
    pts = [p for p in stats.points if p.space == criteria.space]
    if not pts:
        raise InvalidArgumentError(
            f"no capture points in space {criteria.space!r}; spaces scanned: {', '.join(stats.spaces)}"
        )
    absolute = criteria.scale == "absolute"
    counts = (
        torch.stack([stats.get(p.name, Stat.COUNT if absolute else Stat.REL_COUNT) for p in pts]).cpu().double()
    )  # (points, dims)
    tokens = torch.tensor([max(stats.tokens[p.name], 1) for p in pts], dtype=torch.float64).unsqueeze(1)
    hit = counts > 0
    if criteria.layer_unit == "block":
        layers = sorted({p.layer for p in pts})
        hit = torch.stack([hit[[i for i, p in enumerate(pts) if p.layer == layer]].any(0) for layer in layers])
    pct_layers = hit.double().mean(0)
    if criteria.position_mode == "union":
        union = stats.get_space(criteria.space, SpaceStat.UNION if absolute else SpaceStat.REL_UNION)
        pct_pos = union.cpu().double() / max(stats.tokens[f"space:{criteria.space}"], 1)
    elif criteria.position_mode == "max":
        pct_pos = (counts / tokens).amax(0)
    else:
        pct_pos = (counts / tokens).mean(0)
    absmax = torch.stack([stats.get(p.name, Stat.ABSMAX) for p in pts]).cpu().double()
    pos = torch.stack([stats.get(p.name, Stat.POS) for p in pts]).sum(0).cpu().double()
    neg = torch.stack([stats.get(p.name, Stat.NEG) for p in pts]).sum(0).cpu().double()
    sum_out = torch.stack([stats.get(p.name, Stat.SUM_OUT) for p in pts]).sum(0).cpu()
    n_out = pos + neg
    return pd.DataFrame(
        {
            "dim": range(counts.shape[1]),
            "pct_layers": (100 * pct_layers).numpy(),
            "pct_positions": (100 * pct_pos).numpy(),
            "max_abs": absmax.amax(0).numpy(),
            "median_layer_max": absmax.median(0).values.numpy(),
            "mean_outlier_value": torch.where(n_out > 0, sum_out / n_out.clamp_min(1), float("nan")).numpy(),
            "one_sided": torch.where(n_out > 0, torch.maximum(pos, neg) / n_out.clamp_min(1), float("nan")).numpy(),
            "n_outlier_values": n_out.long().numpy(),
        }
    )


def outlier_features(stats: OutlierStats, criteria: Criteria = Criteria()) -> pd.DataFrame:
    """Return the rows of ``per_dim`` that meet the criteria, largest magnitude first."""
    df = per_dim(stats, criteria)
    keep = (df.pct_layers >= 100 * criteria.layers) & (df.pct_positions >= 100 * criteria.positions)
    return (
        df[keep & (df.n_outlier_values > 0 if criteria.scale == "absolute" else keep)]
        .sort_values("max_abs", ascending=False)
        .reset_index(drop=True)
    )


def summary(stats: OutlierStats, criteria: Criteria = Criteria()) -> dict:
    """Return the paper's Table-4 row: outlier dims, mean % layers and % positions they affect."""
    df = outlier_features(stats, criteria)
    return {
        "model": stats.meta.get("model", ""),
        "space": criteria.space,
        "criterion": (
            f"|x| >= {stats.threshold:g}"
            if criteria.scale == "absolute"
            else f"|x| >= {stats.relative_k:g} x rms(token)"
        ),
        "outlier_dims": len(df),
        "pct_layers": float(df.pct_layers.mean()) if len(df) else 0.0,
        "pct_positions": float(df.pct_positions.mean()) if len(df) else 0.0,
        "tokens": stats.tokens.get(f"space:{criteria.space}", 0),
        **{f"criteria.{k}": v for k, v in asdict(criteria).items()},
    }


def massive_activations(stats: OutlierStats) -> pd.DataFrame:
    """Return (layer, dim, count, max_abs) of massive activations on the residual stream."""
    rows = []
    for p in stats.points:
        if p.kind != "residual":
            continue
        massive = stats.get(p.name, Stat.MASSIVE).cpu()
        absmax = stats.get(p.name, Stat.ABSMAX).cpu()
        for d in torch.nonzero(massive).view(-1).tolist():
            rows.append({"layer": p.layer, "dim": d, "count": int(massive[d]), "max_abs": float(absmax[d])})
    return pd.DataFrame(rows, columns=["layer", "dim", "count", "max_abs"])


def top_values(stats: OutlierStats, tokenizer=None) -> pd.DataFrame:
    """Return the largest |x| seen (one per token and point), where it fired and, with a tokenizer, the token."""
    T = {f: stats.get_top(f) for f in Top}
    rows = []
    for i in range(len(T[Top.ABS])):
        p = stats.points[int(T[Top.POINT][i])]
        tok = int(T[Top.TOKEN][i])
        rows.append(
            {
                "point": p.name,
                "layer": p.layer,
                "kind": p.kind,
                "dim": int(T[Top.DIM][i]),
                "value": float(T[Top.VALUE][i]),
                "sequence": int(T[Top.SEQ][i]),
                "position": int(T[Top.POS][i]),
                "token_id": tok,
                "token": tokenizer.decode([tok]) if tokenizer is not None else "",
            }
        )
    return pd.DataFrame(
        rows, columns=["point", "layer", "kind", "dim", "value", "sequence", "position", "token_id", "token"]
    )
