"""``@cuda.jit`` bodies for LLM.int8(); launchers (grid math, checks) live in ``launch.py``.

Every index is bounds-guarded; tile and block sizes are compile-time
constants. The references these must equal are ``outliers.int8`` (and
``outliers._cpu_kernels``): the scale is ``(1 / absmax) * 127`` in float32
and rounding is half-to-even, as torch does.
"""

from __future__ import annotations

import numba
from numba import cuda, float32, int32

__all__ = ["TILE", "TPB", "outlier_columns_kernel", "quantize_rows_kernel", "gather_columns_kernel",
           "int8_gemm_dequant_kernel"]

TILE = 16  # GEMM tile: TILE x TILE threads, one output element each
# Threads per row in the row-quantization kernel (a power of two). The simulator runs
# every thread as a Python thread: 32 there keeps the tests quick; any power of two is correct.
TPB = 32 if numba.config.ENABLE_CUDASIM else 128
INV_127_SQ = float32(1.0 / (127.0 * 127.0))


@cuda.jit
def outlier_columns_kernel(x, threshold, flags):
    """flags[j] = 1 where any |x[i, j]| >= threshold. Grid: 2D over (rows, cols)."""
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        if abs(float32(x[i, j])) >= threshold:
            flags[j] = 1  # all writers store 1


@cuda.jit
def quantize_rows_kernel(x, threshold, flags, codes, row_stats):
    """One block per row: absmax over non-outlier values, then int8 codes, outlier columns zeroed.

    A NaN anywhere in the row makes row_stats NaN (so callers can refuse it).
    """
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    smax = cuda.shared.array(TPB, float32)
    rows, cols = x.shape
    m = float32(0.0)
    if row < rows:
        for j in range(tid, cols, TPB):
            a = abs(float32(x[row, j]))
            if a != a:
                m = a  # NaN sticks: every later comparison with it is false
            elif not (threshold > 0 and a >= threshold) and a > m:
                m = a
    smax[tid] = m
    cuda.syncthreads()
    step = TPB // 2
    while step > 0:
        if tid < step:
            other = smax[tid + step]
            if other != other or other > smax[tid]:
                smax[tid] = other
        cuda.syncthreads()
        step //= 2
    if row < rows:
        m = smax[0]
        if tid == 0:
            row_stats[row] = m
        scale = (float32(1.0) / m) * float32(127.0) if m > 0 else float32(0.0)
        for j in range(tid, cols, TPB):
            if flags[j]:
                codes[row, j] = 0
            else:
                v = float32(x[row, j]) * scale
                q = round(v) if v == v else 0
                codes[row, j] = max(-127, min(127, q))


@cuda.jit
def gather_columns_kernel(src, cols, scale, has_scale, dst):
    """dst[r, o] = src[r, cols[o]] (times scale[r] / 127 when has_scale), as float32."""
    r, o = cuda.grid(2)
    if r < dst.shape[0] and o < dst.shape[1]:
        v = float32(src[r, cols[o]])
        if has_scale:
            v = v * (scale[r] / float32(127.0))
        dst[r, o] = v


@cuda.jit
def int8_gemm_dequant_kernel(a, b, row_stats, col_stats, bias, has_bias, xo, wo, raw, out, out_i32):
    """out = (a @ b.T) * row_stats ⊗ col_stats / 127² + bias + xo @ wo.T.

    a: int8 (M, K); b: int8 (N, K); xo (M, n_out) and wo (N, n_out) float32 hold the
    outlier columns (n_out may be 0); out (M, N) float32. With ``raw`` the int32
    accumulators go to out_i32 instead (for exactness tests and int8_matmul).
    Shared-memory tiles of TILE x TILE, int32 accumulation.
    """
    sa = cuda.shared.array((TILE, TILE), int32)
    sb = cuda.shared.array((TILE, TILE), int32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    m_rows, k_dim = a.shape
    n_cols = b.shape[0]
    row = cuda.blockIdx.y * TILE + ty
    col = cuda.blockIdx.x * TILE + tx
    b_row = cuda.blockIdx.x * TILE + ty  # the weight row this thread loads
    acc = int32(0)
    for k0 in range(0, k_dim, TILE):
        k = k0 + tx
        sa[ty, tx] = int32(a[row, k]) if row < m_rows and k < k_dim else int32(0)
        sb[ty, tx] = int32(b[b_row, k]) if b_row < n_cols and k < k_dim else int32(0)
        cuda.syncthreads()
        for kk in range(TILE):
            acc += sa[ty, kk] * sb[tx, kk]
        cuda.syncthreads()
    if row < m_rows and col < n_cols and raw:
        out_i32[row, col] = acc
    elif row < m_rows and col < n_cols:
        v = float32(acc) * (row_stats[row] * INV_127_SQ) * col_stats[col]
        if has_bias:
            v += bias[col]
        for o in range(xo.shape[1]):
            v += xo[row, o] * wo[col, o]
        out[row, col] = v
