"""Perplexity, measured one documented way and recorded with its settings,
its per-window numbers, a bootstrap interval and, against a reference model,
the agreement measures that perplexity alone hides.

Windows are cut as ``outliers.eval.windows`` says (protocols ``chunks`` and
``sliding``, BOS handling; ``docs/protocols.md``).
``ppl = exp(sum of token NLLs / tokens scored)``, NLLs in float32 whatever the
model's dtype. Windows of equal length are batched. Given a ``reference``
model, the same windows are scored by both, and the result adds the paired
difference in perplexity, the mean KL(P_ref || P_model) per token and the
top-1 agreement, each with a bootstrap interval over windows
(``outliers.eval.intervals``), and KLD's percentiles and the change in the next
token's probability as llama.cpp reports them (``outliers.eval.agreement``).
"""

from __future__ import annotations

import math
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.arch.lmhead import SplitLM, positions_per_chunk, split_lm
from outliers.errors import InvalidArgumentError
from outliers.eval.agreement import agreement_fields
from outliers.eval.intervals import delta_ppl_pct_interval, ppl_interval, rate_interval
from outliers.eval.result import PerplexityResult
from outliers.eval.windows import PerplexitySettings, Span, batches, spans, window_ids
from outliers.models.dispatch import input_device
from outliers.models.load import model_name as loaded_name

__all__ = ["PerplexitySettings", "PerplexityResult", "perplexity"]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


class _Scorer:
    """One model's last ``keep`` positions per batch, and their log-probs a few positions at a time.

    With a body/head split (``outliers.arch.lmhead``) the batch keeps final hidden
    states and logits are made per chunk of positions; otherwise the model's
    own forward gives the logits (with ``logits_to_keep`` where it takes it).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.split: SplitLM | None = split_lm(model)
        self.keep_logits = self.split is None and _accepts_logits_to_keep(model)
        head = self.split.head if self.split is not None else None
        self.vocab: int | None = getattr(head, "out_features", None)  # None: read it off the logits
        self.seconds = 0.0

    def states(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        """Return ``(batch, keep, hidden or vocab)``: what the last ``keep`` positions produce."""
        start = time.perf_counter()
        if self.split is not None:
            out = self.split.hidden(x)[:, -keep:]
        else:
            kwargs = {"logits_to_keep": keep} if self.keep_logits and keep < x.shape[1] else {}
            out = self.model(input_ids=x, **kwargs).logits[:, -keep:]
        self.seconds += time.perf_counter() - start
        return out

    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.split.logits(states) if self.split is not None else states.float()
        out = torch.log_softmax(logits, dim=-1)
        self.seconds += time.perf_counter() - start
        return out


@dataclass
class _Sums:
    nll: list[float] = field(default_factory=list)
    token_nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[float] = field(default_factory=list)
    token_ref_nll: list[np.ndarray] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    token_kl: list[np.ndarray] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)


def _score_batch(
    model: _Scorer,
    ref: _Scorer | None,
    q_states: torch.Tensor,
    r_states: torch.Tensor | None,
    x: torch.Tensor,
    batch: list[Span],
    prefix: int,
    sums: _Sums,
) -> None:
    length, keep = x.shape[1], q_states.shape[1]
    offset = length - keep  # absolute position of states[:, 0] within a window
    step = positions_per_chunk(model.vocab or q_states.shape[-1])
    for row, s in enumerate(batch):
        first = s.score_from - s.begin + prefix  # window-relative index of the first target
        nll, ref_nll, kl, top1, token_nll, token_kl, token_ref_nll = 0.0, 0.0, 0.0, 0, [], [], []
        p = first - 1  # the logit at position p predicts the token at p + 1
        while p < length - 1:
            stop = min(p + step, length - 1)
            targets = x[row, p + 1 : stop + 1, None]
            lq = model.log_probs(q_states[row, p - offset : stop - offset])
            tok = -lq.gather(-1, targets).squeeze(-1)
            token_nll.append(tok)
            nll += float(tok.double().sum())
            if ref is not None and r_states is not None:
                lr = ref.log_probs(r_states[row, p - offset : stop - offset])
                started = time.perf_counter()  # the agreement arithmetic is the reference's work too
                ref_tok = -lr.gather(-1, targets).squeeze(-1)
                token_ref_nll.append(ref_tok)
                ref_nll += float(ref_tok.double().sum())
                tok_kl = (lr.exp() * (lr - lq)).sum(-1)
                token_kl.append(tok_kl)
                kl += float(tok_kl.double().sum())
                top1 += int((lr.argmax(-1) == lq.argmax(-1)).sum())
                ref.seconds += time.perf_counter() - started
            p = stop
        sums.nll.append(nll)
        sums.token_nll.append(torch.cat(token_nll).cpu().numpy().astype(np.float32))
        if ref is not None:
            sums.ref_nll.append(ref_nll)
            sums.token_ref_nll.append(torch.cat(token_ref_nll).cpu().numpy().astype(np.float32))
            sums.kl.append(kl)
            sums.token_kl.append(torch.cat(token_kl).cpu().numpy().astype(np.float32))
            sums.top1.append(top1)


# no_grad, not inference_mode: inference tensors keep no version counter, without which sibling
# int8 layers cannot share one quantized input (outliers.quant.shared_input)
@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    settings: PerplexitySettings | None = None,
    *,
    bos_token_id: int | None = None,
    reference: nn.Module | None = None,
    reference_states: MutableMapping | None = None,
    progress: bool = True,
    model_name: str | None = None,
    corpus_name: str = "",
    method: str | None = None,
    prefix_ids: torch.Tensor | None = None,
    reference_prefix_ids: torch.Tensor | None = None,
) -> PerplexityResult:
    """Return the perplexity of a causal LM over token ids, with its settings, per-window sums and interval.

    Args:
        model: a transformers causal LM (anything returning ``.logits`` of
            shape ``(batch, seq, vocab)`` from ``model(input_ids)``).
        ids: token ids, shape ``(n_tokens,)``, e.g. from ``encode_corpus``.
        settings: how windows are cut and batched (``PerplexitySettings``; the
            defaults: chunks of 512, 4 per batch, every window).
        bos_token_id: the BOS id, needed for ``bos="window"``.
        reference: the model to compare with (typically the float model that
            ``model`` was quantized from), scored on the same windows.
        reference_states: a dict in which the reference's final hidden states
            are kept per batch, so that several models can be compared with
            one reference without rerunning it; key it by model, corpus and
            settings yourself (None: nothing is kept).
        progress: show a progress bar over windows.
        prefix_ids: token ids put before every window for ``model`` only, never scored (1-D; a row that
            changes the input, ``outliers.eval.rows``); the reference reads the windows as they are...
        reference_prefix_ids: ...unless given these, put before every window it reads (the same as
            ``prefix_ids`` compares the two given the same prefix); its states are kept apart in
            ``reference_states``, keyed by the prefix too.
        model_name, corpus_name, method: labels copied into the result;
            ``method`` defaults to the weights' dtype (``"fp32"``).

    Raises:
        InvalidArgumentError: bad settings or ids that are not 1-D integers.
        CorpusError: fewer tokens than one window.
    """
    settings = settings or PerplexitySettings()
    for name, given in (("prefix_ids", prefix_ids), ("reference_prefix_ids", reference_prefix_ids)):
        if given is not None and (given.dim() != 1 or given.dtype.is_floating_point):
            raise InvalidArgumentError(f"{name} must be a 1-D integer tensor, got shape {tuple(given.shape)}")
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise InvalidArgumentError(f"ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    corpus_ids = window_ids(ids, settings, bos_token_id)
    windows = spans(len(corpus_ids), settings)
    param = next(model.parameters())
    device = input_device(model)  # not param.device: a dispatched model's first weight may be offloaded
    scorer = _Scorer(model)
    ref = _Scorer(reference) if reference is not None else None
    sums = _Sums()
    n_fed = 0
    first: tuple[float, int] | None = None  # the first batch's (seconds, tokens fed): its one-time set-up is in it
    bar = tqdm(total=len(windows), unit="win", desc="perplexity", disable=not progress, leave=False)
    for batch in batches(windows, settings.batch_size):
        x = torch.stack([corpus_ids[s.begin : s.end] for s in batch])
        if settings.prefix:
            assert bos_token_id is not None  # window_ids refused bos='window' without one
            x = torch.cat([torch.full((len(batch), 1), bos_token_id, dtype=x.dtype), x], dim=1)
        x = x.to(device)
        # Only the scored targets' predictions are needed: the last `keep` positions
        # (all of them for chunks; about `stride` for sliding).
        keep = max(s.n_scored for s in batch) + 1
        keep = min(keep, x.shape[1])
        fed = x if prefix_ids is None else torch.cat([prefix_ids.to(x).expand(len(x), -1), x], dim=1)
        q_states = scorer.states(fed, keep)  # the last `keep` positions: the window's, after any prefix
        r_states = None
        if ref is not None:
            key: tuple = tuple(batch)
            ref_fed = x
            if reference_prefix_ids is not None:  # never the states of the windows read alone
                key = (key, "prefix", tuple(reference_prefix_ids.tolist()))
                ref_fed = torch.cat([reference_prefix_ids.to(x).expand(len(x), -1), x], dim=1)
            r_states = reference_states.get(key) if reference_states is not None else None
            if r_states is None:
                r_states = ref.states(ref_fed, keep)
                if reference_states is not None:
                    reference_states[key] = r_states
        _score_batch(scorer, ref, q_states, r_states, x, batch, settings.prefix, sums)
        n_fed += fed.numel()
        if first is None:
            first = (scorer.seconds, n_fed)
        bar.update(len(batch))
    bar.close()

    tokens = [s.n_scored for s in windows]
    n_scored = sum(tokens)
    nll = sum(sums.nll) / n_scored
    seconds = scorer.seconds
    assert first is not None  # spans() returns at least one window
    steady_s, steady_fed = seconds - first[0], n_fed - first[1]
    token_nll = np.concatenate(sums.token_nll)
    fields: dict[str, Any] = {}
    if ref is not None and reference is not None:
        ref_nll = sum(sums.ref_nll) / n_scored
        token_kl, token_ref_nll = np.concatenate(sums.token_kl), np.concatenate(sums.token_ref_nll)
        fields = dict(
            ref_dtype=_short_dtype(next(reference.parameters()).dtype),
            ref_ppl=_exp(ref_nll),
            ref_seconds=ref.seconds,
            delta_ppl_pct=100.0 * math.expm1(nll - ref_nll),
            delta_ppl_pct_ci95=delta_ppl_pct_interval(sums.nll, sums.ref_nll, tokens),
            kl_vs_ref=sum(sums.kl) / n_scored,
            kl_vs_ref_ci95=rate_interval(sums.kl, tokens),
            top1_agreement=sum(sums.top1) / n_scored,
            top1_agreement_ci95=rate_interval(sums.top1, tokens),
            window_ref_nll=sums.ref_nll,
            window_kl=sums.kl,
            window_top1=sums.top1,
            token_kl=token_kl,
            token_ref_nll=token_ref_nll,
            **agreement_fields(token_kl, token_nll, token_ref_nll, tokens),
        )
    return PerplexityResult(
        ppl=_exp(nll),
        nll=nll,
        n_tokens=n_scored,
        n_windows=len(windows),
        seconds=seconds,
        tokens_per_s=n_fed / seconds if seconds > 0 else math.inf,
        warmup_seconds=first[0],
        steady_tokens_per_s=(steady_fed / steady_s if steady_s > 0 else math.inf) if steady_fed else None,
        protocol=settings.protocol,
        window=settings.window,
        stride=settings.stride,
        max_windows=settings.max_windows,
        batch_size=settings.batch_size,
        bos=settings.bos,
        model=model_name if model_name is not None else loaded_name(model),
        corpus=corpus_name,
        corpus_tokens=len(ids),
        dtype=_short_dtype(param.dtype),
        method=method or _short_dtype(param.dtype),
        device=str(device),
        torch_threads=torch.get_num_threads(),
        ppl_ci95=ppl_interval(sums.nll, tokens),
        window_nll=sums.nll,
        window_tokens=tokens,
        token_nll=token_nll,
        **fields,
    )


def _exp(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf
