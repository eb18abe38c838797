"""Key-value cache quantization, fake-quantized inside the attention of the one forward pass that scores a window.

Keys (after RoPE and any key norm: what the cache holds) and values are
quantized and dequantized before attention reads them, at every position, in
the same forward that scores the window, as QuaRot's fake quantization does.
KIVI's own code (Liu et al. 2024, arXiv 2402.02750) lets the prefill attend to
its unquantized keys and values and quantizes only what it stores, so a
one-pass perplexity run that way measures no cache error at all; here every
query reads the keys and values the cache would hand it.

**How.** A function registered with transformers' ``AttentionInterface`` as
``"outliers_kvq"`` wraps the model's own implementation (``sdpa``, or the
family's ``eager_attention_forward``); ``quantized_kv_cache`` switches the
model's ``config._attn_implementation`` to it and back on exit, whatever
happens. Masks come from ``sdpa_mask`` (registered under the same name), and
are made additive for an eager model. The model's code is untouched; a family
whose attention does not go through the interface is refused by name.

**Numbers.** Asymmetric min-max with a zero point, as KIVI:
``scale = (max - min) / (2^b - 1)``, ``q = round((x - min) / scale)`` in
``[0, 2^b - 1]``, ``x̂ = q * scale + min`` (a constant slice is kept exactly);
``b`` = 8, 4 or 2. Arithmetic in float32, the result cast to the model's dtype.

**Granularity.** ``token``: one (min, max) per token and key-value head, over
the head dim. ``channel``: one per channel (head dim) and head, over a group of
``G`` consecutive tokens (default 32, KIVI's group size), complete groups
only. In one causal forward a query at position t may only read keys whose
statistics come from tokens <= t: key j is quantized for query t iff it lies
in a group complete at t, ``j < N + G * floor((t + 1 - N) / G)`` (N kept
tokens below); the query's own incomplete group stays in float (KIVI's
residual, here shorter than one group). The key tensor a query reads thus
depends on the query: queries are taken in blocks of equal boundary and the
wrapped attention runs once per block on keys (and channel-wise values)
quantized before the boundary and float after it, which is exactly scoring
every (query, key) pair against the key it may see. ``kivi``: KIVI's pairing,
keys per channel and values per token.

**Kept tokens.** The first ``keep`` tokens' keys and values stay in float
(attention sinks; IntactKV, KVSink). Channel groups start after them, so the
sinks' large activations never enter a group's range.

**Rotation.** ``rotate``: q, k and v are multiplied by the normalized Hadamard
matrix ``H / sqrt(d)`` of the head dim (``outliers.quant.hadamard``; QuaRot's
online head-dim rotation) before the cache is quantized, and the attention's
output by its transpose after: scores and outputs are unchanged in exact
arithmetic, and a key outlier channel is spread over the head dim.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from outliers.errors import InvalidArgumentError
from outliers.quant.kv_spec import BITS, DEFAULT_GROUP, MODES, KVCacheSpec, KVQuant, parse_kv_spec, parse_kv_specs

__all__ = [
    "KVCacheSpec",
    "KVQuant",
    "KVQuantStats",
    "ATTENTION_NAME",
    "BITS",
    "MODES",
    "DEFAULT_GROUP",
    "parse_kv_spec",
    "parse_kv_specs",
    "fake_quant",
    "quantize_keys_values",
    "complete_boundary",
    "quantized_kv_cache",
    "shared_copy",
]

ATTENTION_NAME = "outliers_kvq"  # the AttentionInterface (and mask interface) name


# ------------------------------------------------------------------ arithmetic


def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``x`` quantized and dequantized asymmetrically, one (min, max) per slice reduced over ``dim``; x's dtype."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    q = torch.round((xf - lo) / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(0, levels)
    return (q * scale + lo).to(x.dtype)


def _quantize(x: torch.Tensor, how: str, bits: int, keep: int, group: int | None) -> torch.Tensor:
    """``(batch, heads, seq, dim)`` with tokens from ``keep`` on quantized: per token, or per channel over each
    complete group of ``group`` tokens (the incomplete last one left in float)."""
    out = x.clone()
    seq = x.shape[-2]
    if how == "token":
        if keep < seq:
            out[..., keep:, :] = fake_quant(x[..., keep:, :], bits, -1)
        return out
    assert group is not None
    n = (seq - keep) // group if seq > keep else 0
    if n:
        end = keep + n * group
        grouped = x[..., keep:end, :].unflatten(-2, (n, group))
        out[..., keep:end, :] = fake_quant(grouped, bits, -2).flatten(-3, -2)
    return out


def quantize_keys_values(key: torch.Tensor, value: torch.Tensor, kv: KVQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(batch, kv_heads, seq, head_dim)`` as the cache holds them: the first ``kv.keep`` tokens in
    float, per-token slices quantized, per-channel groups quantized where complete (which queries may read them:
    ``complete_boundary``)."""
    s = kv.spec
    return _quantize(key, s.keys, s.bits, kv.keep, s.group), _quantize(value, s.values, s.bits, kv.keep, s.group)


def complete_boundary(position: int, keep: int, group: int) -> int:
    """The first key index a query at ``position`` reads in float: keys before it are kept tokens or lie in
    channel groups complete at ``position`` (``keep + group * floor((position + 1 - keep) / group)``)."""
    if position + 1 <= keep:
        return keep
    return keep + group * ((position + 1 - keep) // group)


# ------------------------------------------------------------------ the attention function


@dataclass
class KVQuantStats:
    """What one ``quantized_kv_cache`` saw: the attention calls it quantized, and the wrapped implementation."""

    implementation: str
    calls: int = 0
    blocks: int = 0  # wrapped-attention calls made (more than calls where channel groups split the queries)


@dataclass
class _Active:
    kv: KVQuant
    wrapped: Callable[..., Any]
    eager: bool  # the wrapped function wants an additive float mask
    stats: KVQuantStats


_ACTIVE: dict[int, _Active] = {}  # id(attention module) -> its settings, while a context is entered


def _causal(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    offset = kv_len - q_len
    i = torch.arange(q_len, device=device)[:, None] + offset
    return (torch.arange(kv_len, device=device)[None, :] <= i)[None, None]


def _for_wrapped(mask: torch.Tensor | None, state: _Active, q: torch.Tensor, k: torch.Tensor, causal: bool):
    """The mask as the wrapped function takes it: sdpa's (bool or None) as is; an eager one's additive."""
    if not state.eager:
        return mask
    if mask is None:
        if not causal:
            return None
        mask = _causal(q.shape[-2], k.shape[-2], q.device)
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
    return mask


@lru_cache(maxsize=8)
def _rotation(d: int) -> torch.Tensor:
    """The normalized Hadamard matrix of order ``d`` (float32, orthogonal)."""
    from outliers.quant.hadamard import hadamard_matrix

    h, _ = hadamard_matrix(d)
    return h.to(torch.float32) / math.sqrt(d)


def _attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """The registered attention: the cache quantized as the module's context says, then the wrapped attention."""
    state = _ACTIVE.get(id(module))
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} called the '{ATTENTION_NAME}' attention outside quantized_kv_cache "
            "(its config still names it: restore config._attn_implementation)"
        )
    state.stats.calls += 1
    kv, wrapped = state.kv, state.wrapped
    given = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if given is None else given)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if kv.keep >= kv_len and not kv.rotate:  # nothing quantized: the wrapped attention as it is
        state.stats.blocks += 1
        mask = _for_wrapped(attention_mask, state, query, key, causal)
        return wrapped(module, query, key, value, mask, *args, **kwargs)
    h = _rotation(query.shape[-1]).to(query) if kv.rotate else None
    if h is not None:
        query, key, value = query @ h, key @ h, value @ h
    kq, vq = quantize_keys_values(key, value, kv)
    spec = kv.spec
    grouped = spec.group is not None and "channel" in (spec.keys, spec.values)
    if not grouped:
        state.stats.blocks += 1
        mask = _for_wrapped(attention_mask, state, query, key, causal)
        out, weights = wrapped(module, query, kq, vq, mask, *args, **kwargs)
    else:
        assert spec.group is not None
        if attention_mask is None and causal:
            attention_mask = _causal(q_len, kv_len, query.device)
        mask = _for_wrapped(attention_mask, state, query, key, causal)
        offset = kv_len - q_len  # the queries are the last q_len positions of the keys
        bounds = [complete_boundary(offset + i, kv.keep, spec.group) for i in range(q_len)]
        outs, start = [], 0
        while start < q_len:
            b = bounds[start]
            stop = start + 1
            while stop < q_len and bounds[stop] == b:
                stop += 1
            keys = torch.cat([kq[..., :b, :], key[..., b:, :]], -2) if spec.keys == "channel" else kq
            values = torch.cat([vq[..., :b, :], value[..., b:, :]], -2) if spec.values == "channel" else vq
            part = mask if mask is None or mask.shape[-2] == 1 else mask[..., start:stop, :]
            o, _ = wrapped(module, query[..., start:stop, :], keys, values, part, *args, **kwargs)
            assert o.shape[1] == stop - start, "the wrapped attention returns (batch, seq, heads, head_dim)"
            outs.append(o)
            state.stats.blocks += 1
            start = stop
        out, weights = torch.cat(outs, 1), None
    if h is not None:
        out = out @ h.T
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, _attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _family(model: nn.Module) -> str:
    from outliers.arch.registry import architecture_of

    try:
        return architecture_of(model).name
    except InvalidArgumentError:
        return type(model).__name__


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The blocks' attention modules, from the architecture registry.

    Raises:
        InvalidArgumentError: a family the registry does not place the attention of.
    """
    from outliers.arch.registry import architecture_of, blocks

    arch = architecture_of(model)
    if arch.attention is None or arch.blocks is None:
        raise InvalidArgumentError(f"family {arch.name!r}: the registry does not say where its attention is")
    return [block.get_submodule(arch.attention) for _, _, block in blocks(model, arch)]


def _wrapped(model: nn.Module, attention: nn.Module, family: str) -> tuple[str, Callable[..., Any], bool]:
    """``(implementation, function, eager)``: the attention the model runs now, to wrap.

    Raises:
        InvalidArgumentError: the family's attention does not go through transformers' AttentionInterface,
            or it runs an implementation other than sdpa or eager.
    """
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    source = sys.modules.get(type(attention).__module__)
    if config is None or can_set is None or not can_set() or not hasattr(source, "ALL_ATTENTION_FUNCTIONS"):
        raise InvalidArgumentError(
            f"family {family!r}: its attention does not go through transformers' AttentionInterface "
            f"(transformers {transformers.__version__}), so its key-value cache cannot be quantized here"
        )
    impl = config._attn_implementation
    if impl == ATTENTION_NAME:
        raise InvalidArgumentError(f"family {family!r}: this model's key-value cache is quantized already")
    if impl == "sdpa":
        return impl, ALL_ATTENTION_FUNCTIONS["sdpa"], False
    if impl == "eager":
        fn = getattr(source, "eager_attention_forward", None)
        if fn is None:
            raise InvalidArgumentError(f"family {family!r}: its modeling code has no eager_attention_forward to wrap")
        if getattr(config, "reorder_and_upcast_attn", False):
            raise InvalidArgumentError(
                f"family {family!r}: reorder_and_upcast_attn bypasses the AttentionInterface under eager; "
                "load it with sdpa attention"
            )
        return impl, fn, True
    raise InvalidArgumentError(
        f"family {family!r} runs {impl!r} attention; the key-value cache is quantized around sdpa or eager only"
    )


def _configs(model: nn.Module) -> list[Any]:
    """Every config object the model's modules hold (the top one and any sub-configs), each once."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation_internal"):
            seen.setdefault(id(c), c)
    return list(seen.values())


@contextmanager
def quantized_kv_cache(model: nn.Module, kv: KVQuant) -> Iterator[KVQuantStats]:
    """Run ``model``'s attention on its keys and values quantized as ``kv`` says, inside the context.

    The model's attention implementation (sdpa or eager) is wrapped by the registered ``"outliers_kvq"``
    function; every config of the model names it inside the context and its own implementation again after,
    whatever happens. Yields the calls' count (``KVQuantStats``).

    Raises:
        InvalidArgumentError: a family whose attention does not go through transformers' AttentionInterface,
            one running another implementation than sdpa or eager, or a model already inside this context.
    """
    family = _family(model)
    modules = _attention_modules(model)
    if not modules:
        raise InvalidArgumentError(f"family {family!r}: no attention module found")
    impl, fn, eager = _wrapped(model, modules[0], family)
    if kv.rotate:
        cfg: Any = model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        try:
            _rotation(int(d))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--kv-rotate: no Hadamard matrix for head dim {d}: {e}") from None
    _register()
    stats = KVQuantStats(impl)
    configs = _configs(model)
    before = [c._attn_implementation_internal for c in configs]
    try:
        for m in modules:
            _ACTIVE[id(m)] = _Active(kv, fn, eager, stats)
        for c in configs:
            c._attn_implementation_internal = ATTENTION_NAME
        yield stats
    finally:
        for c, impl_before in zip(configs, before, strict=True):
            c._attn_implementation_internal = impl_before
        for m in modules:
            _ACTIVE.pop(id(m), None)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree and its config sharing every parameter and buffer with ``model``: its attention
    can be switched without switching the model's."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo |= {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)}
    return copy.deepcopy(model, memo=memo)
