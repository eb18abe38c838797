"""The measures a study can take: one frozen record each, in one registry.

A measure is one module (``perplexity``, ``outliers``, ``sinks``, ``superweights``, ``range``, ``sensitivity``,
``weights``, ``kvcache``, ``lifecycle``; ``profile`` registers the cells of ``outliers profile``) declaring

* its ``settings``: the ``[study]`` keys it accepts, with their types and
  defaults, and a ``validate`` for their values (``studies.config``);
* its ``cells``: what one (model, corpus) of the grid expands to, each a
  ``method`` and a ``threshold`` (``studies.planning``);
* its ``fingerprint``: the settings that can change a cell's numbers;
* ``compute(cell, context)``: one cell's result, from a model loaded once per
  worker (``studies.worker``);
* its ``columns``: the ``results.sqlite`` columns it fills from that result
  (``studies.store``; a ``BLOB`` column holds a float32 array);
* ``report(frame, config)``: the sections it adds to ``report.md`` and
  ``report.html``: lines of Markdown, ``Table``\\ s (written as CSV and
  Markdown beside it) and ``Image``\\ s (``studies.report``).

The runner, the store, the config and the report loop over ``MEASURES`` in
registration order; a measure added with ``register_measure`` (from any
module, a test included) is planned, run, stored and reported like the
built-in ones. A built-in measure is a module here that ends with
``register_measure(Measure(...))``, named in ``BUILTIN`` (its place there is
its place in the report); ``tests/studies/test_measures.py`` registers a toy one.
The perplexity and agreement measures follow Dettmers et al. 2022,
"LLM.int8()" (arXiv 2208.07339), Table 1; the outlier scan its Table 4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from studies.columns import COLUMNS, RESERVED
from studies.settings import CORE_SETTINGS, Setting

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = [
    "Setting",
    "Measure",
    "Context",
    "Table",
    "Image",
    "MEASURES",
    "register_measure",
    "measure_settings",
    "measure_columns",
    "split_result",
    "BUILTIN",
]


@dataclass
class Context:
    """What a cell is computed from; one per cell, built by the worker that holds the model."""

    cfg: StudyConfig
    model: Any  # the float model (torch.nn.Module), loaded once for all of its cells
    tokenizer: Any
    info: Any  # outliers.models.load.ModelInfo: n_params, the weights' provenance
    ids: Any  # the corpus' token ids (1-D tensor)
    bos_token_id: int | None  # set when the study's bos is "window"
    cache: dict[str, Any]  # this measure's own, kept across the cells of one (model, corpus)
    progress: bool = False  # a bar over the cell's work (local runs)


@dataclass(frozen=True, eq=False)
class Table:
    """A report table: written as ``{stem}.csv`` and, unless ``csv_only``, ``{stem}.md`` and inline."""

    frame: pd.DataFrame
    stem: str
    floatfmt: str = ".3f"
    csv_only: bool = False


@dataclass(frozen=True, eq=False)
class Image:
    """A report figure: saved as ``file`` (PNG) beside ``report.md`` and shown inline."""

    figure: Any  # a matplotlib Figure
    file: str
    alt: str


def _one_float_cell(cfg: StudyConfig) -> list[dict[str, Any]]:
    return [{"method": "fp32", "threshold": None}]


def _no_report(frame: pd.DataFrame, cfg: StudyConfig) -> list:
    return []


def _no_check(cfg: StudyConfig) -> None:
    return None


@dataclass(frozen=True, eq=False)
class Measure:
    """One measure. ``absent`` is the report's line when a study does not take it (None: say nothing)."""

    name: str
    compute: Callable[[dict[str, Any], Context], dict[str, Any]]
    settings: tuple[Setting, ...] = ()
    cells: Callable[[StudyConfig], list[dict[str, Any]]] = _one_float_cell
    fingerprint: Callable[[dict[str, Any], StudyConfig], dict[str, Any]] | None = None  # None: its settings
    columns: Mapping[str, str] = field(default_factory=dict)  # results.sqlite column -> SQL type
    report: Callable[[pd.DataFrame, StudyConfig], list] = _no_report
    validate: Callable[[StudyConfig], None] = _no_check
    absent: str | None = None

    def settings_of(self, cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
        """The settings that can change this cell's numbers (part of its fingerprint)."""
        if self.fingerprint is not None:
            return self.fingerprint(cell, cfg)
        return {s.key: getattr(cfg, s.key) for s in self.settings}


MEASURES: dict[str, Measure] = {}
_SQL_TYPES = ("INTEGER", "REAL", "TEXT", "BLOB")


def register_measure(measure: Measure) -> Measure:
    """Add a measure to the registry; config, planning, runs, the store and reports see it from then on.

    Raises:
        ValueError: a name already registered; a setting the study itself or another measure takes; a column
            the store writes itself, that is no SQL name, whose type is not INTEGER, REAL, TEXT or BLOB, or
            that another measure declared with another type.
    """
    if measure.name in MEASURES:
        raise ValueError(f"measure {measure.name!r} is already registered")
    taken = set(CORE_SETTINGS) | set(measure_settings())
    for s in measure.settings:
        if s.key in taken:
            raise ValueError(f"measure {measure.name!r}: setting {s.key!r} is already taken")
    have = {**{k: v.split()[0] for k, v in COLUMNS.items()}, **measure_columns()}
    for col, sql in measure.columns.items():
        if col in RESERVED or not col.isidentifier() or sql not in _SQL_TYPES or have.get(col, sql) != sql:
            raise ValueError(
                f"measure {measure.name!r}: column {col!r} {sql} is reserved, not a name, not one of "
                f"{', '.join(_SQL_TYPES)} or already {have.get(col)}"
            )
    MEASURES[measure.name] = measure
    return measure


def measure_settings() -> dict[str, Setting]:
    """Every registered measure's settings by key, in registration order."""
    return {s.key: s for m in MEASURES.values() for s in m.settings}


def measure_columns() -> dict[str, str]:
    """Every registered measure's store columns and their SQL types, in registration order."""
    return {c: t for m in MEASURES.values() for c, t in m.columns.items()}


def split_result(measure: Measure, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(result, column values)`` of a computed cell: the values of ``measure.columns`` (None where the
    result lacks one), and the result without the arrays of its BLOB columns, which stay out of its JSON."""
    blobs = {c for c, t in measure.columns.items() if t == "BLOB"}
    values = {c: result.get(c) for c in measure.columns}
    return {k: v for k, v in result.items() if k not in blobs}, values


# registered on import, in this order: the report's order
BUILTIN = (
    "perplexity",
    "outliers",
    "sinks",
    "superweights",
    "weights",
    "kvcache",
    "kv_quant",
    "range",
    "sensitivity",
    "lifecycle",
    "profile",
)
for _module in BUILTIN:
    import_module(f"{__name__}.{_module}")
