"""``@cuda.jit`` bodies for LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339); launchers
(grid math) live in ``launch.py`` and ``gemm.py``, checks in ``device.py``.

Every index is bounds-guarded. Tile and block sizes are compile-time constants, taken
from a ``TileConfig``: ``build(tiles)`` returns the kernels closed over one configuration
(cached). The arithmetic is the paper's vector-wise quantization as bitsandbytes does it,
and the tests hold the kernels to the toolkit's CPU reference bit for bit: the scale is
``(1 / absmax) * 127`` in float32 and rounding is half-to-even, as torch does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
from numba import cuda, float32, int16, int32

from .errors import KernelArgumentError
from .mma import mma_s8
from .tiles import TileConfig

if numba.config.ENABLE_CUDASIM:
    import numpy as np

    def _float_bits(v):
        return int(np.array(v, np.float32).view(np.int32))
else:
    from numba.cuda.libdevice import float_as_int as _float_bits

__all__ = ["Kernels", "build", "outlier_columns_kernel", "gather_columns_kernel"]

INV_127_SQ = float32(1.0 / (127.0 * 127.0))


class Kernels(NamedTuple):
    """The kernels built for one ``TileConfig`` (the two without tiles are shared by all)."""

    tiles: TileConfig
    outlier_columns_kernel: object
    quantize_rows_kernel: object
    gather_columns_kernel: object
    int8_gemm_dequant_kernel: object
    int8_gemm_mma_kernel: object


@functools.cache
def build(tiles: TileConfig) -> Kernels:
    """Return the kernels for ``tiles``; each compiles at its first launch, once per argument types."""
    if not isinstance(tiles, TileConfig):
        raise KernelArgumentError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
    return Kernels(
        tiles,
        outlier_columns_kernel,
        _quantize_rows_kernel(tiles.quant_threads),
        gather_columns_kernel,
        _simt_gemm_kernel(tiles.simt_tile),
        _mma_gemm_kernel(tiles),
    )


@cuda.jit
def outlier_columns_kernel(x, threshold, flags):
    """flags[j] = 1 where any |x[i, j]| >= threshold. Grid: 2D over (rows, cols)."""
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        if abs(float32(x[i, j])) >= threshold:
            flags[j] = 1  # all writers store 1


@functools.cache
def _quantize_rows_kernel(TPB: int):
    """The row-quantization kernel with TPB threads per row (a power of two)."""

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

    return quantize_rows_kernel


@cuda.jit
def gather_columns_kernel(src, cols, scale, has_scale, dst):
    """dst[r, o] = src[r, cols[o]] (times scale[r] / 127 when has_scale), as float32."""
    r, o = cuda.grid(2)
    if r < dst.shape[0] and o < dst.shape[1]:
        v = float32(src[r, cols[o]])
        if has_scale:
            v = v * (scale[r] / float32(127.0))
        dst[r, o] = v


@functools.cache
def _simt_gemm_kernel(TILE: int):
    """The SIMT GEMM with TILE x TILE output tiles."""

    @cuda.jit
    def int8_gemm_dequant_kernel(a, b, row_stats, col_stats, bias, has_bias, xo, wo, raw, bf16, out, out_i32):
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
        if row < m_rows and col < n_cols:
            _store(acc, row, col, row_stats, col_stats, bias, has_bias, xo, wo, raw, bf16, out, out_i32)

    return int8_gemm_dequant_kernel


@cuda.jit(device=True)
def _store(acc, row, col, row_stats, col_stats, bias, has_bias, xo, wo, raw, bf16, out, out_i32):
    """The fused epilogue of both GEMMs, for one in-bounds output element.

    ``out`` is float32 or float16 (the store rounds to nearest even), or int16 holding
    bfloat16 bits when ``bf16`` (Numba has no bfloat16 arrays).
    """
    if raw:
        out_i32[row, col] = acc
    else:
        v = float32(acc) * (row_stats[row] * INV_127_SQ) * col_stats[col]
        if has_bias:
            v += bias[col]
        for o in range(xo.shape[1]):
            v += xo[row, o] * wo[col, o]
        if bf16:
            out[row, col] = _bfloat16_bits(v)
        else:
            out[row, col] = v


@cuda.jit(device=True)
def _bfloat16_bits(v):
    """float32 -> bfloat16 bits as int16, rounded to nearest even like torch (NaN -> 0x7FC0)."""
    if v != v:
        return int16(0x7FC0)
    bits = _float_bits(v) & 0xFFFFFFFF
    hi = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return int16(hi - 0x10000 if hi >= 0x8000 else hi)


@functools.cache
def _mma_gemm_kernel(tiles: TileConfig):
    """The tensor-core GEMM for the ``mma_*`` sizes of ``tiles``: a block of MMA_WARPS_M x MMA_WARPS_N
    warps, each computing MMA_MT x MMA_NT m16n8 tiles; MMA_BKW int32 words (4 int8 each) of K per
    shared-memory stage, in rows padded to MMA_SK words."""
    MMA_WARPS_N, MMA_MT, MMA_NT = tiles.mma_warps_n, tiles.mma_mt, tiles.mma_nt
    MMA_TILES = MMA_MT * MMA_NT  # m16n8 accumulator tiles per warp
    MMA_BM, MMA_BN, MMA_THREADS = tiles.mma_bm, tiles.mma_bn, tiles.mma_threads
    MMA_BKW, MMA_SK = tiles.mma_k_words, tiles.mma_row_words

    @cuda.jit
    def int8_gemm_mma_kernel(a, b, row_stats, col_stats, bias, has_bias, xo, wo, raw, bf16, out, out_i32):
        """The same product and epilogue as ``int8_gemm_dequant_kernel``, on int8 tensor cores.

        a: (M, K/4) and b: (N, K/4) int32, each word four int8 along K (the launcher's
        zero-copy view of int8 rows, K % 4 == 0). One block of MMA_WARPS_M x MMA_WARPS_N
        warps computes an MMA_BM x MMA_BN tile of the output; each warp MMA_MT x MMA_NT
        m16n8 tiles of it with ``mma_s8`` (m16n8k32), accumulating in registers.
        Shared-memory rows are padded by 4 words so that fragment loads hit distinct banks.

        Every loop over fragments is a single loop of constant length: NVVM unrolls those and
        keeps the arrays in registers, where nested loops left them in local memory
        (``python -m cuda_kernels.check`` shows the stack bytes).
        """
        sa = cuda.shared.array((MMA_BM, MMA_SK), int32)
        sb = cuda.shared.array((MMA_BN, MMA_SK), int32)
        acc = cuda.local.array((MMA_TILES, 4), int32)
        af = cuda.local.array((MMA_MT, 4), int32)
        bf = cuda.local.array((MMA_NT, 2), int32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        g = lane // 4
        t = lane % 4
        warp_m = (tid // 32) // MMA_WARPS_N * (16 * MMA_MT)  # this warp's first row in the tile
        warp_n = (tid // 32) % MMA_WARPS_N * (8 * MMA_NT)
        m_rows, k_words = a.shape
        n_cols = b.shape[0]
        m0 = cuda.blockIdx.y * MMA_BM
        n0 = cuda.blockIdx.x * MMA_BN
        for e in range(MMA_TILES * 4):
            acc[e // 4, e % 4] = 0
        for k0 in range(0, k_words, MMA_BKW):
            for idx in range(tid, MMA_BM * MMA_BKW, MMA_THREADS):
                r = idx // MMA_BKW
                c = idx % MMA_BKW
                ok = m0 + r < m_rows and k0 + c < k_words
                sa[r, c] = a[m0 + r, k0 + c] if ok else int32(0)
            for idx in range(tid, MMA_BN * MMA_BKW, MMA_THREADS):
                r = idx // MMA_BKW
                c = idx % MMA_BKW
                ok = n0 + r < n_cols and k0 + c < k_words
                sb[r, c] = b[n0 + r, k0 + c] if ok else int32(0)
            cuda.syncthreads()
            for kk in range(0, MMA_BKW, 8):  # 8 words = the 32 int8 of one m16n8k32
                for mt in range(MMA_MT):
                    ra = warp_m + 16 * mt + g
                    af[mt, 0] = sa[ra, kk + t]
                    af[mt, 1] = sa[ra + 8, kk + t]
                    af[mt, 2] = sa[ra, kk + 4 + t]
                    af[mt, 3] = sa[ra + 8, kk + 4 + t]
                for nt in range(MMA_NT):
                    rb = warp_n + 8 * nt + g
                    bf[nt, 0] = sb[rb, kk + t]
                    bf[nt, 1] = sb[rb, kk + 4 + t]
                for j in range(MMA_TILES):
                    mt = j // MMA_NT
                    nt = j % MMA_NT
                    d = mma_s8(
                        af[mt, 0],
                        af[mt, 1],
                        af[mt, 2],
                        af[mt, 3],
                        bf[nt, 0],
                        bf[nt, 1],
                        acc[j, 0],
                        acc[j, 1],
                        acc[j, 2],
                        acc[j, 3],
                    )
                    acc[j, 0] = d[0]
                    acc[j, 1] = d[1]
                    acc[j, 2] = d[2]
                    acc[j, 3] = d[3]
            cuda.syncthreads()
        for e in range(MMA_TILES * 4):
            j = e // 4
            i = e % 4
            row = m0 + warp_m + 16 * (j // MMA_NT) + g + 8 * (i // 2)
            col = n0 + warp_n + 8 * (j % MMA_NT) + 2 * t + i % 2
            if row < m_rows and col < n_cols:
                _store(acc[j, i], row, col, row_stats, col_stats, bias, has_bias, xo, wo, raw, bf16, out, out_i32)

    return int8_gemm_mma_kernel
