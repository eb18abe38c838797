"""Tile and block sizes of the kernels, as a parameter: ``TileConfig``.

Numba CUDA needs shared-memory shapes and the loop bounds it unrolls as compile-time
constants, so ``kernels.build(tiles)`` closes a fresh set of kernels over one
configuration (cached: one build per configuration). The launchers take ``tiles=``:
``PRODUCTION_TILES`` on a GPU, ``SMALL_TILES`` under the simulator, which runs every
thread of a block as a Python thread and is quickest with small blocks. Both are
correct for any shape; a test runs the production tiling in the simulator too.

This module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import KernelArgumentError

__all__ = ["TileConfig", "PRODUCTION_TILES", "SMALL_TILES"]

MAX_THREADS = 1024  # per block, every GPU Numba targets (and the rows of the simulator's mma emulation)
MAX_STATIC_SHARED = 48 * 1024  # bytes of statically sized shared memory per block


@dataclass(frozen=True)
class TileConfig:
    """Block and tile sizes: one build of the kernels per configuration.

    Attributes:
        simt_tile: the SIMT GEMM's square output tile, ``simt_tile x simt_tile`` threads with
            one output element each, stepping through K by ``simt_tile``.
        quant_threads: threads per row in the row-quantization kernel (a power of two).
        mma_warps_m, mma_warps_n: warps per block of the tensor-core GEMM, along M and N.
        mma_mt, mma_nt: m16n8 accumulator tiles per warp, along M and N.
        mma_k_words: int32 words of K (4 int8 each) per shared-memory stage, a multiple
            of 8 (the 32 int8 of one m16n8k32).
    """

    simt_tile: int = 16
    quant_threads: int = 128
    mma_warps_m: int = 4
    mma_warps_n: int = 2
    mma_mt: int = 2
    mma_nt: int = 8
    mma_k_words: int = 16

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 1:
                raise KernelArgumentError(f"TileConfig.{f.name} must be a positive int, got {v!r}")
        if self.quant_threads & (self.quant_threads - 1):
            raise KernelArgumentError(f"TileConfig.quant_threads must be a power of two, got {self.quant_threads}")
        if self.mma_k_words % 8:
            raise KernelArgumentError(f"TileConfig.mma_k_words must be a multiple of 8, got {self.mma_k_words}")
        for what, n in (
            ("simt_tile**2", self.simt_tile**2),
            ("quant_threads", self.quant_threads),
            ("mma_threads", self.mma_threads),
        ):
            if n > MAX_THREADS:
                raise KernelArgumentError(f"TileConfig: {what} = {n} threads per block, more than {MAX_THREADS}")
        if self.mma_shared_bytes > MAX_STATIC_SHARED:
            raise KernelArgumentError(
                f"TileConfig: the tensor-core GEMM's tiles take {self.mma_shared_bytes} B "
                f"of shared memory, more than {MAX_STATIC_SHARED}"
            )

    @property
    def mma_bm(self) -> int:
        """Rows of X per block of the tensor-core GEMM."""
        return self.mma_warps_m * 16 * self.mma_mt

    @property
    def mma_bn(self) -> int:
        """Weight rows (output columns) per block of the tensor-core GEMM."""
        return self.mma_warps_n * 8 * self.mma_nt

    @property
    def mma_threads(self) -> int:
        return 32 * self.mma_warps_m * self.mma_warps_n

    @property
    def mma_row_words(self) -> int:
        """A shared-memory row of the tensor-core GEMM, padded by 4 words: with 16 words of K,
        lanes (g, t) read word 20 g + t, 32 distinct banks."""
        return self.mma_k_words + 4

    @property
    def mma_shared_bytes(self) -> int:
        return 4 * (self.mma_bm + self.mma_bn) * self.mma_row_words


PRODUCTION_TILES = TileConfig()  # GPU blocks: SIMT 16x16, 128 threads per row, tensor-core 128x128 of 8 warps
SMALL_TILES = TileConfig(simt_tile=8, quant_threads=32, mma_warps_m=2, mma_warps_n=2, mma_mt=2, mma_nt=2)
