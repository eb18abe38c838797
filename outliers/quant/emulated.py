"""FP8 E4M3 W8A8 and W4A16 round-to-nearest: drop-ins for ``nn.Linear`` / ``Conv1D`` that store codes, not floats.

Reference rows beside Table 1 (``outliers.quant.methods``), for readers who
compare int8 with what came after it. Both run in float32 on any device; the
codes are real (the weight memory is honest), the matmul is float32.

FP8 E4M3 W8A8 (emulated)
    E4M3 is OCP's FP8 ``fn`` variant, ``torch.float8_e4m3fn``: 1 sign, 4 exponent
    (bias 7), 3 mantissa bits, no infinities, NaN at ``S.1111.111``, largest
    finite 448, subnormals down to 2^-9. X and W are scaled so that their absmax
    lands on 448 (``s = 448 / max|·|``, one per tensor, or one per token of X and
    per output channel of W), clamped to ±448 (so nothing becomes NaN, whatever
    the cast does above 448) and rounded by the cast (round to nearest, ties to
    even; ``tests/quant/test_emulated.py`` checks it against every E4M3 value). The FP8
    values are multiplied and accumulated in float32 and then scaled back, as
    ``torch._scaled_mm`` computes on FP8 tensor cores (a product of two E4M3
    values is exact in float32; the sums round as float32 sums do).
    "Emulated": no FP8 arithmetic unit runs; the numbers are those of one.

W4A16 RTN (weight-only)
    GPTQ's round-to-nearest baseline (Frantar et al. 2022; ``quant.py``'s
    ``Quantizer`` with ``sym=False``), per group of ``group_size`` input columns
    of each output channel, as GPTQ's and AWQ's g128 rows: the range
    ``[min(w, 0), max(w, 0)]`` (an all-zero group takes [-1, 1]),
    ``scale = (max - min) / 15``, ``zero = round(-min / scale)``,
    ``q = clamp(round(w / scale) + zero, 0, 15)``, ``ŵ = scale * (q - zero)``.
    When ``in_features`` is not a multiple of ``group_size`` the last group is
    partial (its statistics over the columns it has). Codes are stored two per
    byte, scales float32, zero points uint8 (real kernels keep fp16 scales).
    X is not quantized; the product uses the dequantized weight in float32.

``round_to="float16"`` rounds X and W to fp16 before quantizing, as in
``Int8Linear``; for W4A16 that is the A16 of real kernels. NaN/inf in X raise
``NonFiniteInputError`` for FP8 (a NaN scale would hide them); W4A16 passes them
on as a float layer does.
"""

from __future__ import annotations

import math
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from outliers.arch.linear import weight_of
from outliers.errors import InvalidArgumentError
from outliers.quant.linear import ROUND_TO, NonFiniteInputError
from outliers.quant.methods import Format, Method, get_method

__all__ = [
    "E4M3_MAX",
    "round_to_e4m3",
    "quantize_fp8",
    "dequantize_fp8",
    "fp8_matmul_dequant",
    "quantize_rtn",
    "dequantize_rtn",
    "pack_int4",
    "unpack_int4",
    "EmulatedLinear",
    "FP8Linear",
    "W4A16Linear",
    "LAYERS",
]

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
_F32_MAX = torch.finfo(torch.float32).max


def _expand(stat: torch.Tensor, dim: int | None) -> torch.Tensor:
    return stat if dim is None else stat.unsqueeze(dim)


# ---------------------------------------------------------------- FP8, pure functions


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as ``float8_e4m3fn``: clamped to ±448, then rounded to nearest, ties to even."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q, absmax)``: ``float8_e4m3fn`` codes of ``x * 448 / absmax`` and float32 absmax.

    Args:
        x: float tensor.
        dim: ``None`` for one absmax over the tensor, or the dimension to reduce
            (``-1``: one per row); ``absmax`` has that dimension removed.

    An all-zero slice gets absmax 0 and codes 0; a NaN or inf in a slice makes
    its absmax non-finite (check it: the codes are then meaningless).
    """
    xf = x.float()
    absmax = xf.abs().amax() if dim is None else xf.abs().amax(dim)
    # clamped so that a subnormal absmax cannot give an infinite scale (0 * inf = NaN)
    scale = torch.where(absmax > 0, E4M3_MAX / absmax, torch.zeros_like(absmax)).clamp_(max=_F32_MAX)
    return round_to_e4m3(xf * _expand(scale, dim)), absmax


def dequantize_fp8(q: torch.Tensor, absmax: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Return float32 ``q * absmax / 448``; ``dim`` as given to ``quantize_fp8``."""
    return q.float() * (_expand(absmax, dim) / E4M3_MAX)


def fp8_matmul_dequant(
    qx: torch.Tensor,
    x_absmax: torch.Tensor,
    qw: torch.Tensor,
    w_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return float32 ``(qx @ qw.T) * x_absmax[:, None] / 448 * w_absmax[None, :] / 448 (+ bias)``.

    Args:
        qx: ``float8_e4m3fn`` ``(m, k)``.
        x_absmax: float32 ``(m,)`` or a scalar.
        qw: ``float8_e4m3fn`` ``(n, k)`` (a weight stored ``(out, in)``).
        w_absmax: float32 ``(n,)``, ``(1,)`` or a scalar.

    The FP8 values are multiplied and summed in float32, then scaled, as
    ``torch._scaled_mm`` does with ``scale_a = x_absmax / 448``, ``scale_b = w_absmax / 448``.
    """
    c = qx.float() @ qw.float().t()
    sx = x_absmax.reshape(-1, 1) if x_absmax.dim() else x_absmax
    c.mul_(sx / E4M3_MAX).mul_(w_absmax / E4M3_MAX)
    if bias is not None:
        c.add_(bias)
    return c


# ---------------------------------------------------------------- int4 RTN, pure functions


def quantize_rtn(w: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, scale, zero)``: uint8 codes ``(out, in)`` in [0, 2^bits - 1], float32 and uint8 ``(out, groups)``.

    GPTQ's asymmetric round-to-nearest per group of ``group_size`` columns of
    each row of ``w`` ``(out, in)``; ``groups = ceil(in / group_size)``, the last
    one partial when ``group_size`` does not divide ``in``.

    Raises:
        InvalidArgumentError: ``w`` not 2-D, ``group_size < 1`` or ``bits`` outside 1..8.
    """
    if w.dim() != 2:
        raise InvalidArgumentError(f"expected a weight of shape (out, in), got {tuple(w.shape)}")
    if group_size < 1 or not 1 <= bits <= 8:
        raise InvalidArgumentError(f"group_size must be >= 1 and bits in 1..8, got {group_size} and {bits}")
    out_f, in_f = w.shape
    groups = math.ceil(in_f / group_size)
    # zero padding leaves each group's range alone: the range always holds 0
    wg = F.pad(w.float(), (0, groups * group_size - in_f)).reshape(out_f, groups, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = lo.masked_fill(empty, -1.0), hi.masked_fill(empty, 1.0)
    maxq = 2**bits - 1
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return q.reshape(out_f, -1)[:, :in_f].to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_rtn(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return float32 ``scale * (q - zero)`` ``(out, in)``, each group's statistics over its columns."""
    in_f = q.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :in_f]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :in_f]
    return s * (q.float() - z)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Return uint8 ``(out, ceil(in / 2))``: column 2j in the low nibble, 2j + 1 in the high one."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Return the uint8 codes ``(out, in_features)`` that ``pack_int4`` packed."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


# ---------------------------------------------------------------- layers


class EmulatedLinear(nn.Module):
    """What the FP8 and W4A16 layers share: the method record, checks, float32 compute, the repr."""

    FORMAT: Format
    FORMATS: tuple[Format, ...] = ()  # the formats a class runs when it runs several (MXLinear); else (FORMAT,)
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str,
        *,
        bias: bool = True,
        name: str = "",
        round_to: str | None = None,
    ):
        super().__init__()
        self.spec: Method = get_method(method)
        runs = self.FORMATS or (self.FORMAT,)
        if self.spec.format not in runs:
            raise InvalidArgumentError(
                f"{type(self).__name__} runs {', '.join(runs)} methods; {method!r} is {self.spec.format}"
            )
        if round_to not in ROUND_TO:
            raise InvalidArgumentError(f"round_to must be one of {list(ROUND_TO)}, got {round_to!r}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.round_to, self.name = method, round_to, name
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, module: nn.Module, method: str, *, name: str = "", round_to: str | None = None) -> Self:
        """Return the layer quantized from an ``nn.Linear`` or ``Conv1D``; the float weight is not kept."""
        w = weight_of(module)
        out_f, in_f = w.shape
        bias = getattr(module, "bias", None)
        q = cls(in_f, out_f, method, bias=bias is not None, name=name, round_to=round_to).to(w.device)
        q._store(w.to(ROUND_TO[round_to]) if round_to else w)
        if bias is not None:
            q.bias = bias.detach().clone()
        return q

    def _store(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _forward_2d(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """Return the float32 weight ``(out, in)`` that the stored codes stand for."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = self.name or type(self).__name__
        if not x.dtype.is_floating_point:
            raise InvalidArgumentError(f"{who} expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"{who} expects inputs with {self.in_features} features, got shape {tuple(x.shape)}"
            )
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # emulation: float32 everywhere
        if self.round_to:
            x2 = x2.to(ROUND_TO[self.round_to]).float()
        bias = None if self.bias is None else self.bias.float()
        return self._forward_2d(x2, bias).to(dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}"
        s += f", {self._settings()}"
        if self.round_to:
            s += f", round_to={self.round_to!r}"
        return s + f", bias={self.bias is not None}"

    def _settings(self) -> str:
        raise NotImplementedError


class FP8Linear(EmulatedLinear):
    """``y = x @ W.T + b`` with X and W rounded to FP8 E4M3 (emulated; see the module docstring)."""

    FORMAT = Format.FP8_E4M3
    weight_q: torch.Tensor  # float8_e4m3fn codes, (out, in)
    weight_absmax: torch.Tensor  # float32, per output channel or one

    def __init__(self, in_features: int, out_features: int, method: str = "fp8-token", **kw):
        super().__init__(in_features, out_features, method, **kw)
        n_stats = 1 if self.spec.w_dim is None else out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_absmax", torch.zeros(n_stats, dtype=torch.float32))

    def _store(self, w: torch.Tensor) -> None:
        codes, absmax = quantize_fp8(w, self.spec.w_dim)
        self.weight_q.copy_(codes)
        self.weight_absmax.copy_(absmax.reshape(-1))

    def dequantized_weight(self) -> torch.Tensor:
        absmax = self.weight_absmax if self.spec.w_dim is not None else self.weight_absmax[0]
        return dequantize_fp8(self.weight_q, absmax, self.spec.w_dim)

    def _forward_2d(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        qx, x_absmax = quantize_fp8(x, self.spec.x_dim)
        if not bool(torch.isfinite(x_absmax).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteInputError(
                f"{bad} NaN/inf value(s) in the input of {self.name or 'FP8Linear'} ({self.method}); "
                "FP8 scaling would hide them"
            )
        return fp8_matmul_dequant(qx, x_absmax, self.weight_q, self.weight_absmax, bias)

    def _settings(self) -> str:
        assert self.spec.activations is not None  # FP8 methods quantize X (methods._SUPPORTS)
        return f"x={self.spec.activations.value!r}, w={self.spec.weights.value!r}"


class W4A16Linear(EmulatedLinear):
    """``y = x @ Ŵ.T + b`` with Ŵ from int4 group-wise RTN codes and X in float (see the module docstring)."""

    FORMAT = Format.INT4
    weight_packed: torch.Tensor  # uint8, two 4-bit codes per byte, (out, ceil(in / 2))
    weight_scale: torch.Tensor  # float32, (out, groups)
    weight_zero: torch.Tensor  # uint8 zero points in [0, 15], (out, groups)

    def __init__(self, in_features: int, out_features: int, method: str = "w4a16-g128", **kw):
        super().__init__(in_features, out_features, method, **kw)
        assert self.spec.group_size is not None  # int4 methods are group-wise (methods._SUPPORTS)
        self.group_size = self.spec.group_size
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=torch.float32))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8))

    def _store(self, w: torch.Tensor) -> None:
        q, scale, zero = quantize_rtn(w, self.group_size)
        self.weight_packed.copy_(pack_int4(q))
        self.weight_scale.copy_(scale)
        self.weight_zero.copy_(zero)

    def codes(self) -> torch.Tensor:
        """Return the uint8 codes ``(out, in)`` in [0, 15]."""
        return unpack_int4(self.weight_packed, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rtn(self.codes(), self.weight_scale, self.weight_zero, self.group_size)

    def _forward_2d(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), bias)

    def _settings(self) -> str:
        return f"group_size={self.group_size}"


LAYERS: dict[Format, type[EmulatedLinear]] = {Format.FP8_E4M3: FP8Linear, Format.INT4: W4A16Linear}
