"""Where the kernels run and how torch tensors reach them: checks, zero-copy views, launches.

Tensors are handed to Numba through ``__cuda_array_interface__`` and kernels
run on torch's current CUDA stream. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, how the tests run without a GPU) CPU tensors are
accepted instead and passed as NumPy views.

Inputs are never copied silently: a non-contiguous tensor is refused with a
message saying to call ``.contiguous()``. bfloat16 is the exception, converted
to float32 first because Numba has no bfloat16 type (the docstring of each
launcher says so).

Tile and block sizes are a parameter: every launcher that runs a tiled kernel takes
``tiles=`` (a ``TileConfig``), by default ``default_tiles()``: ``PRODUCTION_TILES`` on a
GPU, ``SMALL_TILES`` under the simulator. Refused arguments raise ``KernelArgumentError``
(a ``ValueError``).

The launchers live in ``launch.py`` (rows and columns, ``llm_int8_linear``) and
``gemm.py`` (the int8 GEMM); both reach the GPU only through this module.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import cuda

from .errors import KernelArgumentError
from .kernels import Kernels
from .kernels import build as build_kernels
from .tiles import PRODUCTION_TILES, SMALL_TILES, TileConfig

__all__ = ["simulated", "available", "default_tiles"]

FLOATS = (torch.float32, torch.float16)


def simulated() -> bool:
    """True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 before numba was imported)."""
    return bool(numba.config.ENABLE_CUDASIM)


def available() -> bool:
    """True where these kernels can run on a real GPU."""
    return not simulated() and torch.cuda.is_available() and cuda.is_available()


def default_tiles() -> TileConfig:
    """The tiles a launcher uses when given none: ``SMALL_TILES`` under the simulator, else ``PRODUCTION_TILES``."""
    return SMALL_TILES if simulated() else PRODUCTION_TILES


def _kernels(tiles: TileConfig | None) -> Kernels:
    if tiles is None:
        tiles = default_tiles()
    if not isinstance(tiles, TileConfig):
        raise KernelArgumentError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
    return build_kernels(tiles)


def _check(t: torch.Tensor, name: str, dtypes: tuple, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if not simulated() and not t.is_cuda:
        raise KernelArgumentError(f"{name} must be a CUDA tensor, got one on {t.device}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.dim() != ndim:
        raise KernelArgumentError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise KernelArgumentError(f"{name} is not contiguous; call .contiguous() (no silent copies here)")


def _view(t: torch.Tensor):
    t = t.detach()
    return t.numpy() if simulated() else cuda.as_cuda_array(t)


def _launch(kernel, grid, block, *args) -> None:
    if simulated():
        kernel[grid, block](*args)
    else:
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        kernel[grid, block, stream](*args)


def _threshold(threshold: float) -> np.float32:
    t = float(threshold)
    if not t >= 0 or t == math.inf:
        raise KernelArgumentError(f"threshold must be >= 0 and finite, got {threshold!r}")
    # float32, as torch compares float32 tensors with a Python scalar (and as the CPU kernels do):
    # with a float64 threshold like 0.7, an x of float32(0.7) would not count as an outlier.
    return np.float32(t)


def _floats(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.bfloat16:  # Numba has no bfloat16: one conversion pass
        x = x.float()
    _check(x, name, FLOATS, 2)
    return x
