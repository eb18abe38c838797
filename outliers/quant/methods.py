"""The quantization methods: one frozen record each, in one registry.

The rows of Table 1 of Dettmers et al. 2022, "LLM.int8()" (arXiv 2208.07339),
then two reference rows of later work: FP8 E4M3 W8A8 and W4A16 round-to-nearest.
A method says how X (the activations) and W (the weights) are quantized:

* its ``format``: ``int8`` codes (``Int8Linear``, real integer arithmetic),
  ``fp8-e4m3`` (emulated: ``outliers.quant.emulated.FP8Linear``) or ``int4``
  weights with X left in float (``W4A16Linear``), or a microscaling format
  (``mxfp8-e4m3`` ... ``mxint8``, ``nvfp4``: emulated, ``outliers.quant.mx.MXLinear``,
  X and W in blocks along the input dimension); the format picks the layer;
* its ``scheme``: absmax (symmetric; int8 codes in [-127, 127], FP8 scaled so
  that absmax lands on E4M3's 448) or zeropoint (asymmetric; int8 codes in
  [-128, 127], ``outliers.quant.quantizers``; int4 codes in [0, 15]);
* the granularity of the statistics: one per ``tensor``, per ``row`` of X
  (a token), per output ``channel`` of W, or per ``group`` of ``group_size``
  input columns of one output channel; ``activations=None`` leaves X in float;
* whether it uses the mixed-precision decomposition (feature columns of X
  holding any ``|x| >= threshold`` go through a float matmul; int8 only).

``Int8Linear``, ``quantize_model``, the CLI's ``--method`` choices, study
validation, report labels and the README's method table all read
``METHODS``; a method added with ``register_method`` is usable by all of
them. The settings a method takes follow from its record (``settings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from outliers.errors import InvalidArgumentError

__all__ = [
    "Format",
    "Scheme",
    "Granularity",
    "Method",
    "METHODS",
    "FLOAT_LABEL",
    "register_method",
    "get_method",
    "label",
    "method_table",
]


class Format(StrEnum):
    """The number format of the codes; it picks the layer (``outliers.quant.model.LAYERS``)."""

    INT8 = "int8"  # X and W in int8, int32 accumulation: Int8Linear
    FP8_E4M3 = "fp8-e4m3"  # X and W rounded through torch.float8_e4m3fn, float32 products: FP8Linear (emulated)
    INT4 = "int4"  # W in int4 groups, X in float: W4A16Linear (weight-only)
    # microscaling (OCP MX v1.0): elements with one E8M0 scale per block of 32 along K; NVFP4: E2M1 elements,
    # an E4M3 scale per block of 16 and a float32 one per tensor. All MXLinear (outliers.quant.mx), emulated
    MXFP8_E4M3 = "mxfp8-e4m3"
    MXFP8_E5M2 = "mxfp8-e5m2"
    MXFP6_E2M3 = "mxfp6-e2m3"
    MXFP6_E3M2 = "mxfp6-e3m2"
    MXFP4 = "mxfp4-e2m1"
    MXINT8 = "mxint8"
    NVFP4 = "nvfp4"


class Scheme(StrEnum):
    ABSMAX = "absmax"
    ZEROPOINT = "zeropoint"


class Granularity(StrEnum):
    TENSOR = "tensor"  # one statistic for the whole tensor
    ROW = "row"  # one per row of X: per token
    CHANNEL = "channel"  # one per output channel of W (a row of W stored (out, in))
    GROUP = "group"  # one per group of ``group_size`` input columns of one output channel of W (of X: of one token)

    @property
    def dim(self) -> int | None:
        """The ``dim`` argument of the quantizer functions: None for tensor-wise, -1 per row (groups: within a row)."""
        return None if self is Granularity.TENSOR else -1


_T, _R, _C, _G = Granularity.TENSOR, Granularity.ROW, Granularity.CHANNEL, Granularity.GROUP


@dataclass(frozen=True)
class _Supports:
    """What one format's layer implements; a record asking for more is refused when it is declared."""

    schemes: tuple[Scheme, ...]
    activations: tuple[Granularity | None, ...]
    weights: tuple[Granularity, ...]
    decomposition: bool
    block: int | None = None  # the block size a block format fixes (group_size must be it)


_MX_BLOCKS = {f: 32 for f in Format if f.value.startswith("mx")} | {Format.NVFP4: 16}
_SUPPORTS = {
    Format.INT8: _Supports((Scheme.ABSMAX, Scheme.ZEROPOINT), (_T, _R), (_T, _C), True),
    Format.FP8_E4M3: _Supports((Scheme.ABSMAX,), (_T, _R), (_T, _C), False),
    Format.INT4: _Supports((Scheme.ZEROPOINT,), (None,), (_G,), False),
} | {f: _Supports((Scheme.ABSMAX,), (_G, None), (_G,), False, block) for f, block in _MX_BLOCKS.items()}


def _shapes(ok: _Supports) -> str:
    """What a format quantizes, in words: "quantizes X per tensor or row, W per tensor or channel"."""
    w = " or ".join(g.value for g in ok.weights)
    if None in ok.activations:
        return f"leaves X in float and quantizes W per {w}"
    return f"quantizes X per {' or '.join(g.value for g in ok.activations if g is not None)}, W per {w}"


@dataclass(frozen=True)
class Method:
    """One quantization method. ``label`` is its row name in tables and reports (the paper's wording).

    ``activations=None`` leaves X in float (weight-only); ``group_size`` is
    set exactly when ``weights`` is ``Granularity.GROUP``. ``in_all=False``
    keeps a method out of ``--method all`` (the Table-1 layout and its
    reference rows): the microscaling rows are ``--method formats``.
    """

    name: str
    label: str
    scheme: Scheme
    activations: Granularity | None
    weights: Granularity
    decomposition: bool = False
    format: Format = Format.INT8
    group_size: int | None = None
    in_all: bool = True
    settings: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # a method without a label would vanish from reports: refuse it when it is declared
        if not self.label:
            raise ValueError(f"method {self.name!r} needs a label")
        ok = _SUPPORTS[self.format]
        if self.activations not in ok.activations or self.weights not in ok.weights:
            raise ValueError(f"method {self.name!r}: {self.format} {_shapes(ok)}")
        if self.scheme not in ok.schemes:
            raise ValueError(f"method {self.name!r}: {self.format} takes scheme {' or '.join(ok.schemes)}")
        if self.decomposition and not ok.decomposition:
            raise ValueError(f"method {self.name!r}: decomposition is int8 only")
        grouped = self.weights is Granularity.GROUP
        if grouped != (self.group_size is not None) or (self.group_size is not None and self.group_size < 1):
            raise ValueError(
                f"method {self.name!r}: group_size >= 1 goes with group-wise weights, got {self.group_size}"
            )
        if ok.block is not None and self.group_size != ok.block:
            raise ValueError(f"method {self.name!r}: {self.format} has blocks of {ok.block}, got {self.group_size}")
        extra = ("threshold", "outlier_weights") if self.decomposition else ()
        object.__setattr__(self, "settings", ("round_to", *extra))

    @property
    def x_dim(self) -> int | None:
        if self.activations is None:
            raise ValueError(f"method {self.name!r} leaves X in float: it has no X granularity")
        return self.activations.dim

    @property
    def w_dim(self) -> int | None:
        return self.weights.dim


METHODS: dict[str, Method] = {}
FLOAT_LABEL = "32-bit float"  # the unquantized baseline's row, method name "fp32"


def register_method(method: Method) -> Method:
    """Add a method to the registry; every consumer of ``METHODS`` sees it from then on."""
    if method.name in METHODS or method.name == "fp32":
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


_A, _Z = Scheme.ABSMAX, Scheme.ZEROPOINT
_FP8, _INT4 = Format.FP8_E4M3, Format.INT4
for _m in [
    Method("absmax", "int8 absmax", _A, _T, _T),
    Method("zeropoint", "int8 zeropoint", _Z, _T, _T),
    Method("absmax-row", "absmax row-wise", _A, _R, _T),
    Method("absmax-vector", "absmax vector-wise", _A, _R, _C),
    Method("zeropoint-vector", "zeropoint vector-wise", _Z, _R, _C),
    Method("absmax-row+decomp", "absmax row-wise + decomposition", _A, _R, _T, decomposition=True),
    Method("llm.int8", "absmax LLM.int8() (vector-wise + decomposition)", _A, _R, _C, decomposition=True),
    Method("zeropoint-llm.int8", "zeropoint LLM.int8()", _Z, _R, _C, decomposition=True),
    # reference rows of later work (after Table 1)
    Method("fp8-tensor", "FP8 E4M3 W8A8 per-tensor (emulated)", _A, _T, _T, format=_FP8),
    Method("fp8-token", "FP8 E4M3 W8A8 per-token X, per-channel W (emulated)", _A, _R, _C, format=_FP8),
    Method("w4a16-g128", "W4A16 RTN int4 g128 (weight-only)", _Z, None, _G, format=_INT4, group_size=128),
]:
    register_method(_m)

# microscaling and NVFP4 (emulated; outliers.quant.mx): not in ``--method all``, which keeps its rows
_F = Format
for _name, _label, _fmt, _x in [
    ("mxfp8", "MXFP8 E4M3 W8A8 (emulated)", _F.MXFP8_E4M3, _G),
    ("mxfp8-e5m2", "MXFP8 E5M2 W8A8 (emulated)", _F.MXFP8_E5M2, _G),
    ("mxfp6", "MXFP6 E2M3 W6A6 (emulated)", _F.MXFP6_E2M3, _G),
    ("mxfp6-e3m2", "MXFP6 E3M2 W6A6 (emulated)", _F.MXFP6_E3M2, _G),
    ("mxfp4", "MXFP4 W4A4 (emulated)", _F.MXFP4, _G),
    ("mxint8", "MXINT8 W8A8 (emulated)", _F.MXINT8, _G),
    ("nvfp4", "NVFP4 W4A4 (emulated)", _F.NVFP4, _G),
    ("mxfp4-w", "MXFP4 weight-only (emulated)", _F.MXFP4, None),
    ("nvfp4-w", "NVFP4 weight-only (emulated)", _F.NVFP4, None),
]:
    register_method(Method(_name, _label, _A, _x, _G, format=_fmt, group_size=_MX_BLOCKS[_fmt], in_all=False))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def label(method: str) -> str:
    """Return the table label of a method name, ``"fp32"`` included."""
    return FLOAT_LABEL if method == "fp32" else get_method(method).label


_FORMAT_WORDS = {
    Format.INT8: "int8",
    Format.FP8_E4M3: "FP8 E4M3, emulated",
    Format.INT4: "int4 weights, zeropoint",
    Format.MXFP8_E4M3: "MXFP8: E4M3, E8M0 scales, emulated",
    Format.MXFP8_E5M2: "MXFP8: E5M2, E8M0 scales, emulated",
    Format.MXFP6_E2M3: "MXFP6: E2M3, E8M0 scales, emulated",
    Format.MXFP6_E3M2: "MXFP6: E3M2, E8M0 scales, emulated",
    Format.MXFP4: "MXFP4: E2M1, E8M0 scales, emulated",
    Format.MXINT8: "MXINT8: int8, E8M0 scales, emulated",
    Format.NVFP4: "NVFP4: E2M1, E4M3 scales + float32 per tensor, emulated",
}
_X_WORDS = {Granularity.TENSOR: "tensor", Granularity.ROW: "per token", None: "float (not quantized)"}
_W_WORDS = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "per output channel"}


def _w_words(m: Method) -> str:
    if m.weights is Granularity.GROUP:
        kind = "blocks" if _SUPPORTS[m.format].block else "groups"
        return f"{kind} of {m.group_size} inputs per output channel"
    return _W_WORDS[m.weights]


def _x_words(m: Method) -> str:
    if m.activations is Granularity.GROUP:
        return f"blocks of {m.group_size} inputs per token"
    return _X_WORDS[m.activations]


def method_table() -> str:
    """Return the README's method table (markdown), one row per registered method."""
    rows = ["| method | format | X | W | decomposition |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        rows.append(
            f"| `{m.name}` | {_FORMAT_WORDS[m.format]} | {_x_words(m)} | {_w_words(m)} "
            f"| {'yes' if m.decomposition else 'no'} |"
        )
    return "\n".join(rows)
