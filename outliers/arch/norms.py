"""Folding a per-channel scale into the norm that precedes a shared input.

SmoothQuant (Xiao et al. 2022, §4) divides activation channel j by s_j and
multiplies column j of every linear that reads it by s_j; the division is
free when it folds into the preceding norm's affine weights. How it folds
depends on the norm (``NormKind`` in the registry):

``RMS``           y = x̂ · w              ->  w / s
``RMS_PLUS_ONE``  y = x̂ · (1 + w)  (Gemma) ->  (1 + w) / s - 1
``LAYERNORM``     y = x̂ · w + b          ->  w / s and b / s
"""

from __future__ import annotations

import torch
from torch import nn

from outliers.arch.registry import NormKind
from outliers.errors import InvalidArgumentError

__all__ = ["fold_inverse_scale"]


@torch.no_grad()
def fold_inverse_scale(norm: nn.Module, kind: NormKind, s: torch.Tensor) -> None:
    """Make ``norm``'s output equal its old output divided by ``s`` per channel, in place.

    Raises:
        InvalidArgumentError: ``s`` does not fit the norm, is not positive and
            finite, or the norm has no affine weight to fold into.
    """
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise InvalidArgumentError(f"{type(norm).__name__} has no affine weight to fold a scale into")
    if s.shape != weight.shape or not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise InvalidArgumentError(
            f"scale must be positive and finite with shape {tuple(weight.shape)}, got shape {tuple(s.shape)}"
        )
    s = s.to(weight.dtype)
    if kind is NormKind.RMS_PLUS_ONE:
        weight.copy_((1 + weight) / s - 1)
    else:
        weight.div_(s)
    bias = getattr(norm, "bias", None)
    if kind is NormKind.LAYERNORM and bias is not None:
        bias.div_(s)
