"""Where keys and values are: hooks on their projections, the cache a forward fills, RoPE's channel pairs.

Used by ``outliers.analysis.kvcache``. The projections come from the
architecture registry (``KeyValues``: the key and value linears, a fused
q/k/v layout, the key norm, the kind of RoPE); every tensor is handed on as
``(batch, seq, kv_heads * head_dim)``, channel ``c = kv_head * head_dim + dim``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from torch import nn

from outliers.arch.lmhead import run_for_hooks
from outliers.arch.registry import KeyValues, architecture_of, blocks
from outliers.errors import InvalidArgumentError

__all__ = ["OnKV", "kv_layout", "rotary_dims", "rope_pairs", "kv_hooks", "run_with_cache"]

OnKV = Callable[[str, int, torch.Tensor], None]  # (kind, layer, x (batch, seq, kv_heads * head_dim))


def kv_layout(model: nn.Module) -> tuple[KeyValues, int]:
    """Return the family's ``KeyValues`` and the head dim.

    Raises:
        InvalidArgumentError: a family the registry does not locate keys and values for.
    """
    arch, config = architecture_of(model), getattr(model, "config", None)
    if arch.kv is None or arch.blocks is None:
        raise InvalidArgumentError(f"architecture {arch.name!r} does not say where its keys and values are")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[union-attr]
    return arch.kv, int(head_dim)


def rope_pairs(channels: int, head_dim: int, rotary_dim: int) -> np.ndarray:
    """Return ``(channels,)`` pair ids: channels d and d + r/2 of a head share one (rotate_half), the rest their own."""
    head, dim = np.divmod(np.arange(channels), head_dim)
    half = max(rotary_dim // 2, 1)
    return np.where(dim < rotary_dim, head * head_dim + dim % half, head * head_dim + dim)


def rotary_dims(model: nn.Module, kv: KeyValues, head_dim: int, n_layers: int) -> tuple[int, list[bool]]:
    """The rotary dims per head and whether each layer applies RoPE (SmolLM3: ``no_rope_layers``)."""
    config = getattr(model, "config", None)
    if kv.rope is None:
        return 0, [False] * n_layers
    params = getattr(config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor or getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 1.0
    flags = getattr(config, "no_rope_layers", None) if kv.rope == "per-layer" else None
    return int(head_dim * factor), [bool(flags[i]) if flags else True for i in range(n_layers)]


@contextmanager
def kv_hooks(model: nn.Module, fn: OnKV) -> Iterator[None]:
    """Call ``fn(kind, layer, x)`` on every block's projected keys and values (and key-norm output); hooks go on exit.

    ``x`` is ``(batch, seq, kv_heads * head_dim)``; kinds are ``keys``, ``values`` and ``keys_normed`` (the
    family's key norm applied to the projected keys, as its attention does).

    Raises:
        InvalidArgumentError: a family the registry does not locate keys and values for, or an unknown layout.
    """
    kv, head_dim = kv_layout(model)
    if kv.fused not in (None, "qkv", "heads,qkv"):
        raise InvalidArgumentError(f"unknown fused q/k/v layout {kv.fused!r}")

    def on_keys(layer: int, block: nn.Module, x: torch.Tensor) -> None:
        fn("keys", layer, x)
        if kv.key_norm:
            # the norm applied here to the projection's output: its own output's layout differs by family
            # ((batch, heads, seq, head_dim) in Gemma 3, (batch, seq, heads, head_dim) in Qwen 3)
            norm = block.get_submodule(kv.key_norm)
            whole = getattr(getattr(norm, "weight", None), "numel", lambda: 0)() == x.shape[-1]  # OLMo 2
            fn("keys_normed", layer, norm(x) if whole else norm(x.unflatten(-1, (-1, head_dim))).flatten(2))

    def on_fused(layer: int, block: nn.Module, out: torch.Tensor) -> None:
        qkv = out.chunk(3, -1) if kv.fused == "qkv" else out.unflatten(-1, (-1, 3 * head_dim)).chunk(3, -1)
        on_keys(layer, block, qkv[1].flatten(2))
        fn("values", layer, qkv[2].flatten(2))

    def hook(module: nn.Module, call: Callable[[torch.Tensor], None]) -> None:
        handles.append(module.register_forward_hook(lambda m, a, out: call(out.flatten(2))))

    handles: list = []
    try:
        for layer, _, block in blocks(model):
            if kv.fused:
                hook(block.get_submodule(kv.keys), partial(on_fused, layer, block))
            else:
                hook(block.get_submodule(kv.keys), partial(on_keys, layer, block))
                hook(block.get_submodule(kv.values), partial(fn, "values", layer))
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_cache(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one forward with a fresh full ``DynamicCache``; return each layer's cached (keys, values).

    Both ``(batch, kv_heads, seq, head_dim)``, as the attention stored them (after RoPE and any key norm).
    """
    from transformers import DynamicCache

    # transformers 5 renamed the argument (past_key_values is deprecated); 4.x knows only the old name
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = run_for_hooks(model, input_ids, attention_mask=attention_mask, use_cache=True, **{name: DynamicCache()})
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
