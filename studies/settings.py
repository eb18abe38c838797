"""A study's TOML keys: each a ``Setting`` with its types, default and conversion, and the check of a table.

The study itself (``studies.config``) and every measure (``studies.measures``)
declare their keys this way; errors name the key, the table and the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from outliers.errors import InvalidArgumentError

__all__ = ["Setting", "check_table", "floats", "CORE_SETTINGS"]


@dataclass(frozen=True)
class Setting:
    """One key: the TOML types it takes, its default, a list's element types (``items``; the value is then
    kept as a tuple) and how a TOML value is converted (``convert``, applied after list -> tuple)."""

    key: str
    types: tuple[type, ...]
    default: Any = None
    items: tuple[type, ...] = ()
    convert: Callable[[Any], Any] | None = None

    def parse(self, value: Any) -> Any:
        """Return the value a ``StudyConfig`` holds for a TOML value that passed ``check_table``."""
        value = tuple(value) if isinstance(value, list) else value
        return self.convert(value) if self.convert else value


def floats(values: tuple) -> tuple[float, ...]:
    """A ``convert`` for lists of numbers kept as floats (``thresholds = [0, 6]`` -> ``(0.0, 6.0)``)."""
    return tuple(float(x) for x in values)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def check_table(table: Any, name: str, settings: Mapping[str, Setting], source: str) -> None:
    """Check a parsed TOML table's keys and value types against ``settings`` (booleans are never numbers).

    Raises:
        InvalidArgumentError: not a table, an unknown key, or a value (or list item) of the wrong type.
    """
    if not isinstance(table, dict):
        raise InvalidArgumentError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
    for key, value in table.items():
        if key not in settings:
            raise InvalidArgumentError(
                f"{source}: unknown key {key!r} in [{name}]; known keys: {', '.join(sorted(settings))}"
            )
        s = settings[key]
        if isinstance(value, bool) or not isinstance(value, s.types):
            raise InvalidArgumentError(
                f"{source}: [{name}] {key} must be {_names(s.types)}, got {type(value).__name__} {value!r}"
            )
        if s.items and not all(isinstance(v, s.items) and not isinstance(v, bool) for v in table[key]):
            raise InvalidArgumentError(f"{source}: [{name}] {key} must be a list of {_names(s.items)}, got {value!r}")


# The study's own keys: what it is, which grid, and how each model is loaded and fed (shared by every
# measure). Their defaults are StudyConfig's. Each measure's keys are declared in its module.
CORE_SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("name", (str,)),
        Setting("models", (list,), items=(str,)),
        Setting("corpora", (list,), items=(str,)),
        Setting("measure", (list,), items=(str,)),
        Setting("window", (int,)),
        Setting("batch_size", (int,)),
        Setting("bos", (str,)),
        Setting("dtype", (str,)),
        Setting("description", (str,)),
        Setting("expected_runtime", (str,)),
        Setting("actor_memory_gib", (int, float)),  # Ray placement overrides (studies.ray_backend)
        Setting("actor_gpus", (int, float)),
    )
}
