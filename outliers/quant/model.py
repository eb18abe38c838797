"""Quantize a whole Hugging Face model, and save/load it without re-quantizing.

``quantize_model`` swaps every ``nn.Linear`` / ``Conv1D`` (except those named
in ``skip``; ``lm_head`` by default, as transformers' bitsandbytes integration
does) for the layer of the method's format (``Int8Linear`` for int8,
``FP8Linear`` / ``W4A16Linear`` from ``outliers.quant.emulated``), in place, and
reports what it did. The files are safetensors with the settings in their
metadata (every format, one layout: the FP8 codes are stored as float8_e4m3fn,
the int4 codes packed two per byte); nothing is pickled.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outliers.arch.linear import in_features, is_linear, out_features, weight_of
from outliers.arch.registry import architecture_of, is_skipped
from outliers.errors import InvalidArgumentError, ModelFileError
from outliers.quant.emulated import LAYERS, EmulatedLinear
from outliers.quant.int8 import check_threshold
from outliers.quant.linear import Int8Linear
from outliers.quant.methods import Format, get_method
from outliers.quant.mx import MXLinear  # noqa: F401  (registers the microscaling formats' layer in LAYERS)

__all__ = [
    "set_threshold",
    "QuantReport",
    "QuantizedLinear",
    "quantize_linear",
    "quantize_model",
    "quantized_copy",
    "save_quantized",
    "load_quantized",
    "FORMAT",
]

# The file layout is the one int8 files always had; FP8 and W4A16 layers only add methods to its
# module list (a reader that predates them stops at "unknown method").
FORMAT = "outliers.int8/1"
QuantizedLinear = Int8Linear | EmulatedLinear  # EmulatedLinear: FP8Linear, W4A16Linear, MXLinear


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_model`` replaced and skipped, and the weight memory before and after."""

    method: str
    threshold: float
    outlier_weights: str
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0  # weights of the replaced modules, as they were
    bytes_after: int = 0  # their codes, statistics (and float copies for outlier_weights="fp")

    @property
    def saved_fraction(self) -> float:
        return 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"saved_fraction": self.saved_fraction}

    def __str__(self) -> str:
        return (
            f"{self.method} (threshold {self.threshold}): replaced {len(self.replaced)} linear layers, "
            f"skipped {len(self.skipped)} ({', '.join(self.skipped) or 'none'}); weights "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"
        )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _existing(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear | EmulatedLinear)]


def quantize_linear(
    module: nn.Module,
    method: str = "llm.int8",
    *,
    threshold: float = 6.0,
    outlier_weights: str = "int8",
    name: str = "",
    round_to: str | None = None,
) -> QuantizedLinear:
    """Return the method's layer quantized from an ``nn.Linear`` or ``Conv1D``: its format picks the class.

    ``Int8Linear.from_linear`` for int8 methods (``threshold`` and
    ``outlier_weights`` as there), ``FP8Linear`` / ``W4A16Linear.from_linear``
    for the others (which take neither).

    Raises:
        InvalidArgumentError: unknown method, or a module that is not a linear layer.
    """
    spec = get_method(method)
    if spec.format is Format.INT8:
        return Int8Linear.from_linear(
            module, method, threshold=threshold, outlier_weights=outlier_weights, name=name, round_to=round_to
        )
    return LAYERS[spec.format].from_linear(module, method, name=name, round_to=round_to)


def _shell(spec: dict[str, Any]) -> nn.Module:
    """An empty layer for one module entry of a saved file, to be filled by ``load_model``."""
    common = {"bias": spec["bias"], "name": spec["name"], "round_to": spec.get("round_to")}
    fmt = get_method(spec["method"]).format
    if fmt is Format.INT8:
        return Int8Linear(
            spec["in"],
            spec["out"],
            spec["method"],
            threshold=spec["threshold"] or 0.0,
            outlier_weights=spec["outlier_weights"],
            **common,
        )
    return LAYERS[fmt](spec["in"], spec["out"], spec["method"], **common)


def quantize_model(
    model: nn.Module,
    method: str = "llm.int8",
    threshold: float = 6.0,
    *,
    skip: tuple[str, ...] | None = None,
    outlier_weights: str = "int8",
    round_to: str | None = None,
) -> QuantReport:
    """Replace the model's linear layers by the method's layer in place; return a report.

    ``Int8Linear`` for int8 methods, ``FP8Linear`` or ``W4A16Linear`` for the
    emulated ones (``threshold`` and ``outlier_weights`` matter only with
    decomposition). ``skip`` names modules left in float; None takes the architecture's
    (``lm_head`` for every built-in family). ``round_to="float16"``
    reproduces bitsandbytes' arithmetic on a float32 model (see
    ``outliers.quant.linear``).

    Raises:
        InvalidArgumentError: unknown method, bad threshold, or a model that is
            already quantized (quantize a fresh float copy instead).
    """
    spec = get_method(method)
    if done := _existing(model):
        raise InvalidArgumentError(
            f"model is already quantized ({len(done)} {type(done[0]).__name__} modules, method {done[0].method!r}); "
            "quantize a fresh float copy instead"
        )
    if skip is None:
        skip = architecture_of(model).skip
    replaced, skipped, before, after = [], [], 0, 0
    targets = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    for name, module in targets:
        if is_skipped(name, skip):
            skipped.append(name)
            continue
        q = quantize_linear(
            module, method, threshold=threshold, outlier_weights=outlier_weights, name=name, round_to=round_to
        )
        before += _nbytes(module.weight) + _nbytes(module.bias)
        after += sum(_nbytes(b) for b in q.buffers())
        _set_module(model, name, q)
        replaced.append(name)
    t = threshold if spec.decomposition else 0.0
    return QuantReport(method, float(t), outlier_weights, replaced, skipped, before, after)


def quantized_copy(
    model: nn.Module,
    method: str = "llm.int8",
    threshold: float = 6.0,
    *,
    skip: tuple[str, ...] | None = None,
    outlier_weights: str = "int8",
    round_to: str | None = None,
) -> tuple[nn.Module, QuantReport]:
    """Return a quantized model beside ``model`` and the report; ``model`` stays as it was.

    The copy shares every tensor it does not quantize (embeddings, norms,
    ``lm_head``) with ``model``: only the module tree is copied, so the float
    model and any number of quantized ones cost one set of float weights plus
    the codes of each.
    """
    get_method(method)
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy_ = deepcopy(model, memo=shared)
    return copy_, quantize_model(
        copy_, method, threshold, skip=skip, outlier_weights=outlier_weights, round_to=round_to
    )


def set_threshold(model: nn.Module, report: QuantReport, threshold: float) -> QuantReport:
    """Give every decomposing ``Int8Linear`` of a quantized model another threshold, in place; return its report.

    The weights' int8 codes do not depend on the threshold (it picks X's outlier columns at run
    time), so a threshold sweep can quantize once and re-threshold, instead of quantizing the same
    weights again per threshold; the result is the model ``quantize_model`` would make at
    ``threshold`` (tests compare them).

    Raises:
        InvalidArgumentError: a negative or non-finite threshold.
    """
    t = check_threshold(threshold)
    if not get_method(report.method).decomposition:
        return report
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.spec.decomposition:
            module.threshold = t
    return replace(report, threshold=t)


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write the quantized model's tensors and settings to one safetensors file."""
    from safetensors.torch import save_model

    layers = _existing(model)
    if not layers:
        raise InvalidArgumentError(
            "model has no Int8Linear, FP8Linear or W4A16Linear modules; call quantize_model first"
        )
    names = {m: n for n, m in model.named_modules()}
    modules = [
        {
            "name": names[m],
            "in": m.in_features,
            "out": m.out_features,
            "bias": m.bias is not None,
            "method": m.method,
            "threshold": m.threshold if isinstance(m, Int8Linear) else 0.0,
            "outlier_weights": m.outlier_weights if isinstance(m, Int8Linear) else "int8",
            "round_to": m.round_to,
        }
        for m in layers
    ]
    from outliers import __version__

    meta = {
        "format": FORMAT,
        "method": layers[0].method,
        "threshold": str(modules[0]["threshold"]),
        "outlier_weights": modules[0]["outlier_weights"],
        "modules": json.dumps(modules),
        "outliers_version": __version__,
    }
    path = Path(path)
    save_model(model, str(path), metadata=meta)
    return path


def load_quantized(model: nn.Module, path: str | Path, method: str | None = None) -> nn.Module:
    """Load a file written by ``save_quantized`` into a float model of the same architecture.

    The listed layers become empty layers of their method's format, filled from the file: no
    re-quantization, so outputs are bit-identical to the saved model's.

    Raises:
        ModelFileError: missing file, no or foreign metadata, a method other
            than ``method`` (when given), or modules that do not fit the model.
        InvalidArgumentError: a method this version does not know.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"quantized model file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelFileError(f"{path} is not a safetensors file: {e}") from e
    if meta.get("format") != FORMAT or "modules" not in meta:
        raise ModelFileError(f"{path} has no '{FORMAT}' metadata: not written by save_quantized")
    if method is not None and meta["method"] != method:
        raise ModelFileError(f"{path} holds method {meta['method']!r}, not {method!r}")
    if _existing(model):
        raise InvalidArgumentError("load_quantized needs a float model; this one is already quantized")
    for spec in json.loads(meta["modules"]):
        try:
            old = model.get_submodule(spec["name"])
        except AttributeError:
            raise ModelFileError(f"{path}: module {spec['name']} is not in this model") from None
        shell = _shell(spec)
        shape = (out_features(old), in_features(old))
        if shape != (spec["out"], spec["in"]):
            raise ModelFileError(
                f"{path}: {spec['name']} is {spec['out']}x{spec['in']} in the file, {shape[0]}x{shape[1]} in the model"
            )
        _set_module(model, spec["name"], shell.to(weight_of(old).device))
    load_model(model, str(path), strict=True)
    return model
