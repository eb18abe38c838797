"""Attention sinks: how much attention every head pays to the first token of its window.

Xiao et al. 2023 ("Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453) found that heads put a large share of their attention on the
first token whatever it is; Gu et al. 2024 ("When Attention Sink Emerges in
Language Models", arXiv 2410.10781) measure it per head as the mean attention
weight that queries give to the first token, and count a head as a sink when
that score exceeds ε (0.3 by default): the *sink rate* is the share of such
heads. Sun et al. 2024 ("Massive Activations in Large Language Models", arXiv
2402.17762) tie sinks to the first token's huge hidden state, so the block
outputs' L2 norms at the first token and at the others are recorded beside.

Here a head's score is the mean over every query position t >= 0 of a window
of its attention weight on the window's first token (Gu et al.'s average over
t >= k, the first query's own weight of 1 included), averaged over windows.
Forward hooks on each attention module reduce its probabilities to a
``(heads,)`` sum as soon as the module returns them, so one layer's attention
matrix exists at a time; ``output_attentions`` is never asked for. The
probabilities come from transformers' eager attention: a model loaded with
another implementation is switched to ``"eager"`` for the run and back after.

Sliding-window layers (Gemma 3's local layers, ``config.layer_types``) whose
window is shorter than the analysis window cannot see the first token from
late queries: they are flagged ``local``, their heads keep their scores, and
``sink_rate`` leaves them out (``sink_rate_all`` counts every head).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.scan import cut_windows
from outliers.arch.lmhead import run_for_hooks
from outliers.arch.registry import architecture_of, blocks
from outliers.display import named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.models.dispatch import input_device

__all__ = ["SinkResult", "attention_sinks", "sink_hooks", "eager_attention", "local_layers"]


@dataclass(frozen=True)
class SinkResult:
    """Per-head first-token attention scores, the sink rate and per-layer first-token norms.

    ``heads``: layer, head, score, local, sink (score > epsilon). ``norms``:
    layer, first_token_norm, other_tokens_norm (mean L2 norms of the block
    outputs). ``sink_rate`` is over the heads of non-local layers (NaN if
    every layer is local), ``sink_rate_all`` over every head.
    """

    heads: pd.DataFrame
    sink_rate: float
    sink_rate_all: float
    epsilon: float
    window: int
    n_windows: int
    bos: str  # "corpus" or "window", as in outliers.analysis.scan
    norms: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` heads with the highest scores."""
        return self.heads.sort_values("score", ascending=False, kind="stable").head(n)

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON (tables as lists of records), the ``meta`` facts first."""
        return {
            **self.meta,
            "sink_rate": self.sink_rate,
            "sink_rate_all": self.sink_rate_all,
            "n_heads": len(self.heads),
            "n_counted_heads": int((~self.heads.local).sum()),  # the heads sink_rate is over
            "n_sink_heads": int((self.heads.sink & ~self.heads.local).sum()),
            "local_layers": sorted({int(x) for x in self.heads[self.heads.local].layer}),
            "epsilon": self.epsilon,
            "window": self.window,
            "bos": self.bos,
            "n_windows": self.n_windows,
            "heads": self.heads.to_dict(orient="records"),
            "norms": self.norms.to_dict(orient="records"),
        }

    def _repr_html_(self) -> str:
        return sinks_html(self)


def local_layers(model: nn.Module, window: int) -> set[int]:
    """Indices of the sliding-window layers whose window cannot reach the first token from every query.

    A sliding layer lets query t see keys s > t - sliding_window (transformers'
    masks), so it sees position 0 from every query of a ``window``-token
    window only when ``window <= sliding_window``. Layers come from
    ``config.layer_types`` ("sliding_attention") or, without it, from a
    model-wide ``config.sliding_window`` (Mistral).
    """
    config = getattr(model, "config", None)
    size = getattr(config, "sliding_window", None)
    if not size or window <= size:
        return set()
    types = getattr(config, "layer_types", None)
    n = getattr(config, "num_hidden_layers", 0)
    if types:
        return {i for i, t in enumerate(types) if t == "sliding_attention"}
    return set(range(n)) if getattr(config, "use_sliding_window", True) else set()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with transformers' eager attention (which returns probabilities), then restore the old one."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)  # type: ignore[operator]


@contextmanager
def sink_hooks(model: nn.Module) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Add first-token attention and norm sums per layer while the block runs; every hook is removed on exit.

    Yields ``{"attn": {layer: (heads,) sum over batch and queries of the weight on key 0}, "first":
    {layer: sum of the first token's block-output norms}, "other": {layer: the same over the other tokens}}``.

    Raises:
        InvalidArgumentError: a family without blocks or attention in the registry; during a forward, an
            attention that returns no probabilities (not eager) or is not causal (an encoder).
    """
    arch = architecture_of(model)
    if arch.attention is None:
        raise InvalidArgumentError(
            f"architecture {arch.name!r} does not name its attention module; register it (outliers.arch)"
        )
    sums: dict[str, dict[int, torch.Tensor]] = {"attn": {}, "first": {}, "other": {}}

    def add(kind: str, layer: int, value: torch.Tensor) -> None:
        value = value.detach().float().cpu().double()
        sums[kind][layer] = sums[kind][layer] + value if layer in sums[kind] else value

    def on_attention(layer: int, out: Any) -> None:
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise InvalidArgumentError(
                "the attention returned no probabilities; load the model with attn_implementation='eager'"
            )
        if w.shape[-1] > 1 and float(w[:, :, 0, 1:].abs().max()) > 1e-6:
            raise InvalidArgumentError(
                "the first query attends to later tokens: not a causal LM (an encoder?); sinks need a decoder"
            )
        add("attn", layer, w[:, :, :, 0].float().sum(dim=(0, 2)))

    def on_block(layer: int, out: Any) -> None:
        h = out[0] if isinstance(out, tuple) else out
        norms = h.detach().float().norm(dim=-1)  # (batch, seq)
        add("first", layer, norms[:, 0].sum())
        add("other", layer, norms[:, 1:].sum())

    handles = []
    try:
        for layer, _, block in blocks(model, arch):
            attention = block.get_submodule(arch.attention)
            handles.append(attention.register_forward_hook(lambda m, a, o, i=layer: on_attention(i, o)))
            handles.append(block.register_forward_hook(lambda m, a, o, i=layer: on_block(i, o)))
        yield sums
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def attention_sinks(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    max_windows: int = 4,
    batch_size: int = 4,
    epsilon: float = 0.3,
    bos_token_id: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> SinkResult:
    """Measure every head's mean attention to its window's first token over up to ``max_windows`` windows.

    Windows are cut as in ``outliers.analysis.scan`` (``bos_token_id``: each
    window is that BOS + ``window - 1`` corpus tokens). ``meta`` (model facts)
    is kept in the result and leads its ``to_dict``.

    Raises:
        InvalidArgumentError: epsilon outside (0, 1), window < 2, max_windows or batch_size < 1, an
            unregistered family, an encoder.
        CorpusError: fewer tokens than one window.
    """
    if not 0 < epsilon < 1:
        raise InvalidArgumentError(f"epsilon must be in (0, 1), got {epsilon!r}")
    if window < 2 or max_windows < 1 or batch_size < 1:
        raise InvalidArgumentError(
            f"window must be >= 2 and max_windows, batch_size >= 1; got {window}, {max_windows}, {batch_size}"
        )
    windows, _ = cut_windows(ids, window, bos_token_id=bos_token_id, max_windows=max_windows)
    n = len(windows)
    device = input_device(model)  # a dispatched model may have its embeddings offloaded
    with eager_attention(model), sink_hooks(model) as sums:
        for start in tqdm(range(0, n, batch_size), desc="sinks", unit="batch", disable=not progress, leave=False):
            run_for_hooks(model, windows[start : start + batch_size].to(device))
    local = local_layers(model, window)
    rows = [
        {"layer": layer, "head": h, "score": float(s) / (n * window), "local": layer in local}
        for layer, scores in sorted(sums["attn"].items())
        for h, s in enumerate(scores.tolist())
    ]
    heads = pd.DataFrame(rows, columns=["layer", "head", "score", "local"])
    heads["sink"] = heads.score > epsilon
    norms = pd.DataFrame(
        [
            {
                "layer": layer,
                "first_token_norm": float(sums["first"][layer]) / n,
                "other_tokens_norm": float(sums["other"][layer]) / (n * (window - 1)),
            }
            for layer in sorted(sums["first"])
        ],
        columns=["layer", "first_token_norm", "other_tokens_norm"],
    )
    counted = heads[~heads.local]
    return SinkResult(
        heads=heads,
        sink_rate=float(counted.sink.mean()) if len(counted) else math.nan,
        sink_rate_all=float(heads.sink.mean()) if len(heads) else math.nan,
        epsilon=float(epsilon),
        window=window,
        n_windows=n,
        bos="window" if bos_token_id is not None else "corpus",
        norms=norms,
        meta=dict(meta or {}),
    )


def sinks_html(s: SinkResult) -> str:
    """``SinkResult``: the sink rate and its head counts, the heads by score (capped)."""
    heads = s.heads
    counted = heads[~heads.local]
    local = sorted({int(x) for x in heads[heads.local].layer})
    rows: list[tuple[Any, ...]] = [
        ("sink rate", s.sink_rate, f"{int(counted.sink.sum())} of {len(counted)} heads score > {s.epsilon:g}"),
    ]
    if local:
        rows.append(("rate, all heads", s.sink_rate_all, f"local layers left out above: {', '.join(map(str, local))}"))
    rows.append(("windows", s.n_windows, f"of {s.window} tokens"))
    settings = [
        ("model", s.meta.get("model")),
        ("corpus", s.meta.get("corpus")),
        ("epsilon", f"{s.epsilon:g}"),
        ("window", s.window),
        ("bos", s.bos),
        *provenance(s.meta),
    ]
    tables = [("heads by mean attention to the first token", s.top(len(heads)))]
    return render_html(named("Attention sinks", s.meta.get("model", "")), rows, settings, tables=tables)
