"""A fused CPU kernel (Numba) for the capture hooks' statistics: one pass over a point's input.

Eager PyTorch takes a pass over each hooked tensor per statistic (per-dim
maxima, counts, sums, the scale-relative counts, the histogram;
``outliers.analysis.stats``); this kernel takes one. Per-thread partial sums
are merged in torch afterwards, into a typed ``stats.BatchStats``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from outliers.analysis.fields import BatchStats

__all__ = ["point_stats"]


@njit(cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _row_moments(row, mu, all_finite, out):  # pragma: no cover - compiled
    """Centred sums of d², d³, d⁴ of one row about ``mu``, in float64 (values reach ~2e4, 4th powers ~1e17).

    Reassociation lets the sums vectorize; it moves them by float64 rounding only. A row with a NaN or
    inf takes the branchy loop that leaves those out.
    """
    m2 = 0.0
    m3 = 0.0
    m4 = 0.0
    if all_finite:
        for d in range(row.shape[0]):
            e = np.float64(row[d]) - mu
            e2 = e * e
            m2 += e2
            m3 += e2 * e
            m4 += e2 * e2
    else:
        for d in range(row.shape[0]):
            v = row[d]
            if np.isfinite(v):
                e = np.float64(v) - mu
                e2 = e * e
                m2 += e2
                m3 += e2 * e
                m4 += e2 * e2
    out[1] = mu
    out[2] = m2
    out[3] = m3
    out[4] = m4


@njit(parallel=True, cache=True, boundscheck=False)
def _point_stats(
    x,
    t,
    k_rel,
    hist_scale,
    n_chunks,
    absmax,
    count,
    pos,
    sum_out,
    sum_,
    sumsq,
    rel_count,
    hist,
    nonfinite,
    union,
    rel_union,
    row_max,
    row_arg,
    moments,
    row_moments,
):  # pragma: no cover - compiled
    rows, dims = x.shape
    n_bins = hist.shape[1]
    per = (rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for i in range(c * per, min(rows, (c + 1) * per)):
            s1 = 0.0
            ss = 0.0
            n_ok = 0
            for d in range(dims):
                v = x[i, d]
                if np.isfinite(v):
                    s1 += v
                    ss += v * v
                    n_ok += 1
            rel_t = k_rel * np.sqrt(ss / dims) if n_ok else np.inf
            best = np.float32(0.0)
            best_d = 0
            for d in range(dims):
                v = x[i, d]
                if not np.isfinite(v):
                    nonfinite[c] += 1
                    continue
                a = abs(v)
                if a > absmax[c, d]:
                    absmax[c, d] = a
                sum_[c, d] += v
                sumsq[c, d] += v * v
                if a >= t:
                    count[c, d] += 1
                    if v > 0:
                        pos[c, d] += 1
                    sum_out[c, d] += v
                    union[i, d] = 1
                if a >= rel_t:
                    rel_count[c, d] += 1
                    rel_union[i, d] = 1
                b = int(a * hist_scale)
                hist[c, b if b < n_bins else n_bins - 1] += 1
                if a > best:
                    best = a
                    best_d = d
            row_max[i] = best
            row_arg[i] = best_d
            if moments and n_ok:
                _row_moments(x[i], s1 / n_ok, n_ok == dims, row_moments[i])
                row_moments[i, 0] = n_ok


def point_stats(
    x: torch.Tensor,
    threshold: float,
    relative_k: float,
    hist_scale: float,
    n_bins: int,
    union: torch.Tensor,
    rel_union: torch.Tensor,
    moments: bool = False,
) -> BatchStats:
    """Return one point's per-dim sums for a contiguous float32 CPU ``x (tokens, dims)``, in one pass.

    ``union``/``rel_union`` (uint8, tokens x dims) get 1 where ``|x| >= t`` /
    ``>= k * rms``; ``row_max``/``row_arg`` are each token's largest ``|x|`` and its dim.
    With ``moments``, ``row_moments`` holds each row's centred moment sums
    (one more pass over the row while it is in cache).
    """
    rows, dims = x.shape
    chunks = max(1, min(torch.get_num_threads(), rows))
    z = lambda dt: torch.zeros((chunks, dims), dtype=dt)  # noqa: E731
    absmax, count, pos, rel_count = z(torch.float32), z(torch.int64), z(torch.int64), z(torch.int64)
    sum_out, sum_, sumsq = z(torch.float64), z(torch.float64), z(torch.float64)
    hist = torch.zeros((chunks, n_bins), dtype=torch.int64)
    nonfinite = torch.zeros(chunks, dtype=torch.int64)
    row_max = torch.empty(rows, dtype=torch.float32)
    row_arg = torch.empty(rows, dtype=torch.int64)
    row_moments = torch.zeros((rows if moments else 0, 5), dtype=torch.float64)
    _point_stats(
        x.numpy(),
        np.float32(threshold),
        np.float64(relative_k),
        np.float32(hist_scale),
        chunks,
        absmax.numpy(),
        count.numpy(),
        pos.numpy(),
        sum_out.numpy(),
        sum_.numpy(),
        sumsq.numpy(),
        rel_count.numpy(),
        hist.numpy(),
        nonfinite.numpy(),
        union.numpy(),
        rel_union.numpy(),
        row_max.numpy(),
        row_arg.numpy(),
        moments,
        row_moments.numpy(),
    )
    # per-thread partials: the maximum of the maxima, the sum of the rest
    return BatchStats(
        absmax=absmax.amax(0),
        count=count.sum(0),
        pos=pos.sum(0),
        sum_out=sum_out.sum(0),
        sum=sum_.sum(0),
        sumsq=sumsq.sum(0),
        rel_count=rel_count.sum(0),
        hist=hist.sum(0),
        nonfinite=nonfinite.sum(),
        row_max=row_max,
        row_arg=row_arg,
        row_moments=row_moments if moments else None,
    )
