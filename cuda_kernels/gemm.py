"""The int8 GEMM: int32 ``a @ b.T`` of int8 ``a (m, k)`` and ``b (n, k)``, and its dequantizing epilogue.

Two kernels compute it: ``gemm="simt"``, shared-memory tiles on any GPU, and
``gemm="mma"``, int8 tensor cores (compute capability >= 8.0, K % 4 == 0) through the
linked ``mma`` device function. ``gemm="auto"`` (``pick_gemm``) takes the tensor cores
only where they run and once ``mma_verified`` has found exact int32 products on that
device and tiling; it warns once and keeps to SIMT otherwise. The epilogue dequantizes
with the row and column statistics, adds the bias and the float outlier product, and
writes float32, float16 or bfloat16 in the same kernel.

Tensors reach the kernels as in ``device.py`` (checked, never copied, on torch's stream);
``tiles=`` picks the block and tile sizes (default ``default_tiles()``).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import mma
from .device import _check, _kernels, _launch, _view, available, simulated
from .errors import KernelArgumentError
from .tiles import TileConfig

__all__ = ["GEMMS", "pick_gemm", "mma_supported", "mma_verified", "int8_matmul", "int8_matmul_dequant"]

GEMMS = ("auto", "simt", "mma")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # written by the GEMM epilogue itself


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
