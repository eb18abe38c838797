"""Microscaling (OCP MX v1.0) and NVFP4 formats, emulated: exact rounding to each element type, block scales, a layer.

Elements (one sign bit each; no infinities used, overflow saturates):

| element | bits | bias | largest | smallest subnormal; note |
|---|---|---|---|---|
| E4M3 | 1+4+3 | 7 | 448 | 2^-9; NaN at S.1111.111 (``fn``: no inf) |
| E5M2 | 1+5+2 | 15 | 57344 | 2^-16; inf and NaN at exponent 31 |
| E2M3 | 1+2+3 | 1 | 7.5 | 2^-3; no NaN, no inf (FP6) |
| E3M2 | 1+3+2 | 3 | 28 | 2^-4; no NaN, no inf (FP6) |
| E2M1 | 1+2+1 | 1 | 6 | 0.5; no NaN, no inf (FP4) |
| INT8 | 8 | - | 1.984375 | k * 2^-6 for k in [-127, 127] (Microsoft's microxcaling library) |

``round_element`` rounds float32 values onto an element's grid, normal and
subnormal, to nearest with ties to even, then saturates to ±largest (never
inf or NaN). It is written in torch from the grid itself, and
``tests/quant/test_mx.py`` checks it bit for bit against ml_dtypes
(``float8_e4m3fn``, ``float8_e5m2``, ``float6_e2m3fn``, ``float6_e3m2fn``,
``float4_e2m1fn``, whose casts overflow to NaN or inf, hence clamped first)
over every code, every midpoint between neighbouring codes (the ties) and
random values. A NaN raises ``NonFiniteInputError`` for the types without one.

MX scales (``mx_quantize``): one shared E8M0 scale ``2^s`` per block of 32
consecutive values along the last dimension (K: X's features, W's inputs), by
the spec's rule (section 6.3, "FLOOR"): ``s = floor(log2(max|block|)) - emax``,
``emax`` the element's largest exponent (E4M3 8, E5M2 15, E2M3 2, E3M2 4,
E2M1 2, INT8 0), clamped to E8M0's [-127, 127]; an all-zero block takes
``s = -127``. The elements are ``round_element(x / 2^s)``: the block's
maximum lands in ``[2^emax, 2^(emax+1))``, above the element's largest value
for some (E2M1: (6, 8)), which then saturate. A last block shorter than 32
(K not a multiple of it) takes its scale from the values it has.

NVFP4 (``nvfp4_quantize``): E2M1 elements in blocks of 16, a per-tensor
float32 scale ``t = amax_tensor / (448 * 6)`` and per block an E4M3 scale
``b = round_e4m3(clamp(amax_block / 6 / t, 2^-6, 448))``; the elements are
``round_e2m1(x * ((1 / t) / b))``, the value ``q * b * t``. The clamp below
at E4M3's smallest normal and the reciprocal are torchao's
(``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize``, as NVIDIA's
kernels compute it), so the two agree code for code (tested where torchao is
installed).

Emulated: the rounding is exact and the products of the rounded values are
computed in float32 (``F.linear`` on the dequantized X and W, whose values
float32 holds exactly), with float32 sums; no MX or FP4 unit runs, and
nothing here is faster than float32 (no speed claim). ``MXLinear`` stores
real codes: FP8 as ``float8_e4m3fn`` / ``float8_e5m2``, INT8 as int8, FP6 one
6-bit code per byte, FP4 two per byte; E8M0 scales as uint8 (exponent + 127),
NVFP4's block scales as ``float8_e4m3fn``. X is quantized at every call (the
per-tensor NVFP4 scale of X is that call's), W once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from outliers.errors import InvalidArgumentError
from outliers.quant.emulated import LAYERS, EmulatedLinear, pack_int4, unpack_int4
from outliers.quant.linear import NonFiniteInputError
from outliers.quant.methods import Format

__all__ = [
    "Element",
    "ELEMENTS",
    "FORMAT_ELEMENT",
    "MX_FORMATS",
    "MX_BLOCK",
    "NVFP4_BLOCK",
    "round_element",
    "code_values",
    "encode",
    "decode",
    "reference_round",
    "mx_quantize",
    "mx_dequantize",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "fake_quantize",
    "MXLinear",
]

MX_BLOCK, NVFP4_BLOCK = 32, 16
E8M0_MIN, E8M0_MAX = -127, 127  # E8M0's exponents (255 is NaN)


@dataclass(frozen=True)
class Element:
    """An element type: ``ebits`` exponent and ``mbits`` mantissa bits (INT8: 0 and its 6 fraction bits)."""

    name: str
    bits: int
    ebits: int
    mbits: int
    bias: int
    max: float
    emax: int  # floor(log2(max)): what the FLOOR rule subtracts
    has_nan: bool
    ml_dtype: str | None  # the ml_dtypes type of the same element, for the cross-check

    @property
    def is_int(self) -> bool:
        return self.ebits == 0

    @property
    def emin(self) -> int:
        """The smallest normal exponent; the subnormal quantum is ``2^(emin - mbits)``."""
        return 1 - self.bias


ELEMENTS: dict[str, Element] = {
    e.name: e
    for e in [
        Element("e4m3", 8, 4, 3, 7, 448.0, 8, True, "float8_e4m3fn"),
        Element("e5m2", 8, 5, 2, 15, 57344.0, 15, True, "float8_e5m2"),
        Element("e2m3", 6, 2, 3, 1, 7.5, 2, False, "float6_e2m3fn"),
        Element("e3m2", 6, 3, 2, 3, 28.0, 4, False, "float6_e3m2fn"),
        Element("e2m1", 4, 2, 1, 1, 6.0, 2, False, "float4_e2m1fn"),
        Element("int8", 8, 0, 6, 0, 127 / 64, 0, False, None),
    ]
}
FORMAT_ELEMENT: dict[Format, str] = {
    Format.MXFP8_E4M3: "e4m3",
    Format.MXFP8_E5M2: "e5m2",
    Format.MXFP6_E2M3: "e2m3",
    Format.MXFP6_E3M2: "e3m2",
    Format.MXFP4: "e2m1",
    Format.MXINT8: "int8",
    Format.NVFP4: "e2m1",
}
MX_FORMATS = tuple(FORMAT_ELEMENT)


def _element(element: str | Element) -> Element:
    if isinstance(element, Element):
        return element
    try:
        return ELEMENTS[element]
    except KeyError:
        raise InvalidArgumentError(f"unknown element type {element!r}; choose from {', '.join(ELEMENTS)}") from None


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** e`` in float32 for integer ``e`` in [-149, 127], built from the bits (subnormals too)."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    sub = (torch.ones_like(e) << (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e >= -126, normal, sub)


def _no_nan(x: torch.Tensor, el: Element, what: str) -> None:
    if not el.has_nan and bool(torch.isnan(x).any()):
        raise NonFiniteInputError(f"NaN in {what}: {el.name.upper()} has no NaN to round it to")


def round_element(x: torch.Tensor, element: str | Element, *, what: str = "the values") -> torch.Tensor:
    """Return float32 ``x`` rounded onto the element's grid (to nearest, ties to even) and saturated to ±max.

    Infinities saturate too; a NaN stays NaN for the FP8 types and raises for the others.

    Raises:
        NonFiniteInputError: a NaN where the element type has none.
    """
    el = _element(element)
    xf = x.float()
    _no_nan(xf, el, what)
    if el.is_int:
        step = 2.0**-el.mbits
        q = torch.round(xf / step) * step  # a power of two: the division and product are exact
    else:
        _, k = torch.frexp(xf)  # |x| = m * 2^k, m in [0.5, 1): floor(log2|x|) = k - 1
        quantum = _pow2((k - 1).clamp(min=el.emin) - el.mbits)
        q = torch.round(xf / quantum) * quantum
    return q.clamp(-el.max, el.max)


def code_values(element: str | Element) -> torch.Tensor:
    """Every code's value, float32 ``(2^bits,)`` indexed by the code (INT8: two's complement, -128 is -2)."""
    el = _element(element)
    c = torch.arange(2**el.bits, dtype=torch.int32)
    if el.is_int:
        return (c - 256 * (c >= 128)).float() * 2.0**-el.mbits
    sign = (c >> (el.ebits + el.mbits)) & 1
    field = (c >> el.mbits) & (2**el.ebits - 1)
    mant = (c & (2**el.mbits - 1)).float()
    mag = torch.where(
        field == 0,
        mant * 2.0 ** (el.emin - el.mbits),
        (1 + mant / 2**el.mbits) * _pow2(field - el.bias),
    )
    top = field == 2**el.ebits - 1
    if el.name == "e4m3":  # the fn variant: S.1111.111 is NaN, no infinities
        mag = torch.where(top & (mant == 7), float("nan"), mag)
    elif el.name == "e5m2":  # IEEE-like: exponent 31 is inf (mantissa 0) or NaN
        mag = torch.where(top, torch.where(mant == 0, float("inf"), float("nan")), mag)
    return torch.where(sign == 1, -mag, mag)


def encode(values: torch.Tensor, element: str | Element) -> torch.Tensor:
    """Return the uint8 codes of values already on a floating element's grid (``round_element``'s output)."""
    el = _element(element)
    if el.is_int:
        raise InvalidArgumentError("INT8 elements are stored as int8 k, not encoded")
    v = values.float()
    sign = torch.signbit(v).to(torch.int32)
    a = v.abs()
    _, k = torch.frexp(a)
    normal = a >= 2.0**el.emin
    field = torch.where(normal, k - 1 + el.bias, 0)
    frac = torch.where(normal, a / _pow2(k - 1) - 1, a / 2.0**el.emin)
    mant = torch.round(frac * 2**el.mbits).to(torch.int32)
    return ((sign << (el.ebits + el.mbits)) | (field << el.mbits) | mant).to(torch.uint8)


def decode(codes: torch.Tensor, element: str | Element) -> torch.Tensor:
    """Return float32 values of uint8 codes (``encode``'s inverse)."""
    return code_values(element).to(codes.device)[codes.long()]


def reference_round(x: torch.Tensor, element: str | Element) -> torch.Tensor:
    """ml_dtypes' rounding of ``x`` to the element type, clamped to ±max first, as float32: the cross-check."""
    import ml_dtypes
    import numpy as np

    el = _element(element)
    if el.ml_dtype is None:
        raise InvalidArgumentError(f"ml_dtypes has no {el.name} element")
    a = x.detach().float().clamp(-el.max, el.max).cpu().numpy()
    return torch.from_numpy(a.astype(getattr(ml_dtypes, el.ml_dtype)).astype(np.float32))


# ---------------------------------------------------------------- blocks and scales


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """``x`` ``(..., K)`` as ``(..., ceil(K / block_size), block_size)``, zero-padded (a zero changes no block max)."""
    if block_size < 1:
        raise InvalidArgumentError(f"block_size must be >= 1, got {block_size}")
    k = x.shape[-1]
    n = math.ceil(k / block_size)
    return F.pad(x, (0, n * block_size - k)).reshape(*x.shape[:-1], n, block_size), k


def _unblock(xb: torch.Tensor, k: int) -> torch.Tensor:
    return xb.reshape(*xb.shape[:-2], -1)[..., :k]


def _finite(amax: torch.Tensor, x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteInputError(f"{bad} NaN/inf value(s) in {what}: a block scale would hide them")


def mx_quantize(
    x: torch.Tensor, element: str | Element, block_size: int = MX_BLOCK, *, what: str = "the input"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q, s)``: float32 element values (``x``'s shape) and int32 E8M0 exponents ``(..., blocks)``.

    ``x ≈ q * 2^s`` per block of ``block_size`` along the last dimension, by the FLOOR rule (module docstring).

    Raises:
        NonFiniteInputError: NaN or inf in ``x``.
    """
    el = _element(element)
    xb, k = _blocks(x.float(), block_size)
    amax = xb.abs().amax(-1)
    _finite(amax, x, what)
    _, e = torch.frexp(amax)
    s = torch.where(amax > 0, e - 1 - el.emax, E8M0_MIN).clamp(E8M0_MIN, E8M0_MAX)
    q = round_element(xb * _pow2(-s).unsqueeze(-1), el)
    return _unblock(q, k), s


def mx_dequantize(q: torch.Tensor, s: torch.Tensor, block_size: int = MX_BLOCK) -> torch.Tensor:
    """Return float32 ``q * 2^s``, one ``s`` per block (``mx_quantize``'s inverse)."""
    qb, k = _blocks(q.float(), block_size)
    return _unblock(qb * _pow2(s).unsqueeze(-1), k)


def nvfp4_quantize(
    x: torch.Tensor, block_size: int = NVFP4_BLOCK, *, what: str = "the input"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, b, t)``: E2M1 values (``x``'s shape), float32 E4M3 block scales ``(..., blocks)``, a 0-d float32.

    ``x ≈ q * b * t`` (module docstring); an all-zero tensor takes ``t = 1``.

    Raises:
        NonFiniteInputError: NaN or inf in ``x``.
    """
    e4m3, e2m1 = ELEMENTS["e4m3"], ELEMENTS["e2m1"]
    xb, k = _blocks(x.float(), block_size)
    bmax = xb.abs().amax(-1)
    _finite(bmax, x, what)
    amax = bmax.amax() if bmax.numel() else torch.zeros(())
    t = torch.where(amax > 0, amax / (e4m3.max * e2m1.max), torch.ones_like(amax))
    b = round_element((bmax / e2m1.max / t).clamp(2.0**e4m3.emin, e4m3.max), e4m3)
    q = round_element(xb * ((1.0 / t) / b).unsqueeze(-1), e2m1)
    return _unblock(q, k), b, t


def nvfp4_dequantize(q: torch.Tensor, b: torch.Tensor, t: torch.Tensor, block_size: int = NVFP4_BLOCK) -> torch.Tensor:
    """Return float32 ``q * (b * t)`` (``nvfp4_quantize``'s inverse)."""
    qb, k = _blocks(q.float(), block_size)
    return _unblock(qb * (b * t).unsqueeze(-1), k)


def fake_quantize(x: torch.Tensor, fmt: Format | str, *, what: str = "the input") -> torch.Tensor:
    """Return float32 Q(x): ``x`` quantized to a microscaling format along its last dimension and dequantized."""
    fmt = Format(fmt)
    if fmt is Format.NVFP4:
        return nvfp4_dequantize(*nvfp4_quantize(x, what=what))
    if fmt not in FORMAT_ELEMENT:
        raise InvalidArgumentError(f"{fmt} is not a microscaling format; choose from {', '.join(MX_FORMATS)}")
    return mx_dequantize(*mx_quantize(x, FORMAT_ELEMENT[fmt], what=what))


# ---------------------------------------------------------------- storage and the layer

_FLOAT8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _storage_shape(el: Element, out_f: int, in_f: int) -> tuple[tuple[int, int], torch.dtype]:
    if el.name in _FLOAT8:
        return (out_f, in_f), _FLOAT8[el.name]
    if el.is_int:
        return (out_f, in_f), torch.int8
    return (out_f, (in_f + 1) // 2 if el.bits == 4 else in_f), torch.uint8


def _to_storage(q: torch.Tensor, el: Element) -> torch.Tensor:
    """Element values ``(out, in)`` as stored: FP8 dtypes, int8 k, FP6 codes, FP4 codes two per byte."""
    if el.name in _FLOAT8:
        return q.to(_FLOAT8[el.name])
    if el.is_int:
        return torch.round(q * 2**el.mbits).to(torch.int8)
    codes = encode(q, el)
    return pack_int4(codes) if el.bits == 4 else codes


def _from_storage(stored: torch.Tensor, el: Element, in_f: int) -> torch.Tensor:
    if el.name in _FLOAT8:
        return stored.float()
    if el.is_int:
        return stored.float() * 2.0**-el.mbits
    return decode(unpack_int4(stored, in_f) if el.bits == 4 else stored, el)


class MXLinear(EmulatedLinear):
    """``y = Q(x) @ Q(W).T + b`` in a microscaling format (MX or NVFP4; emulated, see the module docstring).

    W is quantized once, in blocks along its input dimension; X at every call in blocks along its last
    dimension, or left in float by a weight-only method (``mxfp4-w``, ``nvfp4-w``).
    """

    FORMATS = MX_FORMATS
    weight_q: torch.Tensor  # element codes (out, in); FP4 packed (out, ceil(in / 2))
    weight_scale: torch.Tensor  # E8M0 exponent + 127, uint8 (out, blocks); NVFP4: float8_e4m3fn (out, blocks)
    weight_tensor_scale: torch.Tensor  # NVFP4 only: float32 (1,)

    def __init__(self, in_features: int, out_features: int, method: str = "mxfp4", **kw: Any):
        super().__init__(in_features, out_features, method, **kw)
        assert self.spec.group_size is not None  # block formats are group-wise (methods._SUPPORTS)
        self.block_size = self.spec.group_size
        self.element = ELEMENTS[FORMAT_ELEMENT[self.spec.format]]
        self.nvfp4 = self.spec.format is Format.NVFP4
        shape, dtype = _storage_shape(self.element, out_features, in_features)
        blocks = math.ceil(in_features / self.block_size)
        self.register_buffer("weight_q", torch.zeros(shape, dtype=dtype))
        scale_dtype = torch.float8_e4m3fn if self.nvfp4 else torch.uint8
        self.register_buffer("weight_scale", torch.zeros(out_features, blocks, dtype=scale_dtype))
        if self.nvfp4:
            self.register_buffer("weight_tensor_scale", torch.ones(1))

    def _store(self, w: torch.Tensor) -> None:
        what = f"the weight of {self.name or 'MXLinear'}"
        if self.nvfp4:
            q, b, t = nvfp4_quantize(w, self.block_size, what=what)
            self.weight_scale.copy_(b.to(torch.float8_e4m3fn))
            self.weight_tensor_scale.copy_(t.reshape(1))
        else:
            q, s = mx_quantize(w, self.element, self.block_size, what=what)
            self.weight_scale.copy_((s - E8M0_MIN).to(torch.uint8))
        self.weight_q.copy_(_to_storage(q, self.element))

    def dequantized_weight(self) -> torch.Tensor:
        q = _from_storage(self.weight_q, self.element, self.in_features)
        if self.nvfp4:
            return nvfp4_dequantize(q, self.weight_scale.float(), self.weight_tensor_scale[0], self.block_size)
        return mx_dequantize(q, self.weight_scale.to(torch.int32) + E8M0_MIN, self.block_size)

    def _forward_2d(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.spec.activations is not None:
            x = fake_quantize(x, self.spec.format, what=f"the input of {self.name or 'MXLinear'} ({self.method})")
        return F.linear(x, self.dequantized_weight(), bias)

    def _settings(self) -> str:
        x = "float" if self.spec.activations is None else "blocks"
        return f"element={self.element.name!r}, block_size={self.block_size}, x={x!r}"


LAYERS.update(dict.fromkeys(MX_FORMATS, MXLinear))
