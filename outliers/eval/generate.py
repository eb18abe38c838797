"""Greedy continuations of one prompt by the float and a quantized model, side by side.

What the LLM.int8() blog post shows after quantizing a model: both continue
the same prompt; where they part, and how likely each continuation is under
the float model, says more about a method than a perplexity alone.

Decoding is a plain argmax loop over the KV cache, not ``model.generate``:
``generate`` fills every setting the caller leaves unset from the model's
``generation_config``, and a hub file may set ``repetition_penalty``,
``top_k`` or ``no_repeat_ngram_size``, so it is greedy only for some models.
A continuation stops after ``max_new_tokens`` or at the tokenizer's EOS; the
EOS token is kept in the ids (and scored) but not in the text.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from outliers.errors import InvalidArgumentError

__all__ = ["Continuation", "GenerationResult", "greedy_continuation", "token_nlls", "side_by_side"]


@dataclass(frozen=True)
class Continuation:
    """One model's greedy continuation, scored by the float model."""

    ids: tuple[int, ...]  # the new tokens, EOS included when it stopped there
    text: str  # the new text, EOS left out
    nll: float  # mean NLL per token under the float model, nats
    ppl: float  # exp(nll)
    stopped_at_eos: bool


@dataclass(frozen=True)
class GenerationResult:
    """The float and the quantized model continuing one prompt; see ``side_by_side``."""

    prompt: str
    prompt_ids: tuple[int, ...]
    reference: Continuation  # the float model's
    quantized: Continuation
    diverge_at: int | None  # index of the first differing new token; None when the continuations are equal
    diverge_tokens: tuple[str, str] | None  # (reference, quantized) token at diverge_at, decoded
    method: str
    label: str
    max_new_tokens: int
    eos_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device(model: nn.Module) -> torch.device:
    from outliers.models.dispatch import input_device

    return input_device(model)  # a dispatched model may have its embeddings offloaded


# no_grad, not inference_mode: inference tensors keep no version counter, without which sibling
# int8 layers cannot share one quantized input (outliers.quant.shared_input)
@torch.no_grad()
def greedy_continuation(
    model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Return the argmax continuation of ``prompt_ids`` (long, ``(tokens,)``): up to ``max_new_tokens`` ids.

    Stops after ``eos_token_id`` (kept as the last id) when given.

    Raises:
        InvalidArgumentError: ``max_new_tokens < 1`` or an empty prompt.
    """
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.ndim != 1 or prompt_ids.numel() == 0:
        raise InvalidArgumentError(f"expected a non-empty prompt of shape (tokens,), got {tuple(prompt_ids.shape)}")
    # transformers 5 renamed the argument (past_key_values is deprecated); 4.x knows only the old name
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x = prompt_ids.to(_device(model)).unsqueeze(0)  # (1, tokens); one sequence, so no padding and no mask
    cache = None  # the model makes the right kind (sliding-window layers included) on the first step
    out: list[int] = []
    for _ in range(max_new_tokens):
        step = model(input_ids=x, use_cache=True, **{name: cache})
        cache = getattr(step, name)
        nxt = int(step.logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos_token_id:
            break
        x = torch.tensor([[nxt]], device=x.device)
    return out


# no_grad, not inference_mode: inference tensors keep no version counter, without which sibling
# int8 layers cannot share one quantized input (outliers.quant.shared_input)
@torch.no_grad()
def token_nlls(model: nn.Module, prompt_ids: torch.Tensor, continuation: list[int]) -> torch.Tensor:
    """Return float32 ``(len(continuation),)``: each new token's NLL given the prompt and the tokens before it.

    Teacher-forced, one forward over prompt + continuation.
    """
    if not continuation:
        raise InvalidArgumentError("continuation is empty: nothing to score")
    device = _device(model)
    cont = torch.tensor(continuation, device=device)
    x = torch.cat([prompt_ids.to(device), cont]).unsqueeze(0)  # (1, prompt + new)
    logits = model(input_ids=x).logits[0, prompt_ids.numel() - 1 : -1].float()  # position t predicts token t+1
    return -torch.log_softmax(logits, dim=-1).gather(-1, cont.unsqueeze(-1)).squeeze(-1).cpu()


def _text(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """The new text as it reads after the prompt (SentencePiece drops a leading space when ids are decoded alone)."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + ids)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(ids)


def _continuation(
    model: nn.Module, reference: nn.Module, tokenizer: Any, prompt_ids: torch.Tensor, n: int, eos: int | None
) -> Continuation:
    ids = greedy_continuation(model, prompt_ids, n, eos)
    nll = float(token_nlls(reference, prompt_ids, ids).mean())
    stopped = eos is not None and ids[-1] == eos
    text = _text(tokenizer, prompt_ids.tolist(), ids[:-1] if stopped else ids)
    return Continuation(tuple(ids), text, nll, math.exp(nll), stopped)


def _method_of(quantized: nn.Module) -> str:
    from outliers.quant.methods import METHODS

    # every quantized layer (Int8Linear, FP8Linear, W4A16Linear) names its registered method
    methods = {str(m.method) for m in quantized.modules() if getattr(m, "method", None) in METHODS}
    if len(methods) != 1:
        found = ", ".join(sorted(methods)) or "no quantized layers"
        raise InvalidArgumentError(f"cannot tell the quantized model's method ({found}); pass method=")
    return methods.pop()


def side_by_side(
    model: nn.Module,
    quantized: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    method: str | None = None,
) -> GenerationResult:
    """Return both greedy continuations of ``prompt``, where they part, and their perplexity under ``model``.

    Args:
        model: the float model; it also scores both continuations.
        quantized: the same model quantized (``outliers.quant.model.quantized_copy``).
        tokenizer: the models' tokenizer; the prompt gets its special tokens as
            the tokenizer adds them, and its EOS ends a continuation.
        prompt: the text to continue.
        max_new_tokens: the most new tokens per continuation.
        method: the name recorded for ``quantized``; None reads it off its
            ``Int8Linear`` layers.

    Raises:
        InvalidArgumentError: ``max_new_tokens < 1``, a prompt that tokenizes
            to nothing, or ``method=None`` with no single method in ``quantized``.
    """
    from outliers.quant.methods import METHODS, label

    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    method = _method_of(quantized) if method is None else method
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    if prompt_ids.numel() == 0:
        raise InvalidArgumentError(f"prompt {prompt!r} tokenizes to no tokens")
    eos = getattr(tokenizer, "eos_token_id", None)
    ref = _continuation(model, model, tokenizer, prompt_ids, max_new_tokens, eos)
    quant = _continuation(quantized, model, tokenizer, prompt_ids, max_new_tokens, eos)
    # Equal up to the shorter one means equal: the shorter one ended at an EOS the other would also have stopped at.
    diverge_at = next((i for i, (a, b) in enumerate(zip(ref.ids, quant.ids, strict=False)) if a != b), None)
    tokens = None
    if diverge_at is not None:
        tokens = (tokenizer.decode([ref.ids[diverge_at]]), tokenizer.decode([quant.ids[diverge_at]]))
    return GenerationResult(
        prompt=prompt,
        prompt_ids=tuple(prompt_ids.tolist()),
        reference=ref,
        quantized=quant,
        diverge_at=diverge_at,
        diverge_tokens=tokens,
        method=method,
        label=label(method) if method == "fp32" or method in METHODS else method,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
    )
