"""Key-cache channels: per-channel statistics of keys and values, as projected and as they enter the cache.

KIVI (Liu et al. 2024, arXiv 2402.02750) and KVQuant (Hooper et al. 2024,
arXiv 2401.18079) found that keys have fixed outlier channels, so they
quantize keys per channel (KVQuant: before RoPE), while values have none and
are quantized per token. Measured here per layer and channel (``channel =
kv_head * head_dim + dim``) for ``keys`` (the key projection's output, a
fused q/k/v split by the registry's layout), ``keys_normed`` (the key norm's
output: Gemma 3, Qwen 3, OLMo 2), ``keys_cached`` (after the key norm and
RoPE, read from the ``DynamicCache`` the forward returns; families with
neither, GPT-2 and OPT, cache the projected keys, measured once: ``cached ==
"projected"``) and ``values`` (no registered family norms or rotates them:
the projected values are the cached ones).

Per (kind, layer, channel): max |x|, mean |x| and std over tokens, padding
left out. Per (kind, layer): a channel is an **outlier** when its max |x| >=
``k`` x the median over the layer's channels of max |x| (k = 4 by default);
the **concentration** is the top channel's max over that median; the
**token concentration** the largest token max |x| over the median token max
(of the first ``token_sample`` tokens). RoPE rotates the pairs (d, d + r/2)
of each head (r rotary dims, transformers' rotate_half layout), so a
pre-RoPE outlier spreads over its pair: ``overlap`` is the share of pre-RoPE
outlier channels (of ``keys_normed`` where there is one) still outliers in
the cache, ``pair_overlap`` the same over pairs. Quantization: int8 absmax
of each window, per token (a scale per token and head) and per channel (a
scale per head dim over the window's tokens; KIVI's token groups of 32-128
are finer), as the relative Frobenius error ||X - X̂|| / ||X|| per layer.

The cache is a fresh ``DynamicCache`` without a config, so that Gemma 3's
sliding-window layers keep every key, not the last window's; it is dropped
after each batch. Memory does not grow with the tokens seen. Hooks and
cache reading: ``outliers.analysis.kvcache_capture``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.kvcache_capture import kv_hooks, kv_layout, rope_pairs, rotary_dims, run_with_cache
from outliers.analysis.scan import cut_windows
from outliers.display import named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.models.dispatch import input_device
from outliers.quant.quantizers import dequantize_absmax, quantize_absmax

__all__ = ["KVCacheResult", "kv_channels", "KINDS"]

KINDS = ("keys", "keys_normed", "keys_cached", "values")


@dataclass(frozen=True)
class KVCacheResult:
    """Per-channel and per-layer statistics of keys and values (see the module docstring).

    ``channels``: kind, layer, head, dim, channel, absmax, mean_abs, std, outlier. ``layers``: kind,
    layer, top_channel, top_absmax, median_absmax, concentration, n_outliers, outliers (channel list),
    token_concentration, err_per_token, err_per_channel. ``rope``: layer, rope, n_pre, n_post, overlap,
    pair_overlap (empty where the cache holds the projected keys). ``summary()``: per kind.
    """

    channels: pd.DataFrame
    layers: pd.DataFrame
    rope: pd.DataFrame
    k: float
    cached: str  # "measured", or "projected": no RoPE or key norm, the cache holds the projected keys
    kv_heads: int
    head_dim: int
    rotary_dim: int  # 0 without RoPE
    window: int
    n_windows: int
    n_tokens: int  # unpadded tokens measured
    bos: str  # "corpus", "window" or "rows" (2-D input)
    meta: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        return kvcache_html(self)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind: share of layers with outlier channels, median and max concentration, mean errors."""
        out = {}
        for kind, g in self.layers.groupby("kind", sort=False):
            out[str(kind)] = {
                "layers_with_outliers": float((g.n_outliers > 0).mean()),
                "median_concentration": float(g.concentration.median()),
                "max_concentration": float(g.concentration.max()),
                "median_token_concentration": float(g.token_concentration.median()),
                "err_per_token": float(g.err_per_token.mean()),
                "err_per_channel": float(g.err_per_channel.mean()),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON but the per-channel table (CSV), the ``meta`` facts first."""
        facts = ("k", "cached", "kv_heads", "head_dim", "rotary_dim", "window", "n_windows", "n_tokens", "bos")
        return {
            **self.meta,
            **{f: getattr(self, f) for f in facts},
            "summary": self.summary(),
            "rope_overlap": float(self.rope.overlap.mean()) if len(self.rope) else None,
            "rope_pair_overlap": float(self.rope.pair_overlap.mean()) if len(self.rope) else None,
            "layers": self.layers.to_dict(orient="records"),
            "rope": self.rope.to_dict(orient="records"),
        }


@dataclass
class _Running:
    """Running sums of one (kind, layer), float64 on the CPU: memory does not grow with the tokens."""

    channels: int
    tokens: int = 0
    sums: torch.Tensor = field(init=False)  # (4, channels): max |x|, sum |x|, sum x, sum x^2
    token_max: list[torch.Tensor] = field(default_factory=list)  # the first tokens' max |x|, bounded
    errors: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # per-token, per-channel, ||X||^2

    def __post_init__(self) -> None:
        self.sums = torch.zeros(4, self.channels, dtype=torch.float64)

    def add(self, x: torch.Tensor, keep: torch.Tensor, head_dim: int, sample: int) -> None:
        """Add ``x (batch, seq, channels)`` at the positions where ``keep (batch, seq)`` is True."""
        x, keep = x.detach().float(), keep.to(x.device)  # a model split over devices: hooks see several
        rows = x[keep].double().cpu()  # (tokens, channels)
        if not len(rows):
            return
        a = rows.abs()
        self.tokens += len(rows)
        self.sums[0] = torch.maximum(self.sums[0], a.amax(0))
        self.sums[1:] += torch.stack([a.sum(0), rows.sum(0), rows.square().sum(0)])
        seen = sum(len(t) for t in self.token_max)
        if seen < sample:
            self.token_max.append(a.amax(1)[: sample - seen])
        z = (x * keep.unsqueeze(-1)).unflatten(-1, (-1, head_dim))  # (batch, seq, heads, head_dim), padding 0
        for i, dim in enumerate((-1, 1)):  # one scale per (token, head); per (head, dim) over a window's tokens
            q, absmax = quantize_absmax(z, dim)
            self.errors[i] += float((dequantize_absmax(q, absmax, dim) - z).square().sum())
        self.errors[2] += float(z.square().sum())

    def channel_frame(self, kind: str, layer: int, head_dim: int, k: float) -> pd.DataFrame:
        n = max(self.tokens, 1)
        mean = self.sums[2] / n
        head, dim = np.divmod(np.arange(self.channels), head_dim)
        absmax = self.sums[0].numpy()
        return pd.DataFrame(
            {
                "kind": kind,
                "layer": layer,
                "head": head,
                "dim": dim,
                "channel": np.arange(self.channels),
                "absmax": absmax,
                "mean_abs": (self.sums[1] / n).numpy(),
                "std": (self.sums[3] / n - mean.square()).clamp(min=0).sqrt().numpy(),
                "outlier": (absmax >= k * np.median(absmax)) & (np.median(absmax) > 0),
            }
        )

    def layer_row(self, kind: str, layer: int, channels: pd.DataFrame) -> dict[str, Any]:
        absmax, med = channels.absmax.to_numpy(), float(channels.absmax.median())
        top = int(absmax.argmax())
        tokens = torch.cat(self.token_max) if self.token_max else torch.zeros(1)
        tok_med = float(tokens.median())
        per_token, per_channel, energy = self.errors
        return {
            "kind": kind,
            "layer": layer,
            "top_channel": top,
            "top_absmax": float(absmax[top]),
            "median_absmax": med,
            "concentration": float(absmax[top]) / med if med > 0 else float("nan"),
            "n_outliers": int(channels.outlier.sum()),
            "outliers": [int(c) for c in channels.channel[channels.outlier]],
            "token_concentration": float(absmax[top]) / tok_med if tok_med > 0 else float("nan"),
            "err_per_token": (per_token / energy) ** 0.5 if energy > 0 else float("nan"),
            "err_per_channel": (per_channel / energy) ** 0.5 if energy > 0 else float("nan"),
        }


def _overlap(pre: set[int], post: set[int]) -> float:
    return len(pre & post) / len(pre) if pre else float("nan")


def _rope_row(layer: int, rope: bool, pre: pd.DataFrame, post: pd.DataFrame, pairs: np.ndarray) -> dict[str, Any]:
    """How many outlier channels before and after RoPE, and the share of the former kept, as channels and pairs."""
    a, b = ({int(c) for c in f.channel[f.outlier]} for f in (pre, post))
    paired = _overlap({int(pairs[c]) for c in a}, {int(pairs[c]) for c in b})
    return {
        "layer": layer,
        "rope": rope,
        "n_pre": len(a),
        "n_post": len(b),
        "overlap": _overlap(a, b),
        "pair_overlap": paired,
    }


@torch.inference_mode()
def kv_channels(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    max_windows: int = 4,
    batch_size: int = 4,
    k: float = 4.0,
    bos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    token_sample: int = 16384,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> KVCacheResult:
    """Measure keys' and values' per-channel statistics, projected and cached, over up to ``max_windows`` windows.

    Args:
        ids: a 1-D corpus, cut into windows as ``outliers.analysis.scan`` does (``bos_token_id``: each
            window is BOS + ``window - 1`` tokens); or ``(rows, seq)`` windows used as they are, with
            ``attention_mask`` of that shape (0: padding, left out).
        k: a channel is an outlier at max |x| >= k x its layer's median channel max (> 1).
        token_sample: how many tokens' max |x| per (kind, layer) the token concentration's median is over.
        meta: model facts, kept in the result and leading its ``to_dict``.

    Raises:
        InvalidArgumentError: k <= 1, window < 2, max_windows, batch_size or token_sample < 1, a mask of
            another shape, a family whose keys and values the registry does not locate.
        CorpusError: fewer tokens than one window.
    """
    if not k > 1:
        raise InvalidArgumentError(f"k must be > 1, got {k!r}")
    if window < 2 or max_windows < 1 or batch_size < 1 or token_sample < 1:
        raise InvalidArgumentError(
            f"window must be >= 2 and max_windows, batch_size, token_sample >= 1; got {window}, {max_windows}, "
            f"{batch_size}, {token_sample}"
        )
    kv, head_dim = kv_layout(model)
    if attention_mask is not None and attention_mask.shape != ids.shape or ids.dim() not in (1, 2):
        shape, got = tuple(ids.shape), None if attention_mask is None else tuple(attention_mask.shape)
        raise InvalidArgumentError(
            f"expected ids (tokens,) or (rows, seq) and a mask of their shape; got {shape}, {got}"
        )
    if ids.dim() == 2:
        windows, bos = ids, "rows"
    else:
        windows, _ = cut_windows(ids, window, bos_token_id=bos_token_id, max_windows=max_windows)
        bos = "window" if bos_token_id is not None else "corpus"
    keep_all = torch.ones_like(windows, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    cached = "measured" if kv.rope is not None or kv.key_norm else "projected"
    device = input_device(model)  # a dispatched model may have its embeddings offloaded
    runs: dict[tuple[str, int], _Running] = {}
    state: dict[str, torch.Tensor] = {}

    def add(kind: str, layer: int, x: torch.Tensor) -> None:
        if (kind, layer) not in runs:
            runs[kind, layer] = _Running(x.shape[-1])
        runs[kind, layer].add(x, state["keep"], head_dim, token_sample)

    with kv_hooks(model, add):
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc="kvcache", unit="batch", disable=not progress, leave=False):
            batch, keep = windows[start : start + batch_size].to(device), keep_all[start : start + batch_size]
            state["keep"] = keep.to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            if cached == "projected":
                model(input_ids=batch, attention_mask=mask, use_cache=False)
                continue
            for layer, (keys, _) in enumerate(run_with_cache(model, batch, mask)):
                add("keys_cached", layer, keys.transpose(1, 2).flatten(2))  # (batch, seq, kv_heads * head_dim)
    order = {kind: i for i, kind in enumerate(KINDS)}
    frames = {
        key: runs[key].channel_frame(*key, head_dim, k) for key in sorted(runs, key=lambda t: (order[t[0]], t[1]))
    }
    channels = pd.concat(frames.values(), ignore_index=True)
    layers = pd.DataFrame([runs[key].layer_row(*key, frame) for key, frame in frames.items()])
    n_channels = int(frames[next(iter(frames))].shape[0])
    rotary, with_rope = rotary_dims(model, kv, head_dim, 1 + max(t[1] for t in runs))
    pairs = rope_pairs(n_channels, head_dim, rotary)
    rope = [
        _rope_row(layer, with_rope[layer], frames["keys_normed" if kv.key_norm else "keys", layer], frame, pairs)
        for (kind, layer), frame in frames.items()
        if kind == "keys_cached"
    ]
    return KVCacheResult(
        channels=channels,
        layers=layers,
        rope=pd.DataFrame(rope, columns=["layer", "rope", "n_pre", "n_post", "overlap", "pair_overlap"]),
        k=float(k),
        cached=cached,
        kv_heads=n_channels // head_dim,
        head_dim=head_dim,
        rotary_dim=rotary,
        window=int(windows.shape[1]),
        n_windows=len(windows),
        n_tokens=int(keep_all.sum()),
        bos=bos,
        meta=dict(meta or {}),
    )


def kvcache_html(r: KVCacheResult) -> str:
    """``KVCacheResult``: per kind, layers with outlier channels, concentration, per-token vs per-channel error."""
    rows: list[tuple[Any, ...]] = [
        (
            kind,
            f"{100 * v['layers_with_outliers']:.0f} % of layers",
            f"median concentration {v['median_concentration']:.2f}; int8 error per token "
            f"{v['err_per_token']:.4f}, per channel {v['err_per_channel']:.4f}",
        )
        for kind, v in r.summary().items()
    ]
    settings = [("model", r.meta.get("model")), ("k", f"{r.k:g}"), ("window", r.window), *provenance(r.meta)]
    tables = [("per layer", r.layers)]
    return render_html(named("Key and value channels", r.meta.get("model", "")), rows, settings, tables=tables)
