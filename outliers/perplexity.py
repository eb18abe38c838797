"""Perplexity, measured one documented way and recorded with its settings.

Two protocols (``../shared/PAPER_NOTES.md`` §6):

``chunks``  non-overlapping windows of ``window`` tokens, the partial tail
            dropped (GPTQ / SmoothQuant). Every window scores its last
            ``window - 1`` tokens; the first has no context.
``sliding`` windows of ``window`` tokens whose starts move by ``stride``;
            each window scores only the tokens no earlier window scored
            (the Hugging Face perplexity guide), so with ``stride < window``
            every token after the first is scored exactly once, with at least
            ``window - stride`` tokens of context. (``stride == window`` leaves
            each window's first token unscored, as ``chunks`` does.)

``ppl = exp(sum of token NLLs / tokens scored)``, NLLs in float32 whatever the
model's dtype. Windows of equal length are batched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import CorpusError, InvalidArgumentError

__all__ = ["PerplexitySettings", "PerplexityResult", "Span", "spans", "perplexity"]

PROTOCOLS = ("chunks", "sliding")


@dataclass(frozen=True)
class PerplexitySettings:
    """How windows are cut and batched. ``stride`` is None for ``chunks``."""

    protocol: str = "chunks"
    window: int = 512
    stride: int | None = None  # sliding: default window // 2
    max_windows: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidArgumentError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not isinstance(self.window, int) or self.window < 2:
            raise InvalidArgumentError(f"window must be an integer >= 2, got {self.window!r}")
        if self.protocol == "chunks" and self.stride not in (None, self.window):
            raise InvalidArgumentError(
                f"stride applies to the sliding protocol; chunks never overlap (got stride={self.stride})")
        if self.protocol == "sliding":
            if self.stride is None:
                object.__setattr__(self, "stride", max(1, self.window // 2))
            if not isinstance(self.stride, int) or self.stride < 1:
                raise InvalidArgumentError(f"stride must be an integer >= 1, got {self.stride!r}")
            if self.stride > self.window:
                raise InvalidArgumentError(
                    f"stride must be <= window, got stride={self.stride} > window={self.window} "
                    "(tokens between windows would never be scored)")
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise InvalidArgumentError(f"max_windows must be an integer >= 1 or None, got {self.max_windows!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class Span:
    """One window: tokens ``[begin, end)`` go in, targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def spans(n_tokens: int, settings: PerplexitySettings) -> list[Span]:
    """Return the windows ``settings`` cuts from a sequence of ``n_tokens`` tokens.

    Raises:
        CorpusError: the sequence is shorter than one window.
    """
    w = settings.window
    if n_tokens < w:
        raise CorpusError(f"corpus has {n_tokens} tokens, fewer than one window of {w}; "
                          "use a smaller --window or a longer corpus")
    out: list[Span] = []
    if settings.protocol == "chunks":
        out = [Span(b, b + w, b + 1) for b in range(0, n_tokens - w + 1, w)]
    else:
        prev_end = 0
        for begin in range(0, n_tokens, settings.stride):
            end = min(begin + w, n_tokens)
            span = Span(begin, end, max(prev_end, begin + 1))
            if span.n_scored > 0:  # a 1-token tail window has nothing to score
                out.append(span)
            prev_end = end
            if end == n_tokens:
                break
    return out[: settings.max_windows] if settings.max_windows else out


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and everything needed to reproduce or compare it."""

    ppl: float
    nll: float  # mean token NLL in nats
    n_tokens: int  # tokens scored
    n_windows: int
    seconds: float  # model forward + loss, not loading or tokenizing
    tokens_per_s: float  # tokens fed to the model per second
    protocol: str
    window: int
    stride: int | None
    max_windows: int | None
    batch_size: int
    model: str
    corpus: str
    corpus_tokens: int
    dtype: str
    method: str
    device: str
    torch_threads: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(windows: list[Span], batch_size: int) -> Iterator[list[Span]]:
    """Yield runs of consecutive windows of equal length (only the tail can differ)."""
    batch: list[Span] = []
    for s in windows:
        if batch and (len(batch) == batch_size or s.end - s.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    protocol: str = "chunks",
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    model_name: str | None = None,
    corpus_name: str = "",
    method: str | None = None,
) -> PerplexityResult:
    """Return the perplexity of a causal LM over token ids, with its settings.

    Args:
        model: a transformers causal LM (anything returning ``.logits`` of
            shape ``(batch, seq, vocab)`` from ``model(input_ids)``).
        ids: token ids, shape ``(n_tokens,)``, e.g. from ``encode_corpus``.
        protocol, window, stride, max_windows, batch_size: see
            ``PerplexitySettings`` and the module docstring.
        progress: show a progress bar over windows.
        model_name, corpus_name, method: labels copied into the result;
            ``method`` defaults to the weights' dtype (``"fp32"``).

    Raises:
        InvalidArgumentError: bad settings or ids that are not 1-D integers.
        CorpusError: fewer tokens than one window.
    """
    settings = PerplexitySettings(protocol, window, stride, max_windows, batch_size)
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise InvalidArgumentError(f"ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    windows = spans(len(ids), settings)
    param = next(model.parameters())
    keep_logits = _accepts_logits_to_keep(model)

    nll_sum, n_scored, n_fed = 0.0, 0, 0
    bar = tqdm(total=len(windows), unit="win", desc="perplexity", disable=not progress, leave=False)
    start = time.perf_counter()
    for batch in _batches(windows, settings.batch_size):
        x = torch.stack([ids[s.begin : s.end] for s in batch]).to(param.device)
        length = x.shape[1]
        # Logit at position p predicts token p + 1: the scored targets need the
        # last `keep` positions only (all of them for chunks; about `stride` for sliding).
        keep = max(s.n_scored for s in batch) + 1
        kwargs = {"logits_to_keep": keep} if keep_logits and keep < length else {}
        logits = model(input_ids=x, **kwargs).logits
        logits = logits[:, -keep:] if logits.shape[1] > keep else logits
        offset = length - logits.shape[1]  # absolute position of logits[:, 0] within a window
        for row, s in enumerate(batch):
            first = s.score_from - s.begin  # window-relative index of the first target
            pred = logits[row, first - 1 - offset : length - 1 - offset].float()
            nll_sum += F.cross_entropy(pred, x[row, first:], reduction="sum").item()
            n_scored += s.n_scored
        n_fed += x.numel()
        bar.update(len(batch))
    seconds = time.perf_counter() - start
    bar.close()

    nll = nll_sum / n_scored
    return PerplexityResult(
        ppl=math.exp(nll) if nll < 700 else math.inf,
        nll=nll,
        n_tokens=n_scored,
        n_windows=len(windows),
        seconds=seconds,
        tokens_per_s=n_fed / seconds if seconds > 0 else math.inf,
        protocol=settings.protocol,
        window=settings.window,
        stride=settings.stride,
        max_windows=settings.max_windows,
        batch_size=settings.batch_size,
        model=model_name if model_name is not None else str(getattr(model, "name_or_path", "")),
        corpus=corpus_name,
        corpus_tokens=len(ids),
        dtype=_short_dtype(param.dtype),
        method=method or _short_dtype(param.dtype),
        device=str(param.device),
        torch_threads=torch.get_num_threads(),
    )
