"""What a transform is, and how a row names one: plain data, no torch.

``Transform`` says what to do to a float model before quantizing it
(SmoothQuant smoothing, a Hadamard rotation; ``outliers.quant.transforms``
does it). ``row_name`` / ``parse_row`` write and read the name of a row that
quantizes after a transform (``"llm.int8@smooth=0.5"``), which studies key
their cells by: a study's plan reads these without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from outliers.errors import InvalidArgumentError

__all__ = ["ROTATIONS", "Transform", "row_name", "parse_row"]

ROTATIONS = ("hadamard",)


@dataclass(frozen=True)
class Transform:
    """What to do to a float model before quantizing it: smoothing strength ``smooth`` (α in [0, 1]) and/or a
    ``rotate`` kind, with the rotation's ``seed`` and the number of calibration windows for smoothing."""

    smooth: float | None = None
    rotate: str | None = None
    seed: int = 0
    calib_windows: int = 16

    def __post_init__(self) -> None:
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            raise InvalidArgumentError(f"smoothing strength alpha must be in [0, 1], got {self.smooth}")
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise InvalidArgumentError(f"unknown rotation {self.rotate!r}; choose from {', '.join(ROTATIONS)}")
        if self.calib_windows < 1:
            raise InvalidArgumentError(f"calibration windows must be >= 1, got {self.calib_windows}")

    def __bool__(self) -> bool:
        return self.smooth is not None or self.rotate is not None

    @property
    def label(self) -> str:
        """``"smooth 0.5 + hadamard"``; ``""`` for no transform."""
        parts = [f"smooth {self.smooth:g}"] if self.smooth is not None else []
        return " + ".join(parts + ([self.rotate] if self.rotate else []))

    def settings(self) -> dict[str, Any]:
        """The settings that change a result: a cell's fingerprint, a result's record."""
        out = asdict(self)
        if self.smooth is None:
            out.pop("calib_windows")
        if self.rotate is None:
            out.pop("seed")
        return out


def _alpha(a: float) -> str:
    """α as it is written in a row name: ``0.5``, ``1``; the shortest exact repr where ``g`` would round."""
    s = f"{a:g}"
    return s if float(s) == a else repr(float(a))


def row_name(method: str, transform: Transform, *, seed: bool = False) -> str:
    """Return the name of a row that quantizes with ``method`` after ``transform``: ``"llm.int8@smooth=0.5"``.

    No transform: the method's name alone (``"llm.int8"``), so rows without a
    transform keep the names (and the study cell keys) they always had. Else
    ``method@`` and the transform's steps in the order they are applied,
    joined by ``+``: ``smooth=α`` then the rotation (``"llm.int8@hadamard"``,
    ``"llm.int8@smooth=0.5+hadamard"``). This is the canonical spelling;
    ``seed`` and ``calib_windows`` are settings, not part of the name (a study
    keeps them in the cell's fingerprint); ``seed=True`` names a rotation's
    seed other than 0 last (``"llm.int8@hadamard+seed=3"``), as a study that
    crosses seeds keys its cells (seed 0 keeps the name it always had).
    """
    if "@" in method or not method:
        raise InvalidArgumentError(f"a method name is non-empty and holds no '@', got {method!r}")
    steps = ([f"smooth={_alpha(transform.smooth)}"] if transform.smooth is not None else []) + (
        [transform.rotate] if transform.rotate else []
    )
    steps += [f"seed={transform.seed}"] if seed and transform.rotate and transform.seed != 0 else []
    return f"{method}@{'+'.join(steps)}" if steps else method


def parse_row(name: str, *, seed: int = 0, calib_windows: int = 16) -> tuple[str, Transform]:
    """Return ``(method, transform)`` of a row name written by ``row_name``; ``seed``/``calib_windows`` fill in
    (a ``seed=N`` step in the name, with a rotation, takes the place of ``seed``).

    The method part is not looked up (``"fp32@hadamard"`` is a transformed
    float model); ``row_name(*parse_row(name))`` gives the canonical spelling.

    Raises:
        InvalidArgumentError: an empty method or transform, an unknown step, a step given twice, or a bad α.
    """
    method, at, spec = name.partition("@")
    if not method or (at and not spec):
        raise InvalidArgumentError(f"row name {name!r}: expected METHOD or METHOD@TRANSFORM (e.g. llm.int8@hadamard)")
    smooth: float | None = None
    rotation: str | None = None
    named_seed: int | None = None
    for step in spec.split("+") if spec else ():
        key, eq, value = step.partition("=")
        if key == "smooth" and eq and smooth is None:
            try:
                smooth = float(value)
            except ValueError:
                raise InvalidArgumentError(f"row name {name!r}: smooth={value!r} is not a number") from None
        elif key == "seed" and eq and named_seed is None:
            try:
                named_seed = int(value)
            except ValueError:
                raise InvalidArgumentError(f"row name {name!r}: seed={value!r} is not an integer") from None
        elif not eq and key in ROTATIONS and rotation is None:
            rotation = key
        else:
            raise InvalidArgumentError(
                f"row name {name!r}: unknown or repeated step {step!r}; steps are smooth=ALPHA, one of "
                f"{', '.join(ROTATIONS)} and its seed=N, joined by '+'"
            )
    if named_seed is not None and rotation is None:
        raise InvalidArgumentError(f"row name {name!r}: seed=N is the rotation's; name a rotation with it")
    seed = seed if named_seed is None else named_seed
    return method, Transform(smooth, rotation, seed=seed, calib_windows=calib_windows)
