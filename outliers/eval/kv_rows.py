"""Rows of kind ``"kv-cache"``: the model scored with its key-value cache quantized (``outliers.quant.kv_cache``).

A row's ``options`` hold the cache format (``kv_cache``, e.g. ``int4-kivi``), the tokens kept in float
(``kv_keep``) and the Hadamard rotation (``kv_rotate``). The weights are the row's ``method`` after its
``transform``, as a ``"method"`` row makes them (``fp32``: the float model); the cache is quantized in a copy
of that model's module tree sharing its tensors, so the float reference on the same windows is never touched.
The facts recorded in the result's ``extra``: ``kv_cache``, ``kv_bits``, ``kv_keys``, ``kv_values``,
``kv_group``, ``kv_keep``, ``kv_rotate``, ``kv_scheme`` and ``kv_attention`` (the implementation wrapped).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError
from outliers.eval.rows import ROW_KINDS, Prepared, Row, RowKind, register_row_kind, row_label
from outliers.quant.kv_cache import KVQuant, parse_kv_spec, parse_kv_specs, quantized_kv_cache, shared_copy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

    from outliers.eval.rows import RowEvaluator

__all__ = ["KV_CACHE", "kv_quant_of", "kv_rows", "kv_row_label"]

KV_CACHE = "kv-cache"  # the row kind


def kv_quant_of(row: Row) -> KVQuant:
    """The cache quantization a ``"kv-cache"`` row names."""
    o = row.options
    return KVQuant(parse_kv_spec(o["kv_cache"]), int(o.get("kv_keep", 0)), bool(o.get("kv_rotate", False)))


@contextmanager
def _scored(model: nn.Module, kv: KVQuant, facts: dict[str, Any]) -> Iterator[None]:
    """The cache quantized around the scoring; the wrapped implementation into the facts; an error where the
    model ran no attention through it."""
    with quantized_kv_cache(model, kv) as stats:
        yield
    facts["kv_attention"] = stats.implementation
    if stats.calls == 0:
        raise InvalidArgumentError("the model ran no attention through the quantized cache: nothing was measured")


def _prepare(row: Row, ev: RowEvaluator) -> Prepared:
    kv = kv_quant_of(row)
    base = ROW_KINDS["method"].prepare(replace(row, kind="method", options={}), ev)
    model = shared_copy(base.model)  # its own config: the float reference keeps its attention
    facts = base.facts | kv.facts()
    return Prepared(
        model, compare=True, context=_scored(model, kv, facts), report=base.report, facts=facts, setup=base.setup
    )


def _label(row: Row, dtype: str) -> str:
    weights = row_label(replace(row, kind="method", options={}), dtype) if row.quantized or row.transform else None
    return kv_row_label(row, weights)


register_row_kind(
    RowKind(KV_CACHE, _prepare, "the key-value cache quantized inside attention, weights as a method", label=_label)
)


def kv_rows(text: str, rows: list[Row], *, keep: int = 0, rotate: bool = False) -> list[Row]:
    """The rows ``--kv-cache`` adds to the rows ``--method`` names: one per format, on the weights of the one
    ``--method`` row (fp32 when none is named), after it; a table starts from fp32.

    Raises:
        InvalidArgumentError: a bad format (``outliers.quant.kv_spec.parse_kv_spec``), a negative ``keep``,
            several ``--method`` rows (a cache row quantizes one set of weights), or rows of another kind.
    """
    specs = parse_kv_specs(text)
    KVQuant(specs[0], keep, rotate)  # checks keep before any model loads
    if other := sorted({r.kind for r in rows if r.kind != "method"}):
        raise InvalidArgumentError(
            f"--kv-cache quantizes the cache of a method's weights; it does not combine with {', '.join(other)} rows"
        )
    weights = [r for r in rows if r.quantized or r.transform]
    if len(weights) > 1:
        raise InvalidArgumentError(
            "--kv-cache quantizes the cache of one set of weights: give --method one method (or none), "
            f"not {len(weights)} rows"
        )
    base = weights[0] if weights else Row()
    options = {"kv_keep": keep, "kv_rotate": rotate}
    cache = [replace(base, kind=KV_CACHE, options={"kv_cache": s.name, **options}) for s in specs]
    out = [*weights, *cache]
    return out if len(out) == 1 else [Row(), *out]


def kv_row_label(row: Row, label_of_method: str | None = None) -> str:
    """``KV cache int4 KIVI (g32), 4 sinks kept``, after the weights' label where they are quantized."""
    kv = kv_quant_of(row).label
    return f"{label_of_method} + {kv}" if label_of_method else kv
