"""A study as a TOML file, parsed into a frozen dataclass and validated.

```toml
[study]
name = "threshold-ablation"
models = ["smollm2-135m"]
corpora = ["builtin"]
methods = ["llm.int8", "absmax-row+decomp"]
thresholds = [0, 1, 2, 3, 4, 5, 6, 8, 10, 16]
alphas = [0.5]            # optional: also quantize after SmoothQuant smoothing at each alpha
rotations = ["hadamard"]  # optional: ... and after each rotation
seeds = [0, 1, 2]         # optional: ... each rotation with each random-sign seed (default: 0 alone)
protocol = "chunks"
window = 512
max_windows = 8

[report]              # optional
thresholds = [6]      # the Table-1 layout's column blocks (default: every threshold of the study)
```

The ``[study]`` keys are the study's own (``CORE_SETTINGS``: name, grid,
how models are loaded and fed) and those of each registered measure
(``studies.measures``: ``methods``, ``thresholds``, ``protocol``... for
perplexity, ``outlier_tokens``... for the outlier scan). Unknown keys, wrong
types and unknown methods are errors naming the key and the file.
A study folder's ``study.json`` holds the same two tables and is read back
through the same validation (``read_study``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from outliers.errors import InvalidArgumentError

from .settings import CORE_SETTINGS, Setting, check_table, floats

__all__ = ["StudyConfig", "load_config", "parse_config", "read_study", "write_study", "as_tables", "CORE_SETTINGS"]


REPORT_SETTINGS: dict[str, Setting] = {"thresholds": Setting("thresholds", (list,), items=(int, float), convert=floats)}
# study.json and the report's settings block list the keys in the order they have always had; the keys of
# measures registered since follow, in registration order.
_KEY_ORDER = (
    "name",
    "models",
    "corpora",
    "methods",
    "thresholds",
    "alphas",
    "rotations",
    "protocol",
    "window",
    "stride",
    "max_windows",
    "batch_size",
    "measure",
    "outlier_tokens",
    "outlier_threshold",
    "outlier_weights",
    "round_to",
    "bos",
    "dtype",
    "description",
    "expected_runtime",
    "actor_memory_gib",
    "actor_gpus",
)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study.

    The study's own keys are fields; every registered measure's keys are in
    ``settings`` (defaults filled in) and read as attributes too
    (``cfg.thresholds``, ``cfg.outlier_tokens``).
    """

    name: str
    models: tuple[str, ...]
    corpora: tuple[str, ...] = ("builtin",)
    measure: tuple[str, ...] = ("perplexity",)
    window: int = 512
    batch_size: int = 4
    bos: str = "corpus"
    dtype: str = "float32"
    description: str = ""
    expected_runtime: str = ""
    actor_memory_gib: float | None = None  # Ray: memory per actor instead of the size-based estimate
    actor_gpus: float | None = None  # Ray: GPUs per actor (default none: workers load on the CPU)
    report_thresholds: tuple[float, ...] | None = None  # [report] thresholds; None: all of `thresholds`
    settings: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        from outliers.models.dtypes import dtype_name

        from .measures import MEASURES, measure_settings

        known = measure_settings()
        unknown = sorted(set(self.settings) - set(known))
        if unknown:
            raise InvalidArgumentError(f"unknown setting(s) {unknown}; known: {', '.join(known)}")
        object.__setattr__(self, "settings", {k: self.settings.get(k, s.default) for k, s in known.items()})
        for measure in MEASURES.values():  # every measure's settings, taken or not: study.json holds them all
            measure.validate(self)
        dtype_name(self.dtype)
        for m in self.measure:
            if m not in MEASURES:
                raise InvalidArgumentError(f"unknown measure {m!r}; choose from {', '.join(MEASURES)}")
        if not self.models:
            raise InvalidArgumentError("a study needs at least one model")

    def __getattr__(self, key: str) -> Any:
        settings = self.__dict__.get("settings") or {}
        if key in settings:
            return settings[key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")


def __getattr__(name: str) -> Any:
    if name == "MEASURES":  # the measure registry (studies.measures), loaded on first use
        from .measures import MEASURES

        return MEASURES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Return the StudyConfig of a parsed TOML document; errors name the key and ``source``."""
    from .measures import measure_settings

    if "study" not in data or set(data) - {"study", "report"}:
        extra = sorted(set(data) - {"study", "report"})
        raise InvalidArgumentError(
            f"{source}: expected a [study] table and optionally [report]" + (f", found {extra}" if extra else "")
        )
    study, report = data["study"], data.get("report", {})
    measures = measure_settings()
    check_table(study, "study", {**CORE_SETTINGS, **measures}, source)
    check_table(report, "report", REPORT_SETTINGS, source)
    for key in ("name", "models"):
        if key not in study:
            raise InvalidArgumentError(f"{source}: [study] needs {key!r}")
    kwargs: dict[str, Any] = {k: CORE_SETTINGS[k].parse(v) for k, v in study.items() if k in CORE_SETTINGS}
    settings = {k: measures[k].parse(v) for k, v in study.items() if k in measures}
    if "thresholds" in report:
        kwargs["report_thresholds"] = REPORT_SETTINGS["thresholds"].parse(report["thresholds"])
    try:
        return StudyConfig(**kwargs, settings=settings)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{source}: {e}") from None


def as_tables(cfg: StudyConfig) -> dict[str, Any]:
    """Return ``cfg`` as the ``{"study": ..., "report": ...}`` tables that ``parse_config`` reads."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("report_thresholds", "settings")}
    values |= cfg.settings
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    keys = sorted(values, key=lambda k: rank.get(k, len(rank)))  # a stable sort: later keys keep their order
    study = {k: list(v) if isinstance(v, tuple) else v for k in keys if (v := values[k]) is not None}
    report = {"thresholds": list(cfg.report_thresholds)} if cfg.report_thresholds is not None else {}
    return {"study": study, "report": report}


def write_study(cfg: StudyConfig, folder: str | Path) -> Path:
    """Write ``study.json`` (the config as validated tables) into a study folder, atomically."""
    from outliers.cache import atomic_write

    return atomic_write(Path(folder) / "study.json", json.dumps(as_tables(cfg), indent=1) + "\n")


def read_study(folder: str | Path) -> StudyConfig:
    """Read a study folder's ``study.json`` back through ``parse_config``'s validation.

    Raises:
        InvalidArgumentError: no ``study.json``, not JSON, or a config that no longer validates.
    """
    path = Path(folder) / "study.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgumentError(f"{folder} is not a study folder (no study.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"{path}: cannot be read as JSON: {e}") from None
    if isinstance(data, dict) and "study" not in data:  # written by outliers 0.1: the study table alone
        data = {"study": {k: v for k, v in data.items() if v is not None}}
    return parse_config(data, str(path))


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgumentError(f"cannot read study config {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgumentError(f"{path}: not valid TOML: {e}") from None
    return parse_config(data, str(path))
