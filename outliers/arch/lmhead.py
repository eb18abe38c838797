"""A causal LM split into its body (tokens -> final hidden states) and its head (hidden -> logits).

Scoring needs log-probabilities over the whole vocabulary, but a
``batch x length x vocabulary`` float32 buffer is large (SmolLM2: 4 x 512 x
49,152 x 4 B = 400 MB; Gemma-3's 262k vocabulary, 2 GB) and comparing two
models would hold two of them. With the model split, the body runs once per
batch and keeps only ``(batch, length, hidden)``; the head then runs over a few
positions at a time, so no full logits buffer is ever made.

``split_lm`` returns None for models whose logits are not ``lm_head(hidden)``
(a scaled or soft-capped head it does not know, a wrapper without
``get_output_embeddings``): callers fall back to the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SplitLM", "split_lm", "positions_per_chunk", "run_for_hooks"]

# Config fields that change logits after lm_head; only soft-capping is applied here,
# the others make split_lm decline (the model's own forward is then used).
_UNSUPPORTED_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale")
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB of float32


@dataclass(frozen=True)
class SplitLM:
    body: nn.Module  # input_ids -> BaseModelOutput with last_hidden_state (batch, length, hidden)
    head: nn.Module  # (..., hidden) -> (..., vocab)
    softcap: float | None = None

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the final hidden states, shape ``(batch, length, hidden)``."""
        return self.body(input_ids=input_ids).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits for ``hidden`` of shape ``(..., hidden)``."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _config_value(config, name: str):
    text = getattr(config, "get_text_config", None)
    cfg = text() if callable(text) else config
    return getattr(cfg, name, None)


def split_lm(model: nn.Module) -> SplitLM | None:
    """Return the body/head split of a transformers causal LM, or None where it is not known to be exact."""
    get_head: Callable | None = getattr(model, "get_output_embeddings", None)
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if get_head is None or body is None or body is model or config is None:
        return None
    head = get_head()
    if head is None:
        return None
    if any(_config_value(config, k) not in (None, 1, 1.0) for k in _UNSUPPORTED_SCALES):
        return None
    return SplitLM(body, head, _config_value(config, "final_logit_softcapping"))


def positions_per_chunk(vocab_size: int) -> int:
    """How many positions' logits to make at once so that one chunk stays near 32 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def run_for_hooks(model: nn.Module, input_ids: torch.Tensor, **kwargs):
    """Run ``model`` for what its hooks see, making logits for the last position only where it can.

    Analyses that read activations through hooks (scans, sinks, super weights,
    key caches) have no use for the logits, yet a full forward makes a
    ``batch x length x vocabulary`` float32 buffer: 400 MB for SmolLM2 at 4 x
    512 tokens, 2 GB for Gemma-3's 262k vocabulary, more than its weights.
    transformers' causal LMs take ``logits_to_keep``; other models run whole.
    """
    if "logits_to_keep" in _parameters(type(model)):
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs)


def _parameters(cls: type[nn.Module]) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)
