"""Agreement with a reference as llama.cpp's ``perplexity --kl-divergence`` reports it.

Per scored token, with ``p`` the reference's next-token distribution (the float model) and ``q``
the scored model's (the quantized one):

- ``KLD = Σ_v p(v) · (log p(v) − log q(v))`` over the whole vocabulary, in nats;
- ``Δp = q(next) − p(next)``, the change in the probability of the token that comes next;
- top-1: whether both distributions' most likely token is the same (``top1_agreement``;
  llama.cpp's "same top p").

Summarized over every scored token as llama.cpp does: the mean KLD (``kl_vs_ref``), its median,
90th, 95th, 99th and 99.9th percentiles and maximum; the mean of Δp, its RMS ``sqrt(mean Δp²)``,
its 1st to 99th percentiles, minimum and maximum. Percentiles interpolate linearly between ranks
(``numpy.percentile``'s default, llama.cpp's too). Each statistic but the extremes comes with a
95 % bootstrap interval over windows (``outliers.eval.intervals``): the maximum of a resample can
only fall, so its interval would say nothing.

Two differences from llama.cpp, both making ours exact: it drops reference log-probabilities at
or below −16 from the KLD sum (they are stored as 16-bit values over that range), and it scores
only the second half of each chunk; here every token of the vocabulary counts and every token the
protocol scores is scored (``docs/protocols.md``). Probabilities are fractions, not percents.

Torch-free: the per-token arrays come from ``outliers.eval.perplexity``; ``token_agreement`` is
the same per-token arithmetic on logits in float64, for tests and for checking by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from outliers.eval.intervals import Interval, pooled_percentile_intervals, rate_interval, rms_interval

__all__ = [
    "KLD_PERCENTILES",
    "DELTA_P_PERCENTILES",
    "TokenAgreement",
    "token_agreement",
    "delta_p",
    "KldSummary",
    "DeltaPSummary",
    "kld_summary",
    "delta_p_summary",
    "agreement_fields",
]

KLD_PERCENTILES = ("50", "90", "95", "99", "99.9")  # llama.cpp's upper ones and the median; "max" beside them
DELTA_P_PERCENTILES = ("1", "5", "10", "50", "90", "95", "99")  # "min" and "max" beside them


@dataclass(frozen=True)
class TokenAgreement:
    """Per-token agreement of two models at the same positions (float64 arrays of one value per position)."""

    kl: np.ndarray  # KL(P_ref || P_model), nats
    delta_p: np.ndarray  # q(next) - p(next)
    same_top: np.ndarray  # bool: the same argmax token


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_agreement(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> TokenAgreement:
    """KLD, Δp and top-1 per position from logits ``(positions, vocab)`` and the next tokens ``(positions,)``."""
    lp = _log_softmax(np.asarray(ref_logits, dtype=np.float64))
    lq = _log_softmax(np.asarray(logits, dtype=np.float64))
    at = np.arange(len(lp)), np.asarray(targets)
    return TokenAgreement(
        kl=(np.exp(lp) * (lp - lq)).sum(-1),
        delta_p=np.exp(lq[at]) - np.exp(lp[at]),
        same_top=lp.argmax(-1) == lq.argmax(-1),
    )


def delta_p(token_nll: np.ndarray, token_ref_nll: np.ndarray) -> np.ndarray:
    """``q(next) − p(next)`` per token from the two models' NLLs of it, in float64."""
    return np.exp(-np.asarray(token_nll, dtype=np.float64)) - np.exp(-np.asarray(token_ref_nll, dtype=np.float64))


@dataclass(frozen=True)
class KldSummary:
    """Per-token KLD's percentiles (keys ``KLD_PERCENTILES`` and ``"max"``) and their intervals (no ``"max"``;
    None over fewer than two windows)."""

    percentiles: dict[str, float]
    percentiles_ci95: dict[str, Interval] | None


@dataclass(frozen=True)
class DeltaPSummary:
    """Per-token Δp's mean, RMS and percentiles (keys ``DELTA_P_PERCENTILES``, ``"min"``, ``"max"``), with
    intervals (None over fewer than two windows; the extremes have none)."""

    mean: float
    mean_ci95: Interval | None
    rms: float
    rms_ci95: Interval | None
    percentiles: dict[str, float]
    percentiles_ci95: dict[str, Interval] | None


def _percentiles(values: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    return {k: float(v) for k, v in zip(keys, np.percentile(values, [float(k) for k in keys]), strict=True)}


def _intervals(values: np.ndarray, window_tokens: Sequence[int], keys: Sequence[str]) -> dict[str, Interval] | None:
    got = pooled_percentile_intervals(values, window_tokens, [float(k) for k in keys])
    return None if got is None else dict(zip(keys, got, strict=True))


def _window_sums(values: np.ndarray, window_tokens: Sequence[int]) -> list[float]:
    return np.add.reduceat(values, np.concatenate([[0], np.cumsum(window_tokens)[:-1]])).tolist()


def _finite(ci: Interval) -> Interval | None:
    """A scalar interval, or None where the bootstrap gave none (one window): JSON has no NaN."""
    return None if any(v != v for v in ci) else ci


def kld_summary(token_kl: np.ndarray, window_tokens: Sequence[int]) -> KldSummary:
    """The median, upper percentiles and maximum of per-token KLD, with intervals over windows."""
    kl = np.asarray(token_kl, dtype=np.float64)
    return KldSummary(
        _percentiles(kl, KLD_PERCENTILES) | {"max": float(kl.max())},
        _intervals(kl, window_tokens, KLD_PERCENTILES),
    )


def delta_p_summary(token_dp: np.ndarray, window_tokens: Sequence[int]) -> DeltaPSummary:
    """The mean, RMS, percentiles and extremes of per-token Δp, with intervals over windows."""
    dp = np.asarray(token_dp, dtype=np.float64)
    return DeltaPSummary(
        mean=float(dp.mean()),
        mean_ci95=_finite(rate_interval(_window_sums(dp, window_tokens), window_tokens)),
        rms=float(np.sqrt(np.mean(dp * dp))),
        rms_ci95=_finite(rms_interval(_window_sums(dp * dp, window_tokens), window_tokens)),
        percentiles=_percentiles(dp, DELTA_P_PERCENTILES) | {"min": float(dp.min()), "max": float(dp.max())},
        percentiles_ci95=_intervals(dp, window_tokens, DELTA_P_PERCENTILES),
    )


def agreement_fields(
    token_kl: np.ndarray, token_nll: np.ndarray, token_ref_nll: np.ndarray, window_tokens: Sequence[int]
) -> dict[str, Any]:
    """``PerplexityResult``'s KLD and Δp fields from per-token arrays in window order."""
    kld = kld_summary(token_kl, window_tokens)
    dp = delta_p_summary(delta_p(token_nll, token_ref_nll), window_tokens)
    return dict(
        kld_percentiles=kld.percentiles,
        kld_percentiles_ci95=kld.percentiles_ci95,
        delta_p_mean=dp.mean,
        delta_p_mean_ci95=dp.mean_ci95,
        delta_p_rms=dp.rms,
        delta_p_rms_ci95=dp.rms_ci95,
        delta_p_percentiles=dp.percentiles,
        delta_p_percentiles_ci95=dp.percentiles_ci95,
    )
