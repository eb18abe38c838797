"""How a perplexity's windows are cut from a corpus: protocols, BOS handling, batching.

Two protocols (perplexity protocols of Hugging Face's guide and of GPTQ; see
``docs/protocols.md``):

``chunks``  non-overlapping windows of ``window`` tokens, the partial tail
            dropped (GPTQ / SmoothQuant). Every window scores its last
            ``window - 1`` tokens; the first has no context.
``sliding`` windows of ``window`` tokens whose starts move by ``stride``;
            each window scores only the tokens no earlier window scored
            (the Hugging Face perplexity guide), so with ``stride < window``
            every token after the first is scored exactly once, with at least
            ``window - stride`` tokens of context. (``stride == window`` leaves
            each window's first token unscored, as ``chunks`` does.)

``bos="window"`` starts every window with the tokenizer's BOS followed by
``window - 1`` corpus tokens, and scores every corpus token of the window (the
first is predicted from BOS); ``bos="corpus"`` (default) slices windows out of
the corpus as tokenized, which has at most one BOS, at its very start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from outliers.errors import CorpusError, InvalidArgumentError

if TYPE_CHECKING:  # annotations only: a study plan cuts windows without loading torch
    import torch

__all__ = ["PROTOCOLS", "BOS_MODES", "PerplexitySettings", "Span", "spans", "batches", "window_ids"]

PROTOCOLS = ("chunks", "sliding")
BOS_MODES = ("corpus", "window")


@dataclass(frozen=True)
class PerplexitySettings:
    """How windows are cut and batched. ``stride`` is None for ``chunks``."""

    protocol: str = "chunks"
    window: int = 512
    stride: int | None = None  # sliding: default window // 2
    max_windows: int | None = None
    batch_size: int = 4
    bos: str = "corpus"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidArgumentError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not isinstance(self.window, int) or self.window < 2:
            raise InvalidArgumentError(f"window must be an integer >= 2, got {self.window!r}")
        if self.protocol == "chunks" and self.stride not in (None, self.window):
            raise InvalidArgumentError(
                f"stride applies to the sliding protocol; chunks never overlap (got stride={self.stride})"
            )
        if self.protocol == "sliding":
            if self.stride is None:
                object.__setattr__(self, "stride", max(1, self.window // 2))
            if not isinstance(self.stride, int) or self.stride < 1:
                raise InvalidArgumentError(f"stride must be an integer >= 1, got {self.stride!r}")
            if self.stride > self.window:
                raise InvalidArgumentError(
                    f"stride must be <= window, got stride={self.stride} > window={self.window} "
                    "(tokens between windows would never be scored)"
                )
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise InvalidArgumentError(f"max_windows must be an integer >= 1 or None, got {self.max_windows!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.bos not in BOS_MODES:
            raise InvalidArgumentError(f"bos must be one of {BOS_MODES}, got {self.bos!r}")

    @property
    def prefix(self) -> int:
        """Tokens put before a window's corpus tokens: 1 (the BOS) with ``bos="window"``."""
        return 1 if self.bos == "window" else 0


@dataclass(frozen=True)
class Span:
    """One window of corpus tokens ``[begin, end)``; targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def spans(n_tokens: int, settings: PerplexitySettings) -> list[Span]:
    """Return the windows ``settings`` cuts from a sequence of ``n_tokens`` corpus tokens.

    With ``bos="window"`` a window holds ``window - 1`` corpus tokens (the BOS
    fills the last place) and its first corpus token is scored too.

    Raises:
        CorpusError: the sequence is shorter than one window.
    """
    w = settings.window - settings.prefix  # corpus tokens per window
    skip = 1 - settings.prefix  # unscored tokens at a window's start (nothing predicts them)
    if n_tokens < w:
        raise CorpusError(
            f"corpus has {n_tokens} tokens, fewer than one window of {settings.window}; "
            "use a smaller --window or a longer corpus"
        )
    out: list[Span] = []
    if settings.protocol == "chunks":
        out = [Span(b, b + w, b + skip) for b in range(0, n_tokens - w + 1, w)]
    else:
        prev_end, stride = 0, settings.stride
        assert stride is not None  # set by PerplexitySettings for sliding
        for begin in range(0, n_tokens, stride):
            end = min(begin + w, n_tokens)
            span = Span(begin, end, max(prev_end, begin + skip))
            if span.n_scored > 0:  # a 1-token tail window has nothing to score
                out.append(span)
            prev_end = end
            if end == n_tokens:
                break
    return out[: settings.max_windows] if settings.max_windows else out


def batches(windows: list[Span], batch_size: int) -> Iterator[list[Span]]:
    """Yield runs of consecutive windows of equal length (only the tail can differ)."""
    batch: list[Span] = []
    for s in windows:
        if batch and (len(batch) == batch_size or s.end - s.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def window_ids(ids: torch.Tensor, settings: PerplexitySettings, bos_token_id: int | None) -> torch.Tensor:
    """The corpus tokens windows are cut from: without a leading BOS when each window brings its own."""
    if settings.bos == "corpus":
        return ids
    if bos_token_id is None:
        raise InvalidArgumentError(
            "bos='window' needs the tokenizer's BOS token id (bos_token_id); this tokenizer has none: use bos='corpus'"
        )
    return ids[1:] if len(ids) and int(ids[0]) == bos_token_id else ids


def evaluated_tokens(ids: torch.Tensor, settings: PerplexitySettings, bos_token_id: int | None = None) -> int:
    """How many tokens from the start of ``ids`` evaluation reads: calibration on the same text starts after them.

    The one rule for keeping calibration off the evaluated tokens: the windows are cut by the functions
    ``perplexity`` cuts them with, and a leading BOS that ``bos="window"`` drops still counts.
    """
    corpus = window_ids(ids, settings, bos_token_id)
    return len(ids) - len(corpus) + max(s.end for s in spans(len(corpus), settings))
