"""The linear kinds a model can hold: ``nn.Linear`` and GPT-2's ``Conv1D``, recognised here and only here.

transformers' ``Conv1D`` is a linear layer whose weight is stored ``(in, out)``
(``nf`` is its output size). Everything that needs a layer's sizes or its
weight in ``nn.Linear``'s ``(out, in)`` layout asks this module.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import nn

from outliers.errors import InvalidArgumentError

__all__ = ["LinearKind", "linear_kind", "is_linear", "in_features", "out_features", "weight_of"]


class LinearKind(StrEnum):
    LINEAR = "linear"  # nn.Linear, weight (out, in)
    CONV1D = "conv1d"  # transformers.pytorch_utils.Conv1D, weight (in, out)


def linear_kind(module: nn.Module) -> LinearKind | None:
    """Return the module's linear kind, or None when it is not a linear layer."""
    if isinstance(module, nn.Linear):
        return LinearKind.LINEAR
    # by name, so that this check never imports transformers
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LinearKind.CONV1D
    return None


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def is_linear(module: nn.Module) -> bool:
    return linear_kind(module) is not None


def in_features(module: nn.Module) -> int | None:
    kind = linear_kind(module)
    if kind is None:
        return None
    shape = _weight(module).shape
    return int(shape[1] if kind is LinearKind.LINEAR else shape[0])


def out_features(module: nn.Module) -> int | None:
    kind = linear_kind(module)
    if kind is None:
        return None
    shape = _weight(module).shape
    return int(shape[0] if kind is LinearKind.LINEAR else shape[1])


def weight_of(module: nn.Module) -> torch.Tensor:
    """Return the weight as ``(out, in)`` (a view for Conv1D, no copy)."""
    kind = linear_kind(module)
    if kind is None:
        raise InvalidArgumentError(f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")
    w = _weight(module).detach()
    return w if kind is LinearKind.LINEAR else w.t()
