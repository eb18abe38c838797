"""Fused CPU kernels (Numba) for the LLM.int8() hot path.

Eager PyTorch spends ~5 memory passes over X to find outlier columns, take row
absmax without outliers and round to int8, and ~3 passes over the int32
product to dequantize; at SmolLM2's shapes those passes cost as much as the
int8 matmul itself. Each kernel here is one pass. Results are bit-identical
to ``outliers.quant.int8`` (tests compare them), which is why the scale is
``(1 / m) * 127`` in float32: torch evaluates ``127.0 / m`` that way.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

__all__ = ["quantize_decompose", "quantize_rows", "dequantize_into", "dequantize_inplace", "int8_gemm_int16"]


_ABS = np.int32(0x7FFFFFFF)  # clears the sign bit
_INF = np.int32(0x7F800000)  # +inf's bits; every NaN's magnitude bits are above it


@njit(parallel=True, cache=True, boundscheck=False)
def _quantize_rows(bits, x, t_bits, codes, row_stats, col_flags):  # pragma: no cover - compiled
    # The absmax is taken on the float's bits as int32: for |x| (sign bit cleared) integer order is float
    # order, -0.0 is 0 and NaN sorts above inf, and an integer max vectorizes where a float max (with its
    # NaN rules) does not: 3-5x faster than the float loop, bit-identical. An element is an outlier when
    # t_bits <= |x| <= inf (NaN never: as torch's |x| >= t); it then counts 0 towards the row's max.
    rows, cols = x.shape
    n_chunks = col_flags.shape[0]  # one flag row per chunk: |= from two threads into one byte would race
    per = (rows + n_chunks - 1) // n_chunks
    c127 = np.float32(127.0)
    for ch in prange(n_chunks):
        flags = col_flags[ch]
        scratch = np.empty(1, dtype=np.int32)
        as_float = scratch.view(np.float32)
        for i in range(ch * per, min(rows, (ch + 1) * per)):
            m = np.int32(0)
            for k in range(cols):
                b = bits[i, k] & _ABS
                outlier = (b >= t_bits) & (b <= _INF)
                flags[k] |= outlier
                m = max(m, np.int32(0) if outlier else b)
            if m > _INF:  # a NaN: it propagates into the statistic, as torch's amax would
                r = np.float32(np.nan)
            else:
                scratch[0] = m
                r = as_float[0]
            row_stats[i] = r
            s = (np.float32(1.0) / r) * c127 if r > 0 else np.float32(0.0)
            for k in range(cols):
                v = np.rint(x[i, k] * s)
                codes[i, k] = np.int8(min(max(v, -c127), c127))


@njit(parallel=True, cache=True, boundscheck=False)
def _decompose(x, cols, codes, x_cols):  # pragma: no cover - compiled
    # the outlier columns leave the int8 copy and are gathered in float for their own product
    for i in prange(x.shape[0]):
        for j in range(cols.shape[0]):
            c = cols[j]
            x_cols[i, j] = x[i, c]
            codes[i, c] = 0


@njit(parallel=True, cache=True, boundscheck=False)
def _dequantize_into(c, row_stats, col_stats, bias, has_bias, out):  # pragma: no cover - compiled
    rows, n = c.shape
    inv = np.float32(1.0 / (127.0 * 127.0))
    for i in prange(rows):
        r = row_stats[i] * inv
        for j in range(n):
            v = np.float32(c[i, j]) * r * col_stats[j]
            out[i, j] = v + bias[j] if has_bias else v


@njit(parallel=True, cache=True, boundscheck=False)
def _dequantize_inplace(c, row_stats, col_stats, bias, has_bias):  # pragma: no cover - compiled
    # the same arithmetic as _dequantize_into, written over the int32 product it reads: one view of one
    # buffer (no second array LLVM must check for overlap), and no fresh output whose pages fault in
    out = c.view(np.float32)
    rows, n = c.shape
    inv = np.float32(1.0 / (127.0 * 127.0))
    for i in prange(rows):
        r = row_stats[i] * inv
        for j in range(n):
            v = np.float32(c[i, j]) * r * col_stats[j]
            out[i, j] = v + bias[j] if has_bias else v


@njit(cache=True, boundscheck=False, fastmath={"contract"})
def _fma_into(acc, a, w):  # pragma: no cover - compiled
    # acc[j] = fma(a, w[j], acc[j]): only this loop may fuse a multiply into an add
    for j in range(acc.shape[0]):
        acc[j] += a * w[j]


@njit(parallel=True, cache=True, boundscheck=False)
def _dequantize_inplace_outliers(c, row_stats, col_stats, bias, has_bias, xo, wo, n_chunks):  # pragma: no cover
    # _dequantize_inplace plus the float outlier product, per row while it is in cache: a separate rank-k
    # addmm_ read and wrote the whole output again for 1-3 columns. The product is summed as MKL's sgemm
    # sums it (the first product rounded, then fused multiply-adds), then added to the dequantized value.
    out = c.view(np.float32)
    rows, n = c.shape
    k = xo.shape[1]
    inv = np.float32(1.0 / (127.0 * 127.0))
    per = (rows + n_chunks - 1) // n_chunks
    for ch in prange(n_chunks):
        acc = np.empty(n, dtype=np.float32)
        for i in range(ch * per, min(rows, (ch + 1) * per)):
            a0 = xo[i, 0]
            for j in range(n):
                acc[j] = a0 * wo[0, j]
            for q in range(1, k):
                _fma_into(acc, xo[i, q], wo[q])
            r = row_stats[i] * inv
            for j in range(n):
                v = np.float32(c[i, j]) * r * col_stats[j]
                v = v + bias[j] if has_bias else v
                out[i, j] = v + acc[j]


_GEMM_COLS = 8  # weight rows per task: their codes stay in L1/L2 while every row of X passes them


@njit(parallel=True, cache=True, boundscheck=False)
def int8_gemm_int16(a, b, out):  # pragma: no cover - compiled
    """``out[:] = a @ b.T`` exactly: int8 ``a (m, k)``, ``b (n, k)``, int32 ``out (m, n)``, k <= 131,071.

    Every product of two int8 codes fits int16 (|-128 * -128| = 2^14) and a pair of them int32: LLVM turns
    the widened multiply-add into ``vpmaddwd`` (AVX2, AVX-512BW) or ``sdot``-like instructions elsewhere,
    exact over the full range, unlike u8 x s8 ``vpmaddubsw`` paths that saturate pair sums at int16.
    """
    m, k = a.shape
    n = b.shape[0]
    tasks = (n + _GEMM_COLS - 1) // _GEMM_COLS
    for t in prange(tasks):
        j0 = t * _GEMM_COLS
        j1 = min(n, j0 + _GEMM_COLS)
        for i in range(m):
            for j in range(j0, j1):
                acc = np.int32(0)
                for q in range(k):
                    acc += np.int32(np.int16(a[i, q]) * np.int16(b[j, q]))
                out[i, j] = acc


def _threshold_bits(threshold: float) -> np.int32:
    """The int32 bits of float32 ``threshold``; for 0 (no decomposition) a value no magnitude reaches."""
    if threshold <= 0:
        return np.int32(_INF + 1)  # above inf, and NaN is never an outlier
    return np.array([threshold], dtype=np.float32).view(np.int32)[0]


def quantize_decompose(
    x: torch.Tensor, threshold: float, x_float: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(codes, row_stats, outlier_cols, x_cols)`` for a contiguous float32 CPU ``x``.

    The first three are ``int8_vectorwise_quant(x, threshold)``'s, bit for bit (``outlier_cols`` empty, not
    None, without decomposition); ``x_cols`` is ``x_float[:, outlier_cols]`` (``x_float`` defaults to ``x``;
    pass the unrounded input when ``x`` was rounded to fp16 first), contiguous, for the float product.
    One pass over the rows, then one over the outlier columns alone.
    """
    rows, cols = x.shape
    xn = x.numpy()
    codes = torch.empty((rows, cols), dtype=torch.int8)
    row_stats = torch.empty(rows, dtype=torch.float32)
    flags = np.zeros((max(1, min(torch.get_num_threads(), rows)), cols), dtype=np.bool_)
    _quantize_rows(xn.view(np.int32), xn, _threshold_bits(threshold), codes.numpy(), row_stats.numpy(), flags)
    outlier_cols = torch.from_numpy(np.flatnonzero(flags.any(0)))
    x_cols = torch.empty((rows, len(outlier_cols)), dtype=torch.float32)
    if len(outlier_cols):
        src = x if x_float is None else x_float
        _decompose(src.numpy(), outlier_cols.numpy(), codes.numpy(), x_cols.numpy())
    return codes, row_stats, outlier_cols, x_cols


def quantize_rows(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(codes, row_stats, outlier_cols)`` for a contiguous float32 CPU ``x`` (``quantize_decompose``)."""
    return quantize_decompose(x, threshold)[:3]


def dequantize_into(
    c: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Return float32 ``c * row_stats ⊗ col_stats / 127² + bias`` in one pass (CPU, contiguous)."""
    out = torch.empty(c.shape, dtype=torch.float32)
    b = bias if bias is not None else col_stats  # any float32 (n,) array; unused without bias
    _dequantize_into(c.numpy(), row_stats.numpy(), col_stats.numpy(), b.numpy(), bias is not None, out.numpy())
    return out


def dequantize_inplace(
    c: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: torch.Tensor | None,
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``dequantize_into`` written over ``c`` itself: returns a float32 view of ``c``'s memory, bit-identical.

    ``c`` (contiguous int32 on the CPU, e.g. fresh from ``int8_matmul``) is consumed: its values are gone.
    ``outliers=(xo, wo)``, float32 ``(rows, k)`` and ``(k, n)``, adds LLM.int8()'s float outlier product
    ``xo @ wo`` row by row in the same pass, summed in the order MKL's ``addmm_`` sums it (the first product
    rounded, the others fused multiply-adds, then one add to the dequantized value): bit-identical to
    dequantize-then-``addmm_`` with torch's MKL for the few columns LLM.int8() decomposes (tested for k up
    to 5; another BLAS, or MKL blocking a large k, may order the sum otherwise).
    """
    if c.dtype != torch.int32 or not c.is_contiguous() or c.device.type != "cpu":
        raise ValueError(f"dequantize_inplace needs a contiguous int32 CPU tensor, got {c.dtype} on {c.device}")
    b = bias if bias is not None else col_stats  # any float32 (n,) array; unused without bias
    if outliers is None or outliers[0].shape[1] == 0:
        _dequantize_inplace(c.numpy(), row_stats.numpy(), col_stats.numpy(), b.numpy(), bias is not None)
    else:
        xo, wo = (t.float().contiguous() for t in outliers)
        if xo.shape != (c.shape[0], wo.shape[0]) or wo.shape[1] != c.shape[1]:
            raise ValueError(f"outlier operands {tuple(xo.shape)} and {tuple(wo.shape)} do not fit {tuple(c.shape)}")
        args = (c.numpy(), row_stats.numpy(), col_stats.numpy(), b.numpy(), bias is not None)
        chunks = max(1, min(torch.get_num_threads(), c.shape[0]))
        _dequantize_inplace_outliers(*args, xo.numpy(), wo.numpy(), chunks)
    return c.view(torch.float32)
