"""The architecture registry: what each model family looks like, in one record per family.

Every module that needs to know where things are in a model asks here: the
capture points (``outliers.analysis.points``), what quantization skips
(``outliers.quant.model``), which linears share an input and the norm that
produces it (smoothing folds a per-channel scale into that norm), where keys
and values are, and which modules ``accelerate`` must not split. Paths are
relative to a block; ``blocks`` is a regex whose first group is the block
index, matched at the end of a module's full name.

Adding a family is one ``register_architecture(Architecture(...))`` (see
``outliers.arch.families``) and one test on a tiny in-process model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from outliers.arch.families import FAMILIES
from outliers.arch.linear import is_linear
from outliers.arch.spec import Architecture, KeyValues, NormKind, SharedInput
from outliers.errors import InvalidArgumentError

__all__ = [
    "NormKind",
    "SharedInput",
    "KeyValues",
    "Architecture",
    "ARCHITECTURES",
    "GENERIC",
    "register_architecture",
    "architecture_of",
    "blocks",
    "linear_summary",
    "quantize_skip",
]


_REGISTRY: dict[str, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(_REGISTRY)
GENERIC = Architecture("generic", (), None, notes="capture points from patterns={kind: regex} only")


def register_architecture(arch: Architecture) -> Architecture:
    """Add a family; its ``model_types`` then resolve to it everywhere."""
    taken = [t for t in arch.model_types if t in _BY_MODEL_TYPE]
    if arch.name in _REGISTRY or taken:
        raise ValueError(f"architecture {arch.name!r} clashes with a registered one (model types {taken})")
    _REGISTRY[arch.name] = arch
    _BY_MODEL_TYPE.update(dict.fromkeys(arch.model_types, arch))
    return arch


for _family in FAMILIES:  # the built-in families: plain data, registered here
    register_architecture(_family)


def is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether the module at ``name`` is one ``skip`` names (whole path, a path part, or a path suffix)."""
    parts = name.split(".")
    return any(s == name or s in parts or name.endswith("." + s) for s in skip)


def architecture_of(model: nn.Module) -> Architecture:
    """Return the registered family of a transformers model (by ``config.model_type``), or ``GENERIC``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _BY_MODEL_TYPE.get(model_type, GENERIC) if model_type else GENERIC


def blocks(model: nn.Module, arch: Architecture | None = None) -> list[tuple[int, str, nn.Module]]:
    """Return ``(index, path, module)`` of the model's transformer blocks, in order.

    Raises:
        InvalidArgumentError: the family does not say where its blocks are, or none match.
    """
    arch = arch or architecture_of(model)
    if arch.blocks is None:
        raise InvalidArgumentError(f"architecture {arch.name!r} does not say where its blocks are")
    rx = re.compile(r"(?:^|\.)" + arch.blocks + "$")
    found = [(int(m.group(1)), name, mod) for name, mod in model.named_modules() if (m := rx.search(name))]
    if not found:
        raise InvalidArgumentError(f"no module of this {arch.name} model matches its blocks {arch.blocks!r}")
    return sorted(found, key=lambda b: b[0])


def linear_summary(model: nn.Module, limit: int = 12) -> str:
    """The model's linear layers with block indices folded, for error messages."""
    names = sorted({re.sub(r"\.\d+\.", ".*.", n) for n, m in model.named_modules() if is_linear(m)})
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def quantize_skip(model: nn.Module, quantize_lm_head: bool) -> tuple[str, ...] | None:
    """Return ``quantize_model``'s ``skip``: None (the architecture's: the head stays float), or that minus the head.

    Model policy: which modules stay in float. The head is whatever ``get_output_embeddings`` returns,
    found by identity, so a family whose head has another name is handled as one named ``lm_head``. A head
    tied to the input embedding stays tied in the float model: ``quantized_copy`` replaces the copy's head
    module and leaves the shared tensor alone.

    Raises:
        InvalidArgumentError: the model has no linear output head to quantize.
    """
    if not quantize_lm_head:
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [n for n, m in model.named_modules() if m is head and n]
    if head is None or not is_linear(head) or not names:
        raise InvalidArgumentError(
            f"--quantize-lm-head: {type(model).__name__} has no linear output head (get_output_embeddings)"
        )
    return tuple(s for s in architecture_of(model).skip if not is_skipped(names[0], (s,)))
