"""Forward pre-hooks in context managers that always remove themselves, and a layer-input recorder.

Hooks are global state on the model: every hook registered here is removed
in a ``finally``, on every exit path, exceptions included. These describe
how to reach into any model, so quantization (calibration) and analysis
(capture) both use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from outliers.errors import InvalidArgumentError

__all__ = ["pre_hooks", "record_inputs"]


@contextmanager
def pre_hooks(model: nn.Module, names: list[str], fn: Callable[[str, nn.Module, tuple], None]) -> Iterator[None]:
    """Call ``fn(name, module, args)`` before each forward of the named submodules.

    Raises:
        InvalidArgumentError: a name that is not a submodule of ``model``.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise InvalidArgumentError(f"no submodule named {', '.join(missing)} in {type(model).__name__}")
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(lambda mod, args, name=name: fn(name, mod, args)))
        yield
    finally:
        for h in handles:
            h.remove()


def _keep(seen: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    seen.setdefault(name, x.detach().clone())


@torch.inference_mode()
def record_inputs(model: nn.Module, names: list[str], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model(input_ids)`` once and return the first positional input of each named module.

    For a linear layer this is its input X, shape ``(batch, seq, in_features)``:
    handy for looking at one real layer input (small batches: everything is kept).
    """
    seen: dict[str, torch.Tensor] = {}
    with pre_hooks(model, names, lambda name, mod, args: _keep(seen, name, args[0])):
        model(input_ids=input_ids)
    return seen
