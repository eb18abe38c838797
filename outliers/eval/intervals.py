"""Bootstrap confidence intervals over evaluation windows.

A perplexity is a ratio of sums over windows, ``exp(Σ nll / Σ tokens)``, so
windows are the unit of resampling: each resample draws windows with
replacement and recomputes the ratio, which weighs windows of unequal length
correctly. A comparison between two models on the same windows is *paired*:
the resample keeps ``(nll_quant, nll_ref, tokens)`` of one window together,
so the window-to-window spread that both models share cancels out.

Adjacent windows of a topic-sorted corpus are correlated (one long document
spans several), so an interval speaks for that slice of text, not for the
language at large. Below ``MIN_WINDOWS`` windows an interval is rough, and
callers say so.

Percentile intervals from ``scipy.stats.bootstrap``, seeded: the same windows
give the same interval. Percentiles of per-token values over the resampled
windows' tokens (``pooled_percentile_intervals``) are resampled the same way,
seeded the same, by one vectorized pass instead (scipy would sort every resample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "Interval",
    "bootstrap_interval",
    "ppl_interval",
    "delta_ppl_pct_interval",
    "rate_interval",
    "rms_interval",
    "pooled_percentile_intervals",
    "MIN_WINDOWS",
    "N_RESAMPLES",
    "few_windows_note",
]

Interval = tuple[float, float]

MIN_WINDOWS = 20  # below this the interval is printed with a warning
N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


def bootstrap_interval(
    statistic: Callable[..., np.ndarray],
    data: Sequence[Sequence[float]],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Return the ``confidence`` percentile interval of ``statistic`` over windows resampled together.

    Args:
        statistic: takes one array per entry of ``data`` (windows along the
            last axis) and reduces that axis.
        data: per-window arrays of equal length, resampled as rows (paired).

    Returns ``(nan, nan)`` for fewer than two windows or a constant statistic.
    """
    arrays = tuple(np.asarray(d, dtype=np.float64) for d in data)
    if len(arrays[0]) < 2:
        return (math.nan, math.nan)
    res = stats.bootstrap(
        arrays,
        statistic,
        paired=True,
        vectorized=True,
        axis=-1,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (low, high)


def _ppl(nll, tokens, axis=-1):
    return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))


def _delta_pct(nll_q, nll_ref, tokens, axis=-1):
    return 100.0 * np.expm1((np.sum(nll_q, axis=axis) - np.sum(nll_ref, axis=axis)) / np.sum(tokens, axis=axis))


def _rate(num, tokens, axis=-1):
    return np.sum(num, axis=axis) / np.sum(tokens, axis=axis)


def ppl_interval(window_nll: Sequence[float], window_tokens: Sequence[int], **kw) -> Interval:
    """Interval of ``exp(Σ nll / Σ tokens)`` from per-window NLL sums and scored-token counts."""
    return bootstrap_interval(_ppl, (window_nll, window_tokens), **kw)


def delta_ppl_pct_interval(
    nll_q: Sequence[float], nll_ref: Sequence[float], window_tokens: Sequence[int], **kw
) -> Interval:
    """Paired interval of ``100 · (ppl_q / ppl_ref − 1)`` over the same windows."""
    return bootstrap_interval(_delta_pct, (nll_q, nll_ref, window_tokens), **kw)


def rate_interval(window_sum: Sequence[float], window_tokens: Sequence[int], **kw) -> Interval:
    """Interval of a per-token mean ``Σ x / Σ tokens`` (mean KL, top-1 agreement)."""
    return bootstrap_interval(_rate, (window_sum, window_tokens), **kw)


def _rms(sq, tokens, axis=-1):
    return np.sqrt(np.sum(sq, axis=axis) / np.sum(tokens, axis=axis))


def rms_interval(window_sq: Sequence[float], window_tokens: Sequence[int], **kw) -> Interval:
    """Interval of a per-token root mean square ``sqrt(Σ x² / Σ tokens)`` from per-window sums of squares."""
    return bootstrap_interval(_rms, (window_sq, window_tokens), **kw)


_BLOCK = 64  # sorted tokens per block: a resample's running counts are made at block edges, then within one


def pooled_percentile_intervals(
    values: np.ndarray,
    window_tokens: Sequence[int],
    percentiles: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> list[Interval] | None:
    """Percentile intervals of per-token ``percentiles`` (in %), windows resampled with replacement.

    ``values`` holds every scored token in window order, ``window_tokens`` how many each window has.
    A resample draws windows with replacement and takes each percentile over the concatenation of
    their tokens, interpolated linearly between ranks as ``numpy.percentile`` (and llama.cpp) do; the
    interval is the ``confidence`` percentile interval of those, as ``bootstrap_interval``'s.

    Vectorized, since sorting every resample would take seconds: the tokens are sorted once, and a
    resample is how many times it drew each window (its counts). The k-th smallest of its tokens is
    the first sorted token at which the running sum of counts (each token counting its window's)
    passes k. Those running sums are made for every resample at the edges of blocks of sorted tokens
    by one matrix product, and token by token only inside the block that holds the rank. 2000
    resamples of 20k tokens take a few hundredths of a second.

    Returns None for fewer than two windows (no spread between windows to resample).
    """
    tokens = np.asarray(window_tokens, dtype=np.int64)
    x = np.asarray(values, dtype=np.float64)
    if len(tokens) < 2:
        return None
    if tokens.sum() != len(x) or (tokens < 1).any():
        raise ValueError(f"{len(x)} values but window_tokens sums to {tokens.sum()}, or a window has none")
    n_win, n = len(tokens), len(x)
    n_blocks = -(-n // _BLOCK)
    order = np.argsort(x, kind="stable")
    sorted_x = np.append(x[order], np.zeros(n_blocks * _BLOCK - n))
    # each sorted token's window; the padding belongs to a window no resample draws
    window_of = np.full(n_blocks * _BLOCK, n_win)
    window_of[:n] = np.repeat(np.arange(n_win), tokens)[order]
    per_block = np.bincount(
        np.repeat(np.arange(n_blocks), _BLOCK) * (n_win + 1) + window_of, minlength=n_blocks * (n_win + 1)
    ).reshape(n_blocks, n_win + 1)
    before = np.vstack([np.zeros(n_win + 1), np.cumsum(per_block, axis=0)])  # tokens per window before each edge

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_win, size=(n_resamples, n_win))
    counts = np.bincount(
        (draws + (n_win + 1) * np.arange(n_resamples)[:, None]).ravel(), minlength=n_resamples * (n_win + 1)
    ).reshape(n_resamples, n_win + 1)  # the last column, the padding's window, is never drawn
    edges = counts @ before.T  # (resamples, blocks + 1): ranks covered before each block; exact in float64
    total = edges[:, -1]
    q = np.asarray(percentiles, dtype=np.float64) / 100.0
    position = q[None, :] * (total[:, None] - 1)  # numpy's "linear": between ranks floor and floor + 1
    low = np.floor(position)
    frac = position - low
    rows = np.arange(n_resamples)[:, None]

    def kth(rank: np.ndarray) -> np.ndarray:
        """The rank-th smallest (0-based) of each resample's tokens, rank of shape (resamples, percentiles)."""
        # the block holding it: the last edge with at most `rank` ranks before it
        block = np.stack([np.searchsorted(e, r, side="right") - 1 for e, r in zip(edges, rank, strict=True)])
        block = np.minimum(block, n_blocks - 1)
        inside = block[..., None] * _BLOCK + np.arange(_BLOCK)  # (resamples, percentiles, block)
        running = edges[rows, block][..., None] + np.cumsum(counts[rows[..., None], window_of[inside]], axis=-1)
        first = np.argmax(running > rank[..., None], axis=-1)
        return sorted_x[block * _BLOCK + first]

    high = np.minimum(low + 1, total[:, None] - 1)
    estimates = (1 - frac) * kth(low) + frac * kth(high)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(estimates, [tail, 100 - tail], axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]


def few_windows_note(n_windows: int) -> str:
    """A warning to print beside intervals over fewer than ``MIN_WINDOWS`` windows, else ''."""
    if n_windows >= MIN_WINDOWS:
        return ""
    return (
        f"only {n_windows} windows: intervals over fewer than {MIN_WINDOWS} windows are rough; "
        "use --max-windows to score more"
    )
