"""A study as a TOML file, parsed into a frozen dataclass and validated.

```toml
[study]
name = "threshold-ablation"
models = ["smollm2-135m"]
corpora = ["builtin"]
methods = ["llm.int8", "absmax-row+decomp"]
thresholds = [0, 1, 2, 3, 4, 5, 6, 8, 10, 16]
protocol = "chunks"
window = 512
max_windows = 8

[report]              # optional
thresholds = [6]      # the Table-1 layout's column blocks (default: every threshold of the study)
```

Unknown keys, wrong types and unknown methods are errors naming the key and the file.
A study folder's ``study.json`` holds the same two tables and is read back
through the same validation (``read_study``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from outliers.errors import InvalidArgumentError
from outliers.quant.methods import METHODS
from outliers.eval.windows import PerplexitySettings

__all__ = ["StudyConfig", "load_config", "parse_config", "read_study", "write_study", "MEASURES"]

MEASURES = ("perplexity", "outliers")


@dataclass(frozen=True)
class StudyConfig:
    name: str
    models: tuple[str, ...]
    corpora: tuple[str, ...] = ("builtin",)
    methods: tuple[str, ...] = ("llm.int8",)
    thresholds: tuple[float, ...] = (6.0,)
    protocol: str = "chunks"
    window: int = 512
    stride: int | None = None
    max_windows: int | None = 8
    batch_size: int = 4
    measure: tuple[str, ...] = ("perplexity",)
    outlier_tokens: int = 4096  # tokens scanned per (model, corpus) when "outliers" is measured
    outlier_threshold: float = 6.0
    outlier_weights: str = "int8"
    round_to: str | None = None
    bos: str = "corpus"
    dtype: str = "float32"
    description: str = ""
    expected_runtime: str = ""
    report_thresholds: tuple[float, ...] | None = None  # [report] thresholds; None: all of `thresholds`

    def __post_init__(self) -> None:
        PerplexitySettings(self.protocol, self.window, self.stride, self.max_windows, self.batch_size, self.bos)
        from outliers.models.load import parse_dtype

        parse_dtype(self.dtype)
        if self.report_thresholds is not None:
            if not self.report_thresholds:
                raise InvalidArgumentError("[report] thresholds must name at least one threshold")
            missing = [t for t in self.report_thresholds if t not in self.thresholds]
            if missing:
                raise InvalidArgumentError(f"[report] thresholds {missing} are not in the study's thresholds "
                                           f"{list(self.thresholds)}")
        for m in self.methods:
            if m not in METHODS:
                raise InvalidArgumentError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for m in self.measure:
            if m not in MEASURES:
                raise InvalidArgumentError(f"unknown measure {m!r}; choose from {', '.join(MEASURES)}")
        if any(t < 0 for t in self.thresholds):
            raise InvalidArgumentError(f"thresholds must be >= 0, got {list(self.thresholds)}")
        if not self.models:
            raise InvalidArgumentError("a study needs at least one model")


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "models": (list,), "corpora": (list,), "methods": (list,), "thresholds": (list,),
    "protocol": (str,), "window": (int,), "stride": (int,), "max_windows": (int,), "batch_size": (int,),
    "measure": (list,), "outlier_tokens": (int,), "outlier_threshold": (int, float),
    "outlier_weights": (str,), "round_to": (str,), "bos": (str,), "dtype": (str,), "description": (str,),
    "expected_runtime": (str,),
}
_REPORT_TYPES: dict[str, tuple[type, ...]] = {"thresholds": (list,)}
_ITEM_TYPES = {"models": (str,), "corpora": (str,), "methods": (str,), "thresholds": (int, float),
               "measure": (str,)}


def _check_table(table: Any, name: str, types: dict[str, tuple[type, ...]], source: str) -> None:
    if not isinstance(table, dict):
        raise InvalidArgumentError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
    for key, value in table.items():
        if key not in types:
            raise InvalidArgumentError(f"{source}: unknown key {key!r} in [{name}]; known keys: "
                                       f"{', '.join(sorted(types))}")
        if isinstance(value, bool) or not isinstance(value, types[key]):
            want = " or ".join(t.__name__ for t in types[key])
            raise InvalidArgumentError(f"{source}: [{name}] {key} must be {want}, got {type(value).__name__} {value!r}")
        items = _ITEM_TYPES.get(key)
        if items and not all(isinstance(v, items) and not isinstance(v, bool) for v in value):
            raise InvalidArgumentError(f"{source}: [{name}] {key} must be a list of "
                                       f"{' or '.join(t.__name__ for t in items)}, got {value!r}")


def parse_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Return the StudyConfig of a parsed TOML document; errors name the key and ``source``."""
    if "study" not in data or set(data) - {"study", "report"}:
        extra = sorted(set(data) - {"study", "report"})
        raise InvalidArgumentError(f"{source}: expected a [study] table and optionally [report]"
                                   + (f", found {extra}" if extra else ""))
    study, report = data["study"], data.get("report", {})
    known = {f.name for f in fields(StudyConfig)} - {"report_thresholds"}
    _check_table(study, "study", {k: v for k, v in _TYPES.items() if k in known}, source)
    _check_table(report, "report", _REPORT_TYPES, source)
    for key in ("name", "models"):
        if key not in study:
            raise InvalidArgumentError(f"{source}: [study] needs {key!r}")
    kwargs = {k: tuple(float(x) for x in v) if k == "thresholds" else tuple(v) if isinstance(v, list) else v
              for k, v in study.items()}
    if "thresholds" in report:
        kwargs["report_thresholds"] = tuple(float(x) for x in report["thresholds"])
    try:
        return StudyConfig(**kwargs)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{source}: {e}") from None


def as_tables(cfg: StudyConfig) -> dict[str, Any]:
    """Return ``cfg`` as the ``{"study": ..., "report": ...}`` tables that ``parse_config`` reads."""
    study = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "report_thresholds"}
    study = {k: list(v) if isinstance(v, tuple) else v for k, v in study.items() if v is not None}
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
