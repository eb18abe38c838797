"""Quantize a tensor once for the sibling linears that read it (q, k, v; gate, up).

A Llama block passes one ``hidden_states`` object to ``q_proj``, ``k_proj`` and
``v_proj``, and another to ``gate_proj`` and ``up_proj``. LLM.int8()'s codes, row
statistics and outlier columns depend on X and the threshold only, so the
second and third layer can take the first one's: on SmolLM2 that is 7
quantize passes per block cut to 4. Nothing is reused unless it is the very
same tensor object (a weak reference, so a new tensor at a freed address never
matches), unchanged since (its version counter, which every in-place write
through any view bumps), with the same shape, threshold and rounding.

One entry per thread: siblings run one after another, and the entry goes
when its tensor does. Tensors made under ``torch.inference_mode`` keep no
version counter, so they are never shared (each sibling quantizes its own):
run quantized models under ``torch.no_grad`` to share, as this package's
evaluation does.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["QuantizedInput", "quantized_input"]


@dataclass(frozen=True)
class QuantizedInput:
    """An input's int8 codes, row statistics, outlier columns and their float values ``x[:, cols]``."""

    codes: torch.Tensor
    stats: torch.Tensor
    cols: torch.Tensor
    x_cols: torch.Tensor


@dataclass(frozen=True)
class _Entry:
    ref: weakref.ReferenceType
    version: int
    key: Hashable
    value: QuantizedInput


_local = threading.local()


def _drop(ref: weakref.ReferenceType) -> None:
    entry = getattr(_local, "entry", None)
    if entry is not None and entry.ref is ref:
        _local.entry = None


def quantized_input(x: torch.Tensor, key: Hashable, compute: Callable[[], QuantizedInput]) -> QuantizedInput:
    """Return ``compute()``, or the value it gave for this same unchanged ``x`` and ``key`` last time.

    ``key`` must hold everything besides ``x`` that the value depends on (threshold, rounding).
    """
    if x.is_inference():  # no version counter: an in-place write would go unseen
        return compute()
    full_key: tuple[Any, ...] = (key, tuple(x.shape), x.stride(), x.dtype, x.device)
    entry = getattr(_local, "entry", None)
    if entry is not None and entry.ref() is x and entry.version == x._version and entry.key == full_key:
        return entry.value
    value = compute()
    _local.entry = _Entry(weakref.ref(x, _drop), x._version, full_key, value)
    return value
