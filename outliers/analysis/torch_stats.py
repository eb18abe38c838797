"""One capture point's statistics over a batch of rows, in plain torch: any device, any float dtype.

The reference the fused CPU kernel (``outliers.analysis.cpu_kernels``) is
tested against, and the path taken on GPUs. The sums it returns are
``BatchStats`` (``outliers.analysis.fields``); ``OutlierStats.update`` adds
them up.
"""

from __future__ import annotations

import torch

from outliers.analysis.fields import HIST_BINS, HIST_WIDTH, BatchStats

__all__ = ["point_stats_torch"]


def point_stats_torch(
    x: torch.Tensor, t: float, k_rel: float, union: torch.Tensor, rel_union: torch.Tensor
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
    )
