"""``outliers profile``: one self-contained page of how a model's outliers look, where it breaks and why.

A profile is a study of one model on one corpus whose measures are the page's sections (``SECTIONS``): the
model's facts, one outlier scan (the outlier features under the paper's and the relative criterion, the
massive activations, kurtosis and ∞-norm by block), the attention sinks, the super weights with their controls
and the lifecycle where it exists, the weight outliers, the key-cache channels, the number-format headroom,
the per-layer sensitivity and Table 1 with intervals and agreement. Its cells live in the folder's
``results.sqlite`` like any study's (``studies.store``: content-keyed, one transaction per cell), so a rerun
after an interruption, with a section added or with a setting changed computes only the cells missing or
stale, and ``studies status DIR`` reads the folder as it reads a study's.

``run_profile`` runs the sections one after the other on one loaded model (a progress bar per section), prints
each section's cost, then ``write_profile`` writes ``index.html`` (``studies.profile_page``: one file, figures
embedded, nothing fetched) and ``profile.json`` (every number on the page) from the store alone.

The settings (``profile_config``): ``DEFAULT`` measures Table 1 on 16 windows of 512 tokens (the sensitivity
on 8, without a random-k baseline), ``QUICK`` on windows of 256 tokens, fewer of them and fewer Table-1 rows,
for a first look in a few minutes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outliers.errors import InvalidArgumentError

from .config import StudyConfig, parse_config

__all__ = [
    "ProfileSection",
    "SECTIONS",
    "DEFAULT",
    "QUICK",
    "profile_config",
    "run_profile",
    "write_profile",
    "default_out",
    "SectionCost",
]


@dataclass(frozen=True)
class ProfileSection:
    """A section of the page: its ``--sections`` name, its heading and the measures whose cells it shows.

    ``level`` 3 nests it under the section before it in the contents.
    """

    key: str
    title: str
    measures: tuple[str, ...]
    level: int = 2


SECTIONS = (
    ProfileSection("facts", "Model and provenance", ("profile_facts",)),
    ProfileSection("features", "Outlier features", ("profile_scan",)),
    ProfileSection("massive", "Massive activations", ("profile_scan",)),
    ProfileSection("kurtosis", "Kurtosis and ∞-norm by block", ("profile_scan",)),
    ProfileSection("sinks", "Attention sinks", ("profile_sinks",)),
    ProfileSection("superweights", "Super weights", ("superweights",)),
    ProfileSection("lifecycle", "Lifecycle: super weight to quantization error", ("lifecycle",), level=3),
    ProfileSection("weights", "Weight outliers", ("profile_weights",)),
    ProfileSection("kvcache", "Key-cache channels", ("profile_kvcache",)),
    ProfileSection("range", "Number-format headroom", ("profile_range",)),
    ProfileSection("sensitivity", "Per-layer sensitivity", ("profile_sensitivity",)),
    ProfileSection("table1", "Table 1: perplexity, intervals and agreement", ("perplexity",)),
)

# The paper's Table-1 rows (Dettmers et al. 2022, Table 1), all at the decomposition threshold 6.
PAPER_ROWS = (
    "absmax",
    "zeropoint",
    "absmax-row",
    "absmax-vector",
    "zeropoint-vector",
    "absmax-row+decomp",
    "llm.int8",
    "zeropoint-llm.int8",
)

# Study settings of a page ([study] keys of studies.config and the measures), sized to at most 15 minutes for
# SmolLM2 on 2 cores (measured: 10 min 16 s with both cores free, 1,111 CPU s; docs/profile.md): Table 1 on
# 16 windows of 512 tokens; the sensitivity on 8 (its sweep runs every block once per window: 16 would double
# its 3-4 minutes) without the random-k baseline; the lifecycle on 4; the super weights on 4 with the
# measure's 10 matched seeds; the other measures' defaults.
DEFAULT: dict[str, Any] = {
    "window": 512,
    "batch_size": 4,
    "methods": list(PAPER_ROWS),
    "thresholds": [6],
    "max_windows": 16,
    "outlier_tokens": 4096,
    "sink_windows": 4,
    "superweight_windows": 4,
    "kvcache_windows": 4,
    "range_windows": 4,
    "sensitivity_windows": 8,
    "sensitivity_random": 0,
    "lifecycle_windows": 4,
}
# A lower-fidelity first look: windows of 256 tokens, two per analysis where the analysis allows (the intervals
# are rough), three Table-1 rows on four windows, three matched seeds for the super weights' fair control.
QUICK: dict[str, Any] = DEFAULT | {
    "window": 256,
    "methods": ["absmax", "absmax-vector", "llm.int8"],
    "max_windows": 4,
    "outlier_tokens": 512,
    "sink_windows": 2,
    "superweight_windows": 2,
    "superweight_seeds": 3,
    "kvcache_windows": 2,
    "range_windows": 2,
    "sensitivity_windows": 2,
    "lifecycle_windows": 2,
}


def _measures() -> dict[str, Any]:
    from .measures import MEASURES

    return MEASURES


def chosen_sections(names: Sequence[str] | None = None) -> tuple[ProfileSection, ...]:
    """The sections named (all, in page order, for None); "facts" always comes with them.

    Raises:
        InvalidArgumentError: a name that is no section.
    """
    if names is None:
        return SECTIONS
    known = {s.key for s in SECTIONS}
    if bad := [n for n in names if n not in known]:
        raise InvalidArgumentError(f"unknown profile section(s) {bad}; choose from {', '.join(known)}")
    wanted = {"facts", *names}
    return tuple(s for s in SECTIONS if s.key in wanted)


def profile_config(
    model: str,
    corpus: str = "builtin",
    *,
    quick: bool = False,
    sections: Sequence[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> StudyConfig:
    """The study a profile is: one model, one corpus, the measures of the ``sections`` asked for.

    ``settings`` replaces ``[study]`` keys of ``DEFAULT`` / ``QUICK`` (a test's tiny windows). A section whose
    measure this version lacks (``lifecycle``) is left out of the grid; its page section says so.
    """
    registered = _measures()
    measures = list(dict.fromkeys(m for s in chosen_sections(sections) for m in s.measures if m in registered))
    study = (QUICK if quick else DEFAULT) | (settings or {})
    table = {
        "name": "profile",
        "description": f"Outlier profile of {model} on {corpus}" + (" (quick)" if quick else ""),
        "models": [model],
        "corpora": [corpus],
        "measure": measures,
        **{k: v for k, v in study.items() if k in _known_keys()},
    }
    return parse_config({"study": table}, "outliers profile")


def _known_keys() -> set[str]:
    from .measures import measure_settings
    from .settings import CORE_SETTINGS

    return set(CORE_SETTINGS) | set(measure_settings())


def default_out(model: str, quick: bool = False) -> Path:
    """``profiles/NAME`` (``NAME-quick``): the model's name or its folder's or file's last part."""
    name = re.sub(r"[^\w.-]+", "-", str(model).rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"
    return Path("profiles") / (name + ("-quick" if quick else ""))


@dataclass(frozen=True)
class SectionCost:
    """What one section's run cost: wall and CPU seconds, cells computed, already stored, failed."""

    key: str
    title: str
    wall_s: float
    cpu_s: float
    computed: int
    stored: int
    failed: int
    available: bool = True


def _timed(measure: Any) -> Any:
    """The measure with its result's ``cost`` (wall and CPU seconds of the cell) recorded beside its numbers."""

    def compute(cell: dict[str, Any], ctx: Any) -> dict[str, Any]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = measure.compute(cell, ctx)
        result["cost"] = {
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return result

    return dataclasses.replace(measure, compute=compute)


def run_profile(
    cfg: StudyConfig,
    out: str | Path,
    *,
    sections: Sequence[ProfileSection] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    command: str = "",
) -> tuple[Path, list[SectionCost]]:
    """Compute every section's missing or stale cells, one section at a time, then write the page.

    ``sections``: default, those of ``cfg``'s measures. Each section gets its own progress bar (over its
    cells; the analysis inside draws its own over windows) and ``echo`` gets one line with its cost when it
    ends. An interruption keeps every finished cell; run again to resume. Returns ``(index.html, the
    sections' costs)``.
    """
    from .runner import run_study
    from .worker import Worker

    out = Path(out)
    sections = tuple(sections) if sections is not None else _sections_of(cfg)
    registered = _measures()
    worker = Worker(cfg, {name: _timed(m) for name, m in registered.items()}, progress=progress)
    costs: list[SectionCost] = []
    done_kinds: set[str] = set()
    for i, section in enumerate(sections, 1):
        kinds = [m for m in section.measures if m in cfg.measure]
        label = f"[{i}/{len(sections)}] {section.title}"
        if not kinds:
            costs.append(SectionCost(section.key, section.title, 0.0, 0.0, 0, 0, 0, available=False))
            if echo:
                echo(f"{label}: unavailable (this version has no {' or '.join(section.measures)} measure)")
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        counts = run_study(cfg, out, progress=progress, kinds=set(kinds), worker=worker, desc=section.title)
        cost = SectionCost(
            section.key,
            section.title,
            time.perf_counter() - wall,
            time.process_time() - cpu,
            counts["done"],
            counts["skipped"],
            counts["failed"],
        )
        costs.append(cost)
        if echo:
            echo(f"{label}: {_cost_line(cost, shared=bool(done_kinds & set(kinds)))}")
        done_kinds |= set(kinds)
    page = write_profile(out, sections=sections, costs=costs, command=command)
    return page, costs


def _cost_line(c: SectionCost, shared: bool = False) -> str:
    if c.computed or c.failed:
        what = f"{c.computed} cell{'s' if c.computed != 1 else ''} computed" + (
            f", {c.failed} failed" if c.failed else ""
        )
        return f"{c.wall_s:.1f} s wall, {c.cpu_s:.1f} s CPU ({what})"
    if shared:
        return "from the same cells as above"
    return f"stored ({c.stored} cell{'s' if c.stored != 1 else ''}; {c.wall_s:.1f} s to check)"


def write_profile(
    out: str | Path,
    *,
    sections: Sequence[ProfileSection] | None = None,
    costs: Sequence[SectionCost] = (),
    command: str = "",
) -> Path:
    """Write ``index.html`` and ``profile.json`` into ``out`` from its store; return the page's path."""
    from .config import read_study
    from .planning import plan
    from .profile_page import write_pages
    from .store import Store

    out = Path(out)
    cfg = read_study(out)
    store = Store(out)
    try:
        planned = plan(cfg, store)
        frame = store.frame()
    finally:
        store.close()
    sections = tuple(sections) if sections is not None else _sections_of(cfg)
    return write_pages(out, cfg, planned, frame, sections, costs=costs, command=command)


def _sections_of(cfg: StudyConfig) -> tuple[ProfileSection, ...]:
    """The sections of a profile's study: the facts and those whose measures it takes (a section whose measure
    this version lacks shows only where the sections are named: ``chosen_sections``)."""
    return tuple(s for s in SECTIONS if s.key == "facts" or any(m in cfg.measure for m in s.measures))
