"""Launchers: check torch tensors, wrap them without copies, do the grid math, return tensors.

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
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch
from numba import cuda

from . import mma
from .errors import KernelArgumentError
from .kernels import Kernels, gather_columns_kernel, outlier_columns_kernel
from .kernels import build as build_kernels
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

FLOATS = (torch.float32, torch.float16)
GEMMS = ("auto", "simt", "mma")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # written by the GEMM epilogue itself


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


def mma_supported(device: torch.device | None = None) -> str | None:
    """Return None where the tensor-core GEMM can run, else the reason it cannot."""
    if not mma.linkable():
        return "the tensor-core GEMM needs numba-cuda (pip install 'outliers[cuda]')"
    if simulated():
        return None  # runs the emulation of mma (see the mma module)
    if not available():
        return "no CUDA GPU"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 0):
        return f"the tensor-core GEMM needs compute capability 8.0 or newer, this GPU has {cc[0]}.{cc[1]}"
    return None


_VERIFIED: dict[tuple[str, TileConfig], bool] = {}


def mma_verified(device: torch.device | None = None, *, tiles: TileConfig | None = None) -> bool:
    """Whether the tensor-core GEMM gives exact int32 products on ``device``: checked once per device and tiles.

    ``gemm="auto"`` takes the tensor-core kernel only after this check passes; on a mismatch it
    warns once and keeps to the SIMT kernel. Probe shapes cover partial tiles in M, N and K.
    """
    tiles = _kernels(tiles).tiles
    dev = torch.device("cpu") if simulated() else torch.device(device if device is not None else "cuda")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (str(dev), tiles)
    if key not in _VERIFIED:
        g = torch.Generator().manual_seed(1234)
        m, k, n = tiles.mma_bm + 3, 4 * tiles.mma_k_words + 36, tiles.mma_bn + 5
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(dev)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(dev)
        want = (a.double() @ b.double().t()).to(torch.int32)  # exact: |sums| < 2**53
        where = f"{dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'simulator'})"
        try:
            got = _gemm(a, b, raw=True, gemm="mma", tiles=tiles)
            problem = None if torch.equal(got, want) else "gave wrong products"
        except Exception as e:  # e.g. no NVRTC/nvJitLink to build the linked CUDA C
            problem = f"could not run ({type(e).__name__}: {e})"
        _VERIFIED[key] = problem is None
        if problem:
            warnings.warn(
                f"the tensor-core int8 GEMM {problem} on {where}; gemm='auto' uses the SIMT "
                "kernel instead. Please report this.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _VERIFIED[key]


def pick_gemm(gemm: str, a: torch.Tensor, b: torch.Tensor, *, tiles: TileConfig | None = None) -> str:
    """Return the GEMM kernel ("simt" or "mma") that ``gemm`` means for int8 ``a @ b.T``."""
    if gemm not in GEMMS:
        raise KernelArgumentError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm == "simt":
        return gemm
    why = mma_supported(a.device)
    if why is None and a.shape[1] % 4:
        why = f"the tensor-core GEMM reads int8 in words of 4 along K, got K = {a.shape[1]}"
    if why is None and (a.storage_offset() % 4 or b.storage_offset() % 4):
        why = "a or b starts mid-word (a slice); its int32 view would need a copy"
    if gemm == "mma":
        if why:
            raise KernelArgumentError(f"gemm='mma' cannot run: {why}; use gemm='simt' or 'auto'")
        return gemm
    # auto: the simulator's mma emulation is slow, so simulated runs stay on SIMT unless asked
    return "mma" if why is None and not simulated() and mma_verified(a.device, tiles=tiles) else "simt"


def _gemm(
    a,
    b,
    *,
    row_stats=None,
    col_stats=None,
    bias=None,
    xo=None,
    wo=None,
    raw=False,
    gemm="auto",
    out_dtype=torch.float32,
    tiles=None,
):
    """Check, pick the kernel, launch. ``raw``: write the int32 accumulators (no epilogue, no stats)."""
    kernels = _kernels(tiles)
    tiles = kernels.tiles
    _check(a, "a", (torch.int8,), 2)
    _check(b, "b", (torch.int8,), 2)
    if a.shape[1] != b.shape[1]:
        raise KernelArgumentError(
            f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (b is the weight, stored (out, in))"
        )
    m, n = a.shape[0], b.shape[0]
    dev = a.device
    empty = torch.empty((0,), dtype=torch.float32, device=dev)
    if not raw:
        _check(row_stats, "row_stats", (torch.float32,), 1)
        _check(col_stats, "col_stats", (torch.float32,), 1)
        if row_stats.shape[0] != m or col_stats.shape[0] != n:
            raise KernelArgumentError(
                f"row_stats {tuple(row_stats.shape)} / col_stats {tuple(col_stats.shape)} "
                f"do not fit a ({m} rows) and b ({n} rows)"
            )
    if bias is not None:
        _check(bias, "bias", (torch.float32,), 1)
    xo = xo if xo is not None else torch.empty((m, 0), dtype=torch.float32, device=dev)
    wo = wo if wo is not None else torch.empty((n, 0), dtype=torch.float32, device=dev)
    _check(xo, "xo", (torch.float32,), 2)
    _check(wo, "wo", (torch.float32,), 2)
    if xo.shape[1] != wo.shape[1] or xo.shape[0] != m or wo.shape[0] != n:
        raise KernelArgumentError(f"outlier parts xo {tuple(xo.shape)} and wo {tuple(wo.shape)} do not fit ({m}, {n})")
    if out_dtype not in OUT_DTYPES:
        raise KernelArgumentError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")
    kernel = pick_gemm(gemm, a, b, tiles=tiles)
    out = torch.empty((m, n) if not raw else (0, 0), dtype=out_dtype, device=dev)
    has_bias = bias is not None
    bf16 = out_dtype == torch.bfloat16
    out_i32 = torch.empty((m, n) if raw else (0, 0), dtype=torch.int32, device=dev)
    if m and n:
        # the kernels' parameters after a and b, in order (kernels take no keywords)
        args = (
            _view(row_stats if row_stats is not None else empty),
            _view(col_stats if col_stats is not None else empty),
            _view(bias if has_bias else empty),
            has_bias,
            _view(xo),
            _view(wo),
            raw,
            bf16,
            _view(out.view(torch.int16) if bf16 else out),
            _view(out_i32),
        )
        if kernel == "mma":
            # zero-copy int32 views: each word holds four int8 along K
            grid = (math.ceil(n / tiles.mma_bn), math.ceil(m / tiles.mma_bm))
            _launch(
                kernels.int8_gemm_mma_kernel,
                grid,
                tiles.mma_threads,
                _view(a.view(torch.int32)),
                _view(b.view(torch.int32)),
                *args,
            )
        else:
            t = tiles.simt_tile
            _launch(
                kernels.int8_gemm_dequant_kernel,
                (math.ceil(n / t), math.ceil(m / t)),
                (t, t),
                _view(a),
                _view(b),
                *args,
            )
    return out_i32 if raw else out


def int8_matmul(
    a: torch.Tensor, b: torch.Tensor, gemm: str = "auto", *, tiles: TileConfig | None = None
) -> torch.Tensor:
    """Return the int32 ``a @ b.T`` of int8 ``a (m, k)`` and ``b (n, k)`` (the GEMM kernel, no epilogue).

    ``gemm``: "simt" (shared-memory tiles, any GPU), "mma" (int8 tensor cores, compute
    capability >= 8.0, K % 4 == 0) or "auto" (mma where it runs and passed ``mma_verified``).
    ``tiles``: the block and tile sizes (default ``default_tiles()``).
    """
    return _gemm(a, b, raw=True, gemm=gemm, tiles=tiles)


def int8_matmul_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: torch.Tensor | None = None,
    xo: torch.Tensor | None = None,
    wo: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    gemm: str = "auto",
    *,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """Return ``(a @ b.T) * row_stats ⊗ col_stats / 127² + bias + xo @ wo.T`` in one kernel.

    The epilogue computes in float32 and writes ``out_dtype`` (float32, float16 or
    bfloat16, rounded to nearest even as ``.to(out_dtype)`` would). ``gemm`` and ``tiles``
    as in ``int8_matmul``.
    """
    return _gemm(
        a,
        b,
        row_stats=row_stats,
        col_stats=col_stats,
        bias=bias,
        xo=xo,
        wo=wo,
        gemm=gemm,
        out_dtype=out_dtype,
        tiles=tiles,
    )


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
