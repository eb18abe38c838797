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
give the same interval.
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


def few_windows_note(n_windows: int) -> str:
    """A warning to print beside intervals over fewer than ``MIN_WINDOWS`` windows, else ''."""
    if n_windows >= MIN_WINDOWS:
        return ""
    return (
        f"only {n_windows} windows: intervals over fewer than {MIN_WINDOWS} windows are rough; "
        "use --max-windows to score more"
    )
