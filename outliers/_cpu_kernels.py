"""Fused CPU kernels (Numba) for the LLM.int8() hot path.

Eager PyTorch spends ~5 memory passes over X to find outlier columns, take row
absmax without outliers and round to int8, and ~3 passes over the int32
product to dequantize; at SmolLM2's shapes those passes cost as much as the
int8 matmul itself. Each kernel here is one pass. Results are bit-identical
to ``outliers.int8`` (tests compare them), which is why the scale is
``(1 / m) * 127`` in float32: torch evaluates ``127.0 / m`` that way.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

__all__ = ["quantize_rows", "dequantize_into", "point_stats"]


@njit(parallel=True, cache=True, boundscheck=False)
def _quantize_rows(x, threshold, codes, row_stats, col_flags):  # pragma: no cover - compiled
    rows, cols = x.shape
    c127 = np.float32(127.0)
    for i in prange(rows):
        m = np.float32(0.0)
        nan = False
        for k in range(cols):
            a = abs(x[i, k])
            if threshold > 0 and a >= threshold:
                col_flags[k] = 1  # every writer stores the same 1: a benign race
            elif a > m:
                m = a
            elif a != a:  # NaN fails every comparison: flag it, as torch's amax would propagate it
                nan = True
        if nan:
            m = np.float32(np.nan)
        row_stats[i] = m
        s = (np.float32(1.0) / m) * c127 if m > 0 else np.float32(0.0)
        for k in range(cols):
            v = np.rint(x[i, k] * s)
            if v > c127:
                v = c127
            elif v < -c127:
                v = -c127
            codes[i, k] = np.int8(v)


@njit(parallel=True, cache=True, boundscheck=False)
def _dequantize_into(c, row_stats, col_stats, bias, has_bias, out):  # pragma: no cover - compiled
    rows, n = c.shape
    inv = np.float32(1.0 / (127.0 * 127.0))
    for i in prange(rows):
        r = row_stats[i] * inv
        for j in range(n):
            v = np.float32(c[i, j]) * r * col_stats[j]
            out[i, j] = v + bias[j] if has_bias else v


def quantize_rows(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(codes, row_stats, outlier_cols)`` for a contiguous float32 CPU ``x``, in one pass."""
    rows, cols = x.shape
    codes = torch.empty((rows, cols), dtype=torch.int8)
    row_stats = torch.empty(rows, dtype=torch.float32)
    flags = torch.zeros(cols, dtype=torch.uint8)
    _quantize_rows(x.numpy(), np.float32(threshold), codes.numpy(), row_stats.numpy(), flags.numpy())
    outlier_cols = torch.nonzero(flags).view(-1)
    if outlier_cols.numel():
        codes[:, outlier_cols] = 0
    return codes, row_stats, outlier_cols


def dequantize_into(c: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """Return float32 ``c * row_stats ⊗ col_stats / 127² + bias`` in one pass (CPU, contiguous)."""
    out = torch.empty(c.shape, dtype=torch.float32)
    b = bias if bias is not None else col_stats  # any float32 (n,) array; unused without bias
    _dequantize_into(c.numpy(), row_stats.numpy(), col_stats.numpy(), b.numpy(), bias is not None, out.numpy())
    return out


@njit(parallel=True, cache=True, boundscheck=False)
def _point_stats(x, t, k_rel, hist_scale, n_chunks, absmax, count, pos, sum_out, sum_, sumsq, rel_count,
                 hist, nonfinite, union, rel_union, row_max, row_arg):  # pragma: no cover - compiled
    rows, dims = x.shape
    n_bins = hist.shape[1]
    per = (rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for i in range(c * per, min(rows, (c + 1) * per)):
            ss = 0.0
            n_ok = 0
            for d in range(dims):
                v = x[i, d]
                if np.isfinite(v):
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


def point_stats(x: torch.Tensor, threshold: float, relative_k: float, hist_scale: float, n_bins: int,
                union: torch.Tensor, rel_union: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return one point's per-dim sums for a contiguous float32 CPU ``x (tokens, dims)``, in one pass.

    ``union``/``rel_union`` (uint8, tokens x dims) get 1 where ``|x| >= t`` /
    ``>= k * rms``; ``row_max``/``row_arg`` are each token's largest ``|x|`` and its dim.
    """
    rows, dims = x.shape
    chunks = max(1, min(torch.get_num_threads(), rows))
    z = lambda dt: torch.zeros((chunks, dims), dtype=dt)  # noqa: E731
    out = {"absmax": z(torch.float32), "count": z(torch.int64), "pos": z(torch.int64),
           "sum_out": z(torch.float64), "sum": z(torch.float64), "sumsq": z(torch.float64),
           "rel_count": z(torch.int64)}
    hist = torch.zeros((chunks, n_bins), dtype=torch.int64)
    nonfinite = torch.zeros(chunks, dtype=torch.int64)
    row_max = torch.empty(rows, dtype=torch.float32)
    row_arg = torch.empty(rows, dtype=torch.int64)
    _point_stats(x.numpy(), np.float32(threshold), np.float64(relative_k), np.float32(hist_scale), chunks,
                 *(out[k].numpy() for k in ("absmax", "count", "pos", "sum_out", "sum", "sumsq", "rel_count")),
                 hist.numpy(), nonfinite.numpy(), union.numpy(), rel_union.numpy(), row_max.numpy(),
                 row_arg.numpy())
    res = {k: (v.amax(0) if k == "absmax" else v.sum(0)) for k, v in out.items()}
    res.update(hist=hist.sum(0), nonfinite=nonfinite.sum(), row_max=row_max, row_arg=row_arg)
    return res
