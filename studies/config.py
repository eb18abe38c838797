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
```

Unknown keys, wrong types and unknown methods are errors naming the key and the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from outliers.errors import InvalidArgumentError
from outliers.nn import METHODS
from outliers.perplexity import PerplexitySettings

__all__ = ["StudyConfig", "load_config", "parse_config", "MEASURES"]

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
    description: str = ""
    expected_runtime: str = ""

    def __post_init__(self) -> None:
        PerplexitySettings(self.protocol, self.window, self.stride, self.max_windows, self.batch_size)
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
    "outlier_weights": (str,), "round_to": (str,), "description": (str,), "expected_runtime": (str,),
}
_ITEM_TYPES = {"models": (str,), "corpora": (str,), "methods": (str,), "thresholds": (int, float),
               "measure": (str,)}


def parse_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Return the StudyConfig of a parsed TOML document; errors name the key and ``source``."""
    if set(data) != {"study"}:
        extra = sorted(set(data) - {"study"})
        raise InvalidArgumentError(f"{source}: expected one [study] table" + (f", found {extra}" if extra else ""))
    study = data["study"]
    known = {f.name for f in fields(StudyConfig)}
    for key, value in study.items():
        if key not in known:
            raise InvalidArgumentError(f"{source}: unknown key {key!r} in [study]; known keys: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            want = " or ".join(t.__name__ for t in _TYPES[key])
            raise InvalidArgumentError(f"{source}: [study] {key} must be {want}, got {type(value).__name__} {value!r}")
        if key in _ITEM_TYPES and not all(isinstance(v, _ITEM_TYPES[key]) and not isinstance(v, bool) for v in value):
            raise InvalidArgumentError(f"{source}: [study] {key} must be a list of "
                                       f"{' or '.join(t.__name__ for t in _ITEM_TYPES[key])}, got {value!r}")
    for key in ("name", "models"):
        if key not in study:
            raise InvalidArgumentError(f"{source}: [study] needs {key!r}")
    kwargs = {k: tuple(float(x) for x in v) if k == "thresholds" else tuple(v) if isinstance(v, list) else v
              for k, v in study.items()}
    try:
        return StudyConfig(**kwargs)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{source}: {e}") from None


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
