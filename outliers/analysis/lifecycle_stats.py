"""The lifecycle trace's numbers from its per-window arrays: every per-edit field (``edit_stats``) under window
resamples, with percentile intervals, and the share of a row's KL on the massive tokens (``kl_share``).

One set of resamples (``resamples``: 2000 draws of the windows with replacement, seeded as
``outliers.eval.intervals``) serves every edit and field, so the change of a field against ``none`` is paired.
A resample is a row of counts: a weighted mean over windows is one matrix product (``window_mean``); maxima
are taken over the drawn windows (``window_max``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from outliers.analysis.lifecycle_record import Pass
from outliers.eval.intervals import CONFIDENCE, N_RESAMPLES, SEED, rate_interval

__all__ = ["FIELDS", "row_field", "resamples", "window_mean", "window_max", "edit_stats", "interval", "kl_share"]

# the per-edit fields with a change against `none`; kl_vs_ref_<row> are added per quantized row
FIELDS = (
    "massive_activation",
    "massive_at_birth",
    "massive_dim_max",
    "max_activation",
    "sink_rate",
    "first_token_attention",
    "massive_token_attention",
    "key_concentration",
    "ppl",
)


def row_field(method: str) -> str:
    """The JSON field of a quantized row's KL: ``kl_vs_ref_llm_int8`` for ``llm.int8``."""
    return "kl_vs_ref_" + "".join(c if c.isalnum() else "_" for c in method)


def resamples(n: int) -> np.ndarray:
    """``(N_RESAMPLES, n)``: how many times each resample draws each window, seeded as ``outliers.eval.intervals``."""
    draws = np.random.default_rng(SEED).integers(0, n, size=(N_RESAMPLES, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)


def window_mean(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Weighted mean over windows: ``(R, ...)`` from ``weights (R, n)`` and ``x (n, ...)``."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    return (weights @ flat / weights.sum(1, keepdims=True)).reshape(len(weights), *x.shape[1:])


def window_max(weights: np.ndarray, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Max over the drawn windows (x >= 0): ``(R, ...)``."""
    out = []
    for start in range(0, len(weights), chunk):
        drawn = (weights[start : start + chunk] > 0).reshape(-1, len(x), *([1] * (x.ndim - 1)))
        out.append((drawn * x[None]).max(1))
    return np.concatenate(out)


def edit_stats(
    p: Pass, weights: np.ndarray, counted: np.ndarray, epsilon: float, span: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Every per-edit field as ``(R,)`` under resample ``weights`` (a row of ones: the point estimate); ``span``:
    the first and last block where the unedited model carries the massive activation."""
    birth, last = span
    out: dict[str, np.ndarray] = {}
    rec = p.rec
    if rec is not None:
        if rec.dims:
            # per block the largest |h| on its tokens, mean over the blocks that carry it: one late block that
            # writes the dim (SmolLM2's and Qwen's cancel it) does not stand for the whole span
            out["massive_activation"] = window_mean(weights, rec.resid_on_tokens[:, birth : last + 1].max(2).mean(1))
            out["massive_at_birth"] = window_mean(weights, rec.resid_on_tokens[:, birth].max(-1))
            out["massive_dim_max"] = window_mean(weights, rec.resid_peak[:, birth : last + 1].max((1, 2)))
        out["max_activation"] = window_mean(weights, rec.resid_max[:, birth : last + 1].max(1))
        if rec.attn_first:
            first = np.stack([rec.attn_first[i] for i in sorted(rec.attn_first)], 1)  # (n, layers, heads)
            massive = np.stack([rec.attn_massive[i] for i in sorted(rec.attn_massive)], 1)
            scores = window_mean(weights, first).reshape(len(weights), -1)[:, counted]  # (R, counted heads)
            out["sink_rate"] = (scores > epsilon).mean(-1)
            out["first_token_attention"] = scores.mean(-1)
            out["massive_token_attention"] = (
                window_mean(weights, massive).reshape(len(weights), -1)[:, counted].mean(-1)
            )
        if rec.keys["all"]:
            keys = np.stack([rec.keys["all"][i] for i in sorted(rec.keys["all"])], 1)  # (n, layers, channels)
            top = window_max(weights, keys)  # (R, layers, channels)
            med = np.median(top, -1)
            conc = np.where(med > 0, top.max(-1) / np.where(med > 0, med, 1), np.nan)
            out["key_concentration"] = np.nanmedian(conc, -1)
    if p.nll is not None and p.tokens is not None:
        nll = weights @ p.nll / (weights @ p.tokens)
        out["ppl"] = np.exp(np.minimum(nll, 700))
        for row, kl in p.kl.items():
            out[row_field(row)] = weights @ kl / (weights @ p.tokens)
    return out


def interval(x: np.ndarray) -> list[float] | None:
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return [float(lo), float(hi)]


def kl_share(token_kl: np.ndarray, positions: torch.Tensor, weights: np.ndarray) -> dict[str, Any]:
    """The share of a row's KL that falls on the massive tokens, against their share of the scored tokens."""
    mask = positions[:, : token_kl.shape[1]].numpy()
    kl_m, kl_all = (token_kl * mask).sum(1), token_kl.sum(1)
    n_m, n_all = mask.sum(1).astype(np.float64), np.full(len(mask), float(mask.shape[1]))
    if n_m.sum() == 0:
        return {"kl_share": None, "token_share": 0.0, "per_token_ratio": None}
    one = np.ones((1, len(mask)))

    def ratio(w: np.ndarray) -> np.ndarray:
        inside = (w @ kl_m) / np.maximum(w @ n_m, 1e-12)
        outside = (w @ (kl_all - kl_m)) / np.maximum(w @ (n_all - n_m), 1e-12)
        return np.where((w @ n_m) > 0, inside / np.maximum(outside, 1e-30), np.nan)

    return {
        "kl_share": float(kl_m.sum() / kl_all.sum()) if kl_all.sum() > 0 else None,
        "kl_share_ci95": list(rate_interval(kl_m, kl_all)) if len(mask) > 1 else None,
        "token_share": float(n_m.sum() / n_all.sum()),
        "kl_per_token_massive": float(kl_m.sum() / n_m.sum()),
        "kl_per_token_other": float((kl_all - kl_m).sum() / (n_all - n_m).sum()),
        "per_token_ratio": float(ratio(one)[0]),
        "per_token_ratio_ci95": interval(ratio(weights)) if len(mask) > 1 else None,
    }
