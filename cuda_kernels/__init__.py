"""Numba CUDA kernels for LLM.int8(): outlier columns, vector-wise quantization,
int8 GEMM with fused dequantization (SIMT tiles, or int8 tensor cores through a
linked ``mma`` device function), outlier-column gathers.

``kernels`` holds the ``@cuda.jit`` bodies, built per ``TileConfig`` (``tiles``),
``mma`` the tensor-core instruction (and its simulator emulation), ``device`` where
kernels run and how torch tensors reach them (checks, views, launches), ``gemm`` the
int8 GEMM, ``launch`` the row and column launchers and ``llm_int8_linear`` (it
re-exports the others' public names), ``check`` a build of every kernel for real GPUs
that needs no GPU (``python -m cuda_kernels.check``). Launchers raise
``KernelArgumentError`` (``errors``, a ``ValueError``) for arguments they refuse.

The package stands alone: it imports numba, numpy and torch, nothing of ``outliers``.
Importing it needs no GPU and does not import numba; run the kernels on CPU with
``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported).
"""

from .errors import KernelArgumentError
from .tiles import PRODUCTION_TILES, SMALL_TILES, TileConfig

__all__ = ["KernelArgumentError", "TileConfig", "PRODUCTION_TILES", "SMALL_TILES"]
