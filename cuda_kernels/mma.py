"""``mma_s8``: one warp-wide int8 tensor-core product, callable from a Numba kernel.

On a GPU it is the PTX instruction ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32``
in a small CUDA C device function (``mma_s8_16x8x32.cu``) linked into the kernel; Numba
has no tensor-core intrinsic of its own. Under the simulator it is an emulation that
follows the PTX ISA's fragment layout, so the kernels around it can be tested on CPU.

Every lane of a warp calls ``mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)`` together
and gets back its 4 int32 results. Lane ``l`` has ``g = l // 4`` and ``t = l % 4``; each
``a*``/``b*`` register packs 4 consecutive int8 along K (little-endian):

    a0 = A[g,     4t:4t+4]    a1 = A[g + 8, 4t:4t+4]
    a2 = A[g, 16+4t:16+4t+4]  a3 = A[g + 8, 16+4t:16+4t+4]
    b0 = B[4t:4t+4, g]        b1 = B[16+4t:16+4t+4, g]       (B is K x 8: a weight row per column)
    c0, c1 = C[g, 2t], C[g, 2t+1]      c2, c3 = C[g + 8, 2t], C[g + 8, 2t+1]

Needs numba-cuda (the ``cuda`` extra) and compute capability 8.0 or newer on a GPU.
"""

from __future__ import annotations

import os

import numba
from numba import cuda, int32, types

__all__ = ["MMA_SOURCE", "mma_s8", "linkable"]

MMA_SOURCE = os.path.join(os.path.dirname(__file__), "mma_s8_16x8x32.cu")
_SIGNATURE = types.UniTuple(int32, 4)(*([int32] * 10))


def _declare():
    try:
        return cuda.declare_device("outliers_mma_s8_16x8x32", _SIGNATURE, link=[MMA_SOURCE])
    except TypeError:  # Numba's deprecated built-in CUDA target: declare_device takes no link=
        return None


if numba.config.ENABLE_CUDASIM:
    import numpy as np

    # Where each element lives, from the PTX ISA's layout tables (restated per element, not per
    # lane as the kernels load them): (lane, register, byte) of A[r, k] and of B[k, c].
    _r, _k = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    _A_AT = ((_r % 8) * 4 + (_k % 16) // 4, (_r >= 8) + 2 * (_k >= 16), _k % 4)
    _k, _c = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")
    _B_AT = (_c * 4 + (_k % 16) // 4, 4 + (_k >= 16), _k % 4)

    @cuda.jit(device=True)
    def mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """Emulation: every lane publishes its 6 registers, then computes its 4 results."""
        regs = cuda.shared.array((1024, 6), int32)  # one row per thread of the block
        flat = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        regs[flat] = (a0, a1, a2, a3, b0, b1)
        cuda.syncthreads()
        warp0 = flat - flat % 32
        by = regs[warp0 : warp0 + 32].view(np.int8).reshape(32, 6, 4).astype(np.int64)  # little-endian bytes
        d = by[_A_AT] @ by[_B_AT]
        g, t = (flat % 32) // 4, flat % 4
        cuda.syncthreads()  # nobody overwrites regs before every lane has read them
        return (
            np.int32(c0 + d[g, 2 * t]),
            np.int32(c1 + d[g, 2 * t + 1]),
            np.int32(c2 + d[g + 8, 2 * t]),
            np.int32(c3 + d[g + 8, 2 * t + 1]),
        )

    def linkable() -> bool:
        return True
else:
    mma_s8 = _declare()

    def linkable() -> bool:
        """True where the CUDA C device function can be declared (numba-cuda is installed)."""
        return mma_s8 is not None
