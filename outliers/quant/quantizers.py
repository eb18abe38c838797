"""Quantization building blocks: pure functions, tensor in, tensor out.

Conventions (Dettmers et al. 2022, §2; bitsandbytes' names):

absmax     ``q = round(x * 127 / absmax)`` in [-127, 127]; the stored statistic
           is ``absmax`` itself (bitsandbytes' ``row_stats`` / ``SCB``), so
           ``x̂ = q * absmax / 127``.
zeropoint  ``scale = 255 / (max - min)`` over a range widened to hold 0,
           ``zero = -128 - round(min * scale)``, ``q = clamp(round(x * scale) + zero)``
           in [-128, 127], ``x̂ = (q - zero) / scale``; 0.0 is exact.

Granularity is the ``dim`` argument: ``None`` is tensor-wise (one statistic),
``-1`` is row-wise (one per row of X = per token, or per output channel of a
weight stored ``(out, in)``). Vector-wise quantization of ``X @ W.T`` is X
row-wise and W row-wise (= per output channel).

Statistics are float32 whatever the input dtype; nothing here mutates its input.
"""

from __future__ import annotations

import torch

__all__ = [
    "quantize_absmax",
    "dequantize_absmax",
    "quantize_zeropoint",
    "dequantize_zeropoint",
    "int8_matmul",
    "absmax_matmul_dequant",
    "zeropoint_matmul_dequant",
    "INV_127_SQ",
]

INV_127_SQ = 1.0 / (127.0 * 127.0)


def _expand(stat: torch.Tensor, dim: int | None) -> torch.Tensor:
    return stat if dim is None else stat.unsqueeze(dim)


def quantize_absmax(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q, absmax)``: int8 codes in [-127, 127] and float32 absmax.

    Args:
        x: float tensor.
        dim: ``None`` for one absmax over the tensor, or the dimension to reduce
            (``-1``: one per row); ``absmax`` has that dimension removed.

    An all-zero slice gets absmax 0 and codes 0 (not NaN).
    """
    xf = x.float()
    absmax = xf.abs().amax() if dim is None else xf.abs().amax(dim)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(xf * _expand(scale, dim)).clamp_(-127, 127).to(torch.int8)
    return q, absmax


def dequantize_absmax(q: torch.Tensor, absmax: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Return float32 ``q * absmax / 127``; ``dim`` as given to ``quantize_absmax``."""
    return q.float() * (_expand(absmax, dim) / 127.0)


def quantize_zeropoint(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, scale, zero)``: int8 codes in [-128, 127], float32 scale, int32 zero point.

    The range is ``[min(x, 0), max(x, 0)]`` so that 0.0 maps to the integer
    ``zero`` exactly (padding and zeroed columns stay exactly zero).
    """
    xf = x.float()
    if dim is None:
        lo, hi = xf.min().clamp(max=0), xf.max().clamp(min=0)
    else:
        lo, hi = xf.amin(dim).clamp(max=0), xf.amax(dim).clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, 255.0 / span, torch.ones_like(span))
    zero = (-128 - torch.round(lo * scale)).to(torch.int32)
    q = (torch.round(xf * _expand(scale, dim)) + _expand(zero, dim)).clamp_(-128, 127).to(torch.int8)
    return q, scale, zero


def dequantize_zeropoint(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Return float32 ``(q - zero) / scale``."""
    return (q.to(torch.int32) - _expand(zero, dim)).float() / _expand(scale, dim)


def _cuda_int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # CUDA's cuBLASLt int8 path: m > 16, k and n multiples of 8.
    return a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return ``a @ b.T`` accumulated exactly in int32.

    Args:
        a: int8 ``(m, k)``.
        b: int8 ``(n, k)`` (a weight stored ``(out, in)``).

    On the CPU it runs on this machine's exact backend (``outliers.quant.gemm``: ``torch._int_mm``,
    chunked float32 or a Numba int16 kernel, chosen by measurement once per machine, or forced by
    ``$OUTLIERS_INT8_GEMM``); every backend gives the same int32 product. On CUDA,
    ``torch._int_mm`` where cuBLASLt's shape rules allow, else a float64 matmul (exact for int8
    products up to k ~ 5e11).

    Raises:
        ValueError: non-int8 operands or mismatched inner dimensions.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_matmul expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul expects (m, k) and (n, k), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device.type == "cpu" and b.device.type == "cpu":
        from outliers.quant.gemm import int8_gemm

        return int8_gemm(a, b)
    if _cuda_int_mm_ok(a, b):
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def absmax_matmul_dequant(
    c: torch.Tensor, x_absmax: torch.Tensor, w_absmax: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Return float32 ``c * x_absmax[:, None] * w_absmax[None, :] / 127² (+ bias)``.

    ``x_absmax`` is ``(m,)`` or a scalar, ``w_absmax`` ``(n,)`` or a scalar.
    """
    sx = x_absmax.reshape(-1, 1) if x_absmax.dim() else x_absmax
    out = c * (sx * INV_127_SQ)  # int32 * float32 -> float32, one pass
    out.mul_(w_absmax)
    if bias is not None:
        out.add_(bias)
    return out


def zeropoint_matmul_dequant(
    qx: torch.Tensor,
    sx: torch.Tensor,
    zx: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    zw: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return float32 ``X̂ @ Ŵ.T`` for zeropoint-quantized operands, corrected in int32.

    ``Σ_k (qx - zx)(qw - zw) = qx·qwᵀ - zw·Σqx - zx·Σqw + k·zx·zw``, every term
    int32 (no overflow below k = 33,000), then divided by ``sx * sw``.
    ``sx, zx`` are ``(m,)`` or scalars; ``sw, zw`` are ``(n,)`` or scalars.
    """
    k = qx.shape[1]
    zx_col = zx.reshape(-1, 1) if zx.dim() else zx
    c = int8_matmul(qx, qw)
    c -= qx.sum(1, dtype=torch.int32).unsqueeze(1) * zw
    c -= zx_col * qw.sum(1, dtype=torch.int32)
    c += k * zx_col * zw
    sx_col = sx.reshape(-1, 1) if sx.dim() else sx
    out = c / sx_col
    out.div_(sw)
    if bias is not None:
        out.add_(bias)
    return out
