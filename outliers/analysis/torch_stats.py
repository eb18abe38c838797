"""One capture point's statistics over a batch of rows, in plain torch: any device, any float dtype.

The reference the fused CPU kernel (``outliers.analysis.cpu_kernels``) is
tested against, and the path taken on GPUs. The sums it returns are
``BatchStats`` (``outliers.analysis.fields``); ``OutlierStats.update`` adds
them up.
"""

from __future__ import annotations

import torch

from outliers.analysis.fields import HIST_BINS, HIST_WIDTH, BatchStats, PointStat

__all__ = ["point_stats_torch", "row_moments", "moment_sums"]


def row_moments(x: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Return ``(rows, 5)`` float64: each row's finite values, mean, and centred sums of d², d³, d⁴."""
    n = finite.sum(1, dtype=torch.float64)
    xd = torch.where(finite, x.double(), 0.0)
    mu = xd.sum(1) / n.clamp_min(1)
    e = torch.where(finite, xd - mu[:, None], 0.0)
    e2 = e * e
    return torch.stack([n, mu, e2.sum(1), (e2 * e).sum(1), (e2 * e2).sum(1)], 1)


def point_stats_torch(
    x: torch.Tensor,
    t: float,
    k_rel: float,
    union: torch.Tensor,
    rel_union: torch.Tensor,
    moments: bool = False,
) -> BatchStats:
    """The same sums as ``cpu_kernels.point_stats`` in plain torch (any device)."""
    finite = torch.isfinite(x)
    x0 = torch.where(finite, x, torch.zeros((), device=x.device))
    a = x0.abs()
    ge = (a >= t) & finite
    rms = x0.double().pow(2).sum(1, keepdim=True).div(x.shape[1]).sqrt()  # float64, as the CPU kernel
    rel = (a >= k_rel * rms) & finite
    union |= ge.to(torch.uint8)
    rel_union |= rel.to(torch.uint8)
    bins = (a[finite] / HIST_WIDTH).long().clamp_(max=HIST_BINS - 1)
    row_max, row_arg = a.max(1)
    return BatchStats(
        absmax=a.amax(0),
        count=ge.sum(0),
        pos=(ge & (x0 > 0)).sum(0),
        sum_out=torch.where(ge, x0, 0).sum(0, dtype=torch.float64),
        sum=x0.sum(0, dtype=torch.float64),
        sumsq=(x0 * x0).sum(0, dtype=torch.float64),
        rel_count=rel.sum(0),
        hist=torch.bincount(bins, minlength=HIST_BINS),
        nonfinite=(~finite).sum(),
        row_max=row_max,
        row_arg=row_arg,
        row_moments=row_moments(x, finite) if moments else None,
    )


def moment_sums(m: torch.Tensor, row_max: torch.Tensor, seq_ids: torch.Tensor | None) -> dict[PointStat, torch.Tensor]:
    """Return one batch's ``PointStat`` sums from its ``row_moments`` (and each row's largest |x|).

    Rows of one sequence (same ``seq_ids``) are pooled exactly: with d = a
    row's mean minus its sequence's, the sequence's centred sums are
    Σ(m2 + n d²) and Σ(m4 + 4 d m3 + 6 d² m2 + n d⁴). Without ``seq_ids``
    (e.g. a cached generation step) only the token sums are returned.
    """
    n, mu, m2, m3, m4 = m.unbind(1)
    has = m2 > 0  # a row of equal values has no kurtosis
    kurt = n[has] * m4[has] / m2[has] ** 2
    out = {
        PointStat.TOKEN_KURT: kurt.sum().reshape(1),
        PointStat.KURT_TOKENS: has.sum(dtype=torch.float64).reshape(1),
        PointStat.TOKEN_KURT_MAX: (kurt.max() if len(kurt) else torch.zeros((), dtype=torch.float64)).reshape(1),
    }
    if seq_ids is None:
        return out
    seqs, inv = torch.unique(seq_ids.to(m.device), return_inverse=True)
    pool = lambda v: torch.zeros(len(seqs), dtype=torch.float64, device=m.device).index_add_(0, inv, v)  # noqa: E731
    size = pool(n)
    d = mu - (pool(n * mu) / size.clamp_min(1))[inv]
    s2 = pool(m2 + n * d**2)
    s4 = pool(m4 + 4 * d * m3 + 6 * d**2 * m2 + n * d**4)
    ok = s2 > 0
    inf = torch.zeros(len(seqs), dtype=torch.float64, device=m.device)
    inf = inf.scatter_reduce_(0, inv, row_max.double(), "amax")
    out[PointStat.SEQ_KURT] = (size[ok] * s4[ok] / s2[ok] ** 2).sum().reshape(1)
    out[PointStat.SEQ_INF] = inf.sum().reshape(1)
    out[PointStat.SEQS] = torch.full((1,), float(len(seqs)), dtype=torch.float64, device=m.device)
    return out
