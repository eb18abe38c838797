"""The row evaluator: one recipe for scoring a model, changed one way per row, against the float model.

A *row* is one thing to score on the same windows as the float model: a
quantization method at a threshold after a transform, with its options (the
skip list, the outlier columns' weights, the rounding). ``outliers eval``, the
study's perplexity measure and ``benchmarks/eval_speed.py`` all evaluate rows
here, so the recipe exists once:

- at most one transformed copy and one quantized copy are held at a time, and
  held across calls (a study's cells arrive one by one);
- a held quantized copy is re-thresholded (``set_threshold``: the weights'
  int8 codes do not depend on the threshold) instead of quantized again;
- the float model's final hidden states are kept per batch, so the reference
  runs once for all rows;
- calibration stays off the evaluated tokens by one rule
  (``outliers.eval.windows.evaluated_tokens``);
- set-up (making a transformed or quantized copy) is timed apart from scoring.

Kinds of row are a registry (``ROW_KINDS``). A kind turns a row into what is
scored (``Prepared``): a model, whether it is compared with the float model,
a context entered around the scoring (a quantized key cache, a causal edit),
tokens put before every window and left unscored, and the facts to record.
Adding a kind is one ``register_row_kind`` call in the module that defines
it; nothing here or in the callers changes
(``tests/eval/test_rows.py`` adds a toy kind).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from outliers.errors import CorpusError, InvalidArgumentError
from outliers.eval.perplexity import perplexity
from outliers.eval.result import PerplexityResult
from outliers.eval.windows import PerplexitySettings, evaluated_tokens
from outliers.quant.transform_spec import Transform, parse_row

__all__ = [
    "Row",
    "RowResult",
    "Prepared",
    "RowKind",
    "ROW_KINDS",
    "register_row_kind",
    "RowEvaluator",
    "evaluate_rows",
    "parse_rows",
    "FORMAT_ROWS",
    "row_label",
    "method_names",
    "describe_gemm",
    "calibratable",
]


@dataclass(frozen=True)
class Row:
    """One row: what to do to the float model before scoring it.

    ``method`` is ``"fp32"`` (the model as loaded) or a registered method
    (``outliers.quant.methods``); ``transform`` acts on the float model first.
    ``skip``: the modules never quantized (None: the architecture's, which keep
    the output head in float; ``outliers.arch.registry.quantize_skip``).
    ``kind`` names the ``RowKind`` that prepares it; ``options`` carries what a
    kind other than the built-in one needs.
    """

    method: str = "fp32"
    transform: Transform = field(default_factory=Transform)
    threshold: float = 6.0
    outlier_weights: str = "int8"
    round_to: str | None = None
    skip: tuple[str, ...] | None = None
    kind: str = "method"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.method != "fp32"


@dataclass
class Prepared:
    """What a row kind hands the evaluator: the model to score and how.

    ``compare``: score against the float model on the same windows (paired
    change, KL, top-1). ``context`` is entered around the scoring and left
    after it, whatever happens. ``facts`` go into the result's ``extra``;
    ``setup`` holds one-time costs in seconds, reported apart from scoring.
    ``prefix``: token ids the row puts before every window, left unscored; the reference reads the windows
    as they are, or after the same prefix with ``reference_prefix`` (the row is then compared with the
    float model given the same prefix).
    """

    model: nn.Module
    compare: bool
    context: AbstractContextManager[Any] = field(default_factory=nullcontext)
    report: Any = None  # outliers.quant.model.QuantReport where the row quantized
    facts: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, float] = field(default_factory=dict)
    prefix: torch.Tensor | None = None
    reference_prefix: bool = False


@dataclass(frozen=True)
class RowKind:
    """A kind of row: ``prepare(row, evaluator)`` returns what to score; ``label(row, dtype)`` its name in a
    table (None: the method's, as ``row_label`` makes it); ``parse(name, transform, options)`` the row a
    ``--method`` name stands for when the kind claims it, else None (``parse_rows``)."""

    name: str
    prepare: Callable[[Row, RowEvaluator], Prepared]
    doc: str = ""
    label: Callable[[Row, str], str] | None = None
    parse: Callable[[str, Transform, dict[str, Any]], Row | None] | None = None


_KINDS: dict[str, RowKind] = {}
ROW_KINDS: Mapping[str, RowKind] = MappingProxyType(_KINDS)


def register_row_kind(kind: RowKind) -> RowKind:
    """Add a kind of row; a ``Row(kind=kind.name)`` is then evaluated by it everywhere.

    Raises:
        ValueError: the name is taken.
    """
    if kind.name in _KINDS:
        raise ValueError(f"row kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


@dataclass
class RowResult:
    """One row's perplexity result and what was done to get it.

    ``result.extra`` holds the transform's record (settings, calibration
    tokens, Hadamard constructions) and the kind's facts;
    ``float_columns_pct`` is the mean share of input columns a decomposing
    method sent through float (None for other rows); ``int8_gemm`` names the
    exact CPU int8 product the row ran on (None where it ran none).
    """

    row: Row
    result: PerplexityResult
    report: Any = None
    setup: dict[str, float] = field(default_factory=dict)
    float_columns_pct: float | None = None
    float_columns_calls: int = 0
    int8_gemm: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """What the row was, for its result's ``extra``: the quantization (none for an unquantized row), set-up
        seconds, the int8 GEMM it ran on and the share of columns it sent through float, where there are."""
        out = self.quant_fields() | self.setup
        if self.int8_gemm:
            out["int8_gemm"] = self.int8_gemm
        if self.float_columns_pct is not None:
            out["float_columns_pct"] = self.float_columns_pct
        return out

    def quant_fields(self) -> dict[str, Any]:
        """The quantization's record; {} for an unquantized row."""
        r = self.report
        if r is None:
            return {}
        return dict(
            threshold=r.threshold,
            outlier_weights=r.outlier_weights,
            round_to=self.row.round_to,
            replaced=len(r.replaced),
            skipped=r.skipped,
            weight_bytes_before=r.bytes_before,
            weight_bytes_after=r.bytes_after,
        )


class RowEvaluator:
    """Scores rows of one float model on one text, holding copies and the reference's states across calls.

    Args:
        model: the float model, left unchanged.
        ids: the evaluated text's token ids.
        settings: how windows are cut and batched.
        bos_token_id: the BOS id, for ``bos="window"``.
        calib_ids: calibration text for smoothing when it is another text; None: the evaluated text
            itself, read only after the tokens evaluation reads.
        keep_reference: keep the float model's final states per batch for the next rows (off for a
            single row: nothing would reuse them).
        place: where a model is put before it runs (``outliers.models.dispatch``); identity by default.
        progress, model_name, corpus_name: as ``perplexity`` takes them.
    """

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        settings: PerplexitySettings,
        *,
        bos_token_id: int | None = None,
        calib_ids: torch.Tensor | None = None,
        keep_reference: bool = True,
        place: Callable[[nn.Module], nn.Module] | None = None,
        progress: bool = True,
        model_name: str | None = None,
        corpus_name: str = "",
    ):
        self.model, self.ids, self.settings = model, ids, settings
        self.bos_token_id = bos_token_id
        self.calib_ids = ids if calib_ids is None else calib_ids
        self.reserved = evaluated_tokens(ids, settings, bos_token_id) if calib_ids is None else 0
        self.reference_states: dict | None = {} if keep_reference else None
        self.place = place or (lambda m: m)
        self.progress, self.model_name, self.corpus_name = progress, model_name, corpus_name
        self.held: dict[str, tuple] = {}  # "transformed", "quantized": one copy each at a time

    # -------------------------------------------------------------- held copies

    def transformed(self, transform: Transform) -> tuple[nn.Module, dict[str, Any], dict[str, float]]:
        """The float model after ``transform`` (the model itself for none), its record and what making it cost."""
        if not transform:
            return self.model, {}, {}
        held, setup = self.held.get("transformed"), {}
        if held is None or held[0] != transform:
            from outliers.quant.calibration import transformed_copy

            self.held.pop("transformed", None)  # the last copy goes before the next is made,
            self.held.pop("quantized", None)  # with any quantized copy of it
            started = time.perf_counter()
            copy, info = transformed_copy(
                self.model,
                transform,
                self.calib_ids,
                window=self.settings.window,
                reserved=self.reserved,
                batch_size=self.settings.batch_size,
            )
            setup["transform_seconds"] = time.perf_counter() - started
            self.held["transformed"] = held = (transform, copy, info)
        return held[1], dict(held[2]), setup

    def quantized(self, source: nn.Module, row: Row) -> tuple[nn.Module, Any, dict[str, float]]:
        """``source`` quantized as ``row`` says: made once per (source, method, options), then re-thresholded."""
        from outliers.quant.model import quantized_copy, set_threshold

        key = (row.method, row.outlier_weights, row.round_to, row.skip)
        held, setup = self.held.get("quantized"), {}
        if held is None or held[0] is not source or held[1] != key:
            self.held.pop("quantized", None)  # the last copy goes before the next is made
            started = time.perf_counter()
            copy, report = quantized_copy(
                source,
                row.method,
                row.threshold,
                skip=row.skip,
                outlier_weights=row.outlier_weights,
                round_to=row.round_to,
            )
            setup["quantize_seconds"] = time.perf_counter() - started
            held = (source, key, copy, report)
        copy, report = held[2], set_threshold(held[2], held[3], row.threshold)
        self.held["quantized"] = (source, key, copy, report)
        return copy, report, setup

    def release(self) -> None:
        """Drop the held copies and the reference's states."""
        self.held.clear()
        if self.reference_states is not None:
            self.reference_states.clear()

    # -------------------------------------------------------------- scoring

    def prepare(self, row: Row) -> Prepared:
        """What ``row`` scores, made by its kind (a held copy: keep a reference to keep it past the next row)."""
        try:
            kind = ROW_KINDS[row.kind]
        except KeyError:
            raise InvalidArgumentError(f"unknown row kind {row.kind!r}; choose from {', '.join(ROW_KINDS)}") from None
        return kind.prepare(row, self)

    def evaluate(self, row: Row) -> RowResult:
        """Score one row; its kind prepares the model, the evaluator scores it against the float model."""
        from outliers.quant.decomposed import float_columns

        prepared = self.prepare(row)
        reference = self.place(self.model) if prepared.compare else None
        target = self.place(prepared.model)
        with prepared.context, float_columns(prepared.model) as columns:
            result = perplexity(
                target,
                self.ids,
                self.settings,
                bos_token_id=self.bos_token_id,
                reference=reference,
                reference_states=self.reference_states,
                progress=self.progress,
                model_name=self.model_name,
                corpus_name=self.corpus_name,
                method=row.method if row.quantized else None,
                prefix_ids=prepared.prefix,
                reference_prefix_ids=prepared.prefix if prepared.reference_prefix else None,
            )
        result.extra.update(prepared.facts)
        gemm = None
        if prepared.report is not None and _on_cpu(target):
            from outliers.quant.gemm import record

            gemm = record()
        return RowResult(
            row,
            result,
            prepared.report,
            prepared.setup,
            None if columns.share is None else 100 * columns.share,
            columns.n_calls,
            gemm,
        )


def describe_gemm() -> str:
    """Which exact int8 GEMM quantized rows run on here, in words: a set-up fact, not a result."""
    from outliers.quant.gemm import describe_choice

    return describe_choice()


def _on_cpu(model: nn.Module) -> bool:
    first = next(iter(model.parameters()), None)
    return first is None or first.device.type == "cpu"


def _prepare_method(row: Row, ev: RowEvaluator) -> Prepared:
    """The built-in kind: the float model, after a transform, quantized by a method (or not: ``fp32``)."""
    source, applied, setup = ev.transformed(row.transform)
    target, report = source, None
    if row.quantized:
        target, report, made = ev.quantized(source, row)
        setup |= made
    return Prepared(
        target, compare=report is not None or bool(row.transform), report=report, facts=applied, setup=setup
    )


register_row_kind(RowKind("method", _prepare_method, "a quantization method after a transform, or the float model"))


def evaluate_rows(
    model: nn.Module,
    ids: torch.Tensor,
    settings: PerplexitySettings,
    rows: list[Row],
    **kwargs: Any,
) -> list[RowResult]:
    """Score each row against the float model on the same windows; one result per row, in order.

    The float model's states are kept for the next rows only when there is more than one;
    ``kwargs`` are ``RowEvaluator``'s.
    """
    kwargs.setdefault("keep_reference", len(rows) > 1)
    ev = RowEvaluator(model, ids, settings, **kwargs)
    try:
        return [ev.evaluate(r) for r in rows]
    finally:
        ev.release()


# ------------------------------------------------------------------ rows from names


def method_names() -> list[str]:
    """The registered quantization methods' names, for help texts."""
    from outliers.quant.methods import METHODS

    return list(METHODS)


# ``--method formats``: MX and NVFP4 (``outliers.quant.mx``), W and A, then weight-only; not in ``all``
FORMAT_ROWS = ("mxfp8", "mxint8", "mxfp6", "mxfp4", "nvfp4", "mxfp4-w", "nvfp4-w")


def parse_rows(method: str, transform: Transform | None = None, **options: Any) -> list[Row]:
    """The rows ``outliers eval --method`` names: one, a comma-separated list, or ``all`` (Table 1).

    ``all``: the float model, every registered method after ``transform``, and a SmoothQuant row
    (absmax vector-wise after smoothing) unless ``transform`` smooths already. A list without
    ``fp32`` starts from it. ``options`` (threshold, outlier_weights, round_to, skip) apply to every row.
    ``formats``: the float model and the microscaling rows (``FORMAT_ROWS``) after ``transform``.
    A name a registered kind claims (``RowKind.parse``: ``static-minmax`` once ``outliers.eval.static_rows``
    is imported) is that kind's row.

    Raises:
        InvalidArgumentError: an unknown method, or a transform given both in a name and by flags.
    """
    from outliers.quant.methods import METHODS, get_method

    transform = Transform() if transform is None else transform  # an empty one is falsy but carries settings
    smoothquant = ("absmax-vector", replace(transform, smooth=0.5 if transform.smooth is None else transform.smooth))
    pairs: list[Row | tuple[str, Transform]]
    if method == "all":  # the methods that are in_all: the microscaling rows are "formats"
        pairs = [("fp32", Transform()), *((m, transform) for m, spec in METHODS.items() if spec.in_all)]
        pairs += [smoothquant] if transform.smooth is None else []
    elif method == "formats":
        pairs = [("fp32", Transform()), *((m, transform) for m in FORMAT_ROWS)]
    else:
        names = [n.strip() for n in method.split(",") if n.strip()]
        if transform and any("@" in n for n in names):
            raise InvalidArgumentError("give a transform in the row name (llm.int8@hadamard) or by flags, not both")
        pairs = [
            claimed
            if (claimed := _claimed(n, transform, options)) is not None
            else smoothquant
            if n == "smoothquant"
            else parse_row(n, seed=transform.seed, calib_windows=transform.calib_windows)
            if "@" in n
            else (n, transform)
            for n in names
        ]
        if len(names) > 1 and "fp32" not in names:
            pairs.insert(0, ("fp32", Transform()))  # a table starts from its baseline, the float model as it is
    for p in pairs:
        if not isinstance(p, Row) and p[0] != "fp32":
            get_method(p[0])
    if "threshold" in options:  # checked before any model loads
        from outliers.quant.int8 import check_threshold

        check_threshold(options["threshold"])
    return [p if isinstance(p, Row) else Row(p[0], p[1], **options) for p in pairs]


def _claimed(name: str, transform: Transform, options: dict[str, Any]) -> Row | None:
    """The row a kind other than the built-in one makes of a ``--method`` name (``RowKind.parse``), or None."""
    for kind in _KINDS.values():
        if kind.parse is not None and (row := kind.parse(name, transform, options)) is not None:
            return row
    return None


def calibratable(rows: list[Row], ev: RowEvaluator, *, optional: bool) -> tuple[list[Row], list[str]]:
    """The rows whose smoothing can calibrate apart from the evaluated tokens, checked before any is scored.

    ``optional``: a row that cannot is left out with a note (the SmoothQuant row ``all`` adds);
    else its ``CorpusError`` is raised before the first row runs. Returns the rows kept and the notes.
    """
    from outliers.quant.calibration import calibration_windows

    kept, notes = [], []
    for row in rows:
        if row.transform.smooth is not None:
            try:
                calibration_windows(ev.calib_ids, ev.settings.window, row.transform.calib_windows, reserved=ev.reserved)
            except CorpusError as e:
                if not optional:
                    raise CorpusError(f"{e}; or evaluate fewer tokens (--max-windows)") from None
                notes.append(f"no SmoothQuant row: {e}; or evaluate fewer tokens (--max-windows)")
                continue
        kept.append(row)
    return kept, notes


_FLOAT_LABELS = {"bf16": "bfloat16", "fp16": "16-bit float"}  # the unquantized row of a model loaded so


def row_label(row: Row, dtype: str = "fp32") -> str:
    """A row's name in a table: its method's label and the transform before it (``... after smooth 0.5``);
    the unquantized row names the dtype the model was loaded in."""
    from outliers.quant.methods import label

    own = ROW_KINDS[row.kind].label if row.kind in ROW_KINDS else None
    if own is not None:
        return own(row, dtype)
    t = row.transform
    if row.method == "absmax-vector" and t.smooth is not None and not t.rotate:
        return f"SmoothQuant (smooth {t.smooth:g}, absmax vector-wise)"
    base = _FLOAT_LABELS.get(dtype, label(row.method)) if row.method == "fp32" else label(row.method)
    return base + (f" after {t.label}" if t else "")
