"""Launchers of the row and column kernels, and ``llm_int8_linear``, which composes them with the GEMM.

``outlier_columns`` finds the columns holding an outlier, ``quantize_rows`` does
LLM.int8()'s vector-wise quantization (outlier columns left out of each row's absmax),
``gather_columns`` copies (and dequantizes) the outlier columns, and ``llm_int8_linear``
runs all of LLM.int8() for one linear layer: quantize, gather the outlier columns of
``x`` and of the weight, then the int8 GEMM (``gemm.py``) whose epilogue dequantizes and
adds the bias and the float outlier product.

How tensors reach the kernels (checks, no silent copies, bfloat16, the stream, the
simulator, ``tiles=``) is ``device.py``'s. This module re-exports the GEMM's names and
``device``'s public ones, so ``from cuda_kernels.launch import ...`` reaches every launcher.
"""

from __future__ import annotations

import math

import torch

from .device import _check, _floats, _kernels, _launch, _threshold, _view, available, default_tiles, simulated
from .errors import KernelArgumentError
from .gemm import GEMMS, int8_matmul, int8_matmul_dequant, mma_supported, mma_verified, pick_gemm
from .kernels import gather_columns_kernel, outlier_columns_kernel
from .tiles import PRODUCTION_TILES, SMALL_TILES, TileConfig

__all__ = [
    "simulated",
    "available",
    "default_tiles",
    "GEMMS",
    "pick_gemm",
    "mma_supported",
    "mma_verified",
    "outlier_columns",
    "quantize_rows",
    "gather_columns",
    "int8_matmul",
    "int8_matmul_dequant",
    "llm_int8_linear",
    "KernelArgumentError",
    "TileConfig",
    "PRODUCTION_TILES",
    "SMALL_TILES",
]


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return int64 indices of the columns of ``x (tokens, features)`` with any ``|x| >= threshold``."""
    t = _threshold(threshold)
    x = _floats(x, "x")
    return torch.nonzero(_outlier_flags(x, t)).view(-1)


def _outlier_flags(x: torch.Tensor, t: float) -> torch.Tensor:
    """uint8 flag per column of a checked ``x``: 1 where any ``|x| >= t`` (all 0 for t == 0)."""
    flags = torch.zeros(x.shape[1], dtype=torch.uint8, device=x.device)
    if t > 0 and x.numel():
        grid = (math.ceil(x.shape[0] / 16), math.ceil(x.shape[1] / 16))
        _launch(outlier_columns_kernel, grid, (16, 16), _view(x), t, _view(flags))
    return flags


def quantize_rows(
    x: torch.Tensor, threshold: float = 0.0, *, tiles: TileConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(codes int8, row_stats float32, outlier_cols)``: LLM.int8()'s vector-wise quantization.

    ``x``: float32 or float16 ``(rows, features)`` (bfloat16 is converted to float32).
    Columns holding any ``|x| >= threshold`` are left out of each row's absmax and get code 0.
    Also quantizes a weight per output channel with ``threshold=0``.
    """
    t = _threshold(threshold)
    kernels = _kernels(tiles)
    x = _floats(x, "x")
    rows, cols = x.shape
    flags = _outlier_flags(x, t)
    codes = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    row_stats = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _launch(
            kernels.quantize_rows_kernel,
            rows,
            kernels.tiles.quant_threads,
            _view(x),
            t,
            _view(flags),
            _view(codes),
            _view(row_stats),
        )
    return codes, row_stats, torch.nonzero(flags).view(-1)


def gather_columns(src: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Return float32 ``src[:, cols]`` (times ``scale[:, None] / 127`` when given: dequantized int8 rows)."""
    if src.dtype == torch.bfloat16:
        src = src.float()
    _check(src, "src", (torch.float32, torch.float16, torch.int8), 2)
    _check(cols, "cols", (torch.int64,), 1)
    out = torch.empty((src.shape[0], cols.numel()), dtype=torch.float32, device=src.device)
    if out.numel():
        sc = scale if scale is not None else torch.empty(1, dtype=torch.float32, device=src.device)
        _check(sc, "scale", (torch.float32,), 1)
        _launch(
            gather_columns_kernel,
            (math.ceil(out.shape[0] / 16), math.ceil(out.shape[1] / 16)),
            (16, 16),
            _view(src),
            _view(cols),
            _view(sc),
            scale is not None,
            _view(out),
        )
    return out


def llm_int8_linear(
    x: torch.Tensor,
    cb: torch.Tensor,
    scb: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    x_float: torch.Tensor | None = None,
    outlier_weight: torch.Tensor | None = None,
    gemm: str = "auto",
    out_dtype: torch.dtype = torch.float32,
    *,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(out, outlier_cols, row_stats)``: LLM.int8() of ``x @ W.T`` on the kernels.

    ``row_stats`` (X's per-row absmax without outliers) is NaN for rows holding NaN.

    Args:
        x: ``(tokens, in)`` float32/float16 (bfloat16 converted), the values quantized.
        cb, scb: int8 weight ``(out, in)`` and its per-channel absmax.
        bias: float32 ``(out,)`` or None.
        threshold: decomposition threshold (0: none).
        x_float: the values for the float outlier product (default ``x``).
        outlier_weight: float weight ``(out, in)`` for the outlier columns;
            None dequantizes them from ``cb`` (as bitsandbytes does).
        gemm: the GEMM kernel, as in ``int8_matmul``.
        out_dtype: float32, float16 or bfloat16, written by the GEMM's epilogue.
        tiles: the block and tile sizes (default ``default_tiles()``).
    """
    codes, row_stats, cols = quantize_rows(x, threshold, tiles=tiles)
    xo = wo = None
    if cols.numel():
        xo = gather_columns(x_float if x_float is not None else x, cols)
        wo = (
            gather_columns(outlier_weight.contiguous(), cols)
            if outlier_weight is not None
            else gather_columns(cb, cols, scb)
        )
    out = int8_matmul_dequant(codes, cb, row_stats, scb, bias, xo, wo, out_dtype=out_dtype, gemm=gemm, tiles=tiles)
    return out, cols, row_stats
