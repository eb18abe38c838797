"""The quantization methods: one frozen record each, in one registry.

The rows of Table 1 of Dettmers et al. 2022, "LLM.int8()" (arXiv 2208.07339).
A method says how X (the activations) and W (the weights) are quantized:

* its ``scheme``: absmax (symmetric, codes in [-127, 127]) or zeropoint
  (asymmetric, [-128, 127]; ``outliers.quant.quantizers``);
* the granularity of the statistics: one per ``tensor``, per ``row`` of X
  (a token), or per output ``channel`` of W;
* whether it uses the mixed-precision decomposition (feature columns of X
  holding any ``|x| >= threshold`` go through a float matmul).

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


class Scheme(StrEnum):
    ABSMAX = "absmax"
    ZEROPOINT = "zeropoint"


class Granularity(StrEnum):
    TENSOR = "tensor"  # one statistic for the whole tensor
    ROW = "row"  # one per row of X: per token
    CHANNEL = "channel"  # one per output channel of W (a row of W stored (out, in))

    @property
    def dim(self) -> int | None:
        """The ``dim`` argument of the quantizer functions: None for tensor-wise, -1 per row."""
        return None if self is Granularity.TENSOR else -1


@dataclass(frozen=True)
class Method:
    """One quantization method. ``label`` is its row name in tables and reports (the paper's wording)."""

    name: str
    label: str
    scheme: Scheme
    activations: Granularity
    weights: Granularity
    decomposition: bool = False
    settings: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # a method without a label would vanish from reports: refuse it when it is declared
        if not self.label:
            raise ValueError(f"method {self.name!r} needs a label")
        if self.activations is Granularity.CHANNEL or self.weights is Granularity.ROW:
            raise ValueError(f"method {self.name!r}: X is quantized per tensor or row, W per tensor or channel")
        extra = ("threshold", "outlier_weights") if self.decomposition else ()
        object.__setattr__(self, "settings", ("round_to", *extra))

    @property
    def x_dim(self) -> int | None:
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
_T, _R, _C = Granularity.TENSOR, Granularity.ROW, Granularity.CHANNEL
for _m in [
    Method("absmax", "int8 absmax", _A, _T, _T),
    Method("zeropoint", "int8 zeropoint", _Z, _T, _T),
    Method("absmax-row", "absmax row-wise", _A, _R, _T),
    Method("absmax-vector", "absmax vector-wise", _A, _R, _C),
    Method("zeropoint-vector", "zeropoint vector-wise", _Z, _R, _C),
    Method("absmax-row+decomp", "absmax row-wise + decomposition", _A, _R, _T, decomposition=True),
    Method("llm.int8", "absmax LLM.int8() (vector-wise + decomposition)", _A, _R, _C, decomposition=True),
    Method("zeropoint-llm.int8", "zeropoint LLM.int8()", _Z, _R, _C, decomposition=True),
]:
    register_method(_m)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def label(method: str) -> str:
    """Return the table label of a method name, ``"fp32"`` included."""
    return FLOAT_LABEL if method == "fp32" else get_method(method).label


_X_WORDS = {Granularity.TENSOR: "tensor", Granularity.ROW: "per token"}
_W_WORDS = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "per output channel"}


def method_table() -> str:
    """Return the README's method table (markdown), one row per registered method."""
    rows = ["| method | X | W | decomposition |", "|---|---|---|---|"]
    for m in METHODS.values():
        rows.append(
            f"| `{m.name}` | {_X_WORDS[m.activations]} | {_W_WORDS[m.weights]} | {'yes' if m.decomposition else 'no'} |"
        )
    return "\n".join(rows)
