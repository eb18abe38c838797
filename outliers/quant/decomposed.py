"""How much of a decomposing model runs in float: the share of input columns LLM.int8() sends to the float matmul.

With the mixed-precision decomposition (Dettmers et al. 2022, §3.2; ``docs/protocols.md``),
each call of an ``Int8Linear`` whose method decomposes sends the columns of
its input ``X (tokens, in_features)`` that hold any ``|x| >= threshold``
through a float matmul (``outliers.quant.int8.outlier_columns``). The share of
such columns is what smoothing and rotation try to drive to zero: at 0 the
decomposition does nothing.

``float_columns(model)`` counts them while the block runs: every decomposing
layer reports the columns it found itself (``Int8Linear.count_float_columns``,
on its input as it quantizes it: float32, rounded to its ``round_to`` first),
so counting costs no second look at X. The layers stop reporting on every
exit path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from outliers.quant.linear import Int8Linear

__all__ = ["FloatColumns", "float_columns", "decomposing_layers"]


@dataclass
class FloatColumns:
    """Per decomposing layer: its forward calls and the sum over them of (float columns / in_features).

    ``share`` weighs every call of every layer alike: the mean over (layer, call) pairs of
    that call's fraction of columns, whatever the layer's width or the call's token count.
    """

    calls: dict[str, int] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)  # summed over the layer's calls

    def record(self, name: str, n_cols: int, in_features: int) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.fractions[name] = self.fractions.get(name, 0.0) + n_cols / in_features

    def layer_share(self, name: str) -> float:
        """The mean fraction of ``name``'s input columns sent through float per call."""
        return self.fractions[name] / self.calls[name]

    @property
    def n_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def share(self) -> float | None:
        """The mean over every (layer, call) of its fraction of float columns; None when nothing was called."""
        n = self.n_calls
        return sum(self.fractions.values()) / n if n else None


def decomposing_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    """The model's ``Int8Linear`` layers whose method decomposes (threshold 0 included: they send none)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear) and m.spec.decomposition]


@contextmanager
def float_columns(model: nn.Module) -> Iterator[FloatColumns]:
    """Yield a ``FloatColumns`` that counts, while the block runs, each decomposing layer's float columns.

    A model without decomposing layers (another method, or not quantized)
    yields an empty record (``share`` None). The layers' reporting is state on
    the modules: it is taken back when the block exits, by an exception too.
    """
    record = FloatColumns()
    layers = decomposing_layers(model)
    try:
        for name, m in layers:
            m.count_float_columns = partial(record.record, name)
        yield record
    finally:
        for _, m in layers:
            m.count_float_columns = None
