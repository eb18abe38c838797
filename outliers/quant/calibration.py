"""Calibration for smoothing, and a transformed copy of a float model ready to quantize.

SmoothQuant's activation maxima come from calibration windows that never
overlap the evaluation windows: taken from the end of the corpus (or from
another corpus), and the call says how many tokens at the start evaluation
uses, so an overlap is an error, not a silent leak.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import nn

from outliers.arch.hooks import pre_hooks
from outliers.errors import CorpusError
from outliers.models.dispatch import input_device
from outliers.quant.transforms import Transform, input_groups, rotate, smooth, smoothing_scales

__all__ = ["calibration_windows", "activation_max", "transformed_copy"]


def calibration_windows(ids: torch.Tensor, window: int, n: int, *, reserved: int = 0) -> torch.Tensor:
    """Return ``(n, window)`` token ids from the end of ``ids``, none of them among its first ``reserved``.

    Raises:
        CorpusError: the corpus is too short for both.
    """
    need = n * window
    if len(ids) - reserved < need:
        raise CorpusError(
            f"calibration needs {n} windows of {window} tokens after the {reserved} tokens evaluation uses, "
            f"but the corpus has {len(ids)}: use fewer calibration windows or another corpus (--calib-corpus)"
        )
    return ids[len(ids) - need :].reshape(n, window)


@torch.inference_mode()
def activation_max(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Return each input group's per-channel max |x| over ``windows`` (``transforms.input_groups``)."""
    groups = input_groups(model)
    first = {g.linears[0]: g.name for g in groups}  # the linears of a group read one input: hook one
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
        g = first[name]
        seen[g] = torch.maximum(seen[g], x) if g in seen else x

    device = input_device(model)  # a dispatched model may have its embeddings offloaded
    with pre_hooks(model, list(first), record):
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device))
    return seen


def _copy_for(model: nn.Module, transform: Transform) -> nn.Module:
    """A copy sharing every tensor the transform leaves alone (embeddings, ``lm_head``; norms when only rotating)."""
    changed: set[int] = set()
    for g in input_groups(model):
        owners = [model.get_submodule(n) for n in g.linears]
        if transform.smooth is not None and g.norm is not None:
            owners.append(model.get_submodule(g.norm))
        changed |= {id(t) for m in owners for t in (*m.parameters(), *m.buffers())}
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in changed}
    return deepcopy(model, memo=shared)


def transformed_copy(
    model: nn.Module,
    transform: Transform,
    ids: torch.Tensor | None = None,
    *,
    window: int = 512,
    reserved: int = 0,
    batch_size: int = 4,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return a copy of the float model with ``transform`` applied, and what was done.

    The copy holds new tensors only where the transform writes (the
    quantizable linears' weights, the norms smoothing folds into) and shares
    the rest with ``model``.

    ``ids`` is the calibration corpus for smoothing (its last
    ``transform.calib_windows`` windows of ``window``, after its first
    ``reserved`` tokens). The record holds the transform's settings, the
    calibration tokens, where each group's smoothing went and each rotation's
    Hadamard construction.
    """
    out = _copy_for(model, transform)
    info: dict[str, Any] = {"transform": transform.label, **transform.settings()}
    if transform.smooth is not None:
        if ids is None:
            raise CorpusError("smoothing needs calibration text (ids)")
        windows = calibration_windows(ids, window, transform.calib_windows, reserved=reserved)
        scales = smoothing_scales(out, activation_max(out, windows, batch_size), transform.smooth)
        where = smooth(out, scales)
        info |= {
            "calib_tokens": windows.numel(),
            "smoothed_into_norm": sum(v != "module" for v in where.values()),
            "smoothed_by_module": sum(v == "module" for v in where.values()),
        }
    if transform.rotate is not None:
        constructions = rotate(out, seed=transform.seed)
        info["hadamard"] = sorted(set(constructions.values()))
    return out, info
