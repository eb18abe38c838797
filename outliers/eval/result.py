"""``PerplexityResult``: a perplexity with everything needed to reproduce, bound or compare it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from outliers.display import fmt_interval, named, provenance, render_html

__all__ = ["PerplexityResult"]


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and everything needed to reproduce, bound or compare it.

    ``window_nll`` and ``window_tokens`` are each window's NLL sum and scored
    tokens (their ratio of sums is ``nll``); ``token_nll`` holds every scored
    token's NLL in window order and, against a reference, ``token_kl`` each
    one's KL and ``token_ref_nll`` the reference's NLL of it (float32, all left
    out of ``to_dict``). The ``*_ci95`` fields are 95 % bootstrap intervals over
    windows. The fields from ``ref_dtype`` to ``window_top1`` and the KLD and Δp
    fields are set when a reference model was given.

    KLD and Δp as llama.cpp's ``perplexity --kl-divergence`` reports them
    (``outliers.eval.agreement``, exact over the whole vocabulary and every
    scored token): ``kld_percentiles`` holds per-token KLD's percentiles (keys
    "50", "90", "95", "99", "99.9") and "max"; ``delta_p_*`` describe
    ``Δp = q(next) − p(next)``, the scored model's probability of the next token
    less the reference's, as fractions: mean, RMS, percentiles (keys "1" to
    "99", "min", "max"). Dict-valued intervals have the keys of their
    percentiles but the extremes; every interval is None over one window.

    Speed: ``seconds`` and ``tokens_per_s`` cover every batch, the first one
    included, as they always have (a study's stored cells hold them). The first
    batch also pays one-time set-up (kernels loading from their cache, the int8
    GEMM's first-call set-up, first allocations), so ``warmup_seconds`` is its
    share of ``seconds`` and ``steady_tokens_per_s`` the rate over the batches
    after it: the number to compare across methods (None with a single
    batch). Both are None in results made before they existed.
    """

    ppl: float
    nll: float  # mean token NLL in nats
    n_tokens: int  # tokens scored
    n_windows: int
    seconds: float  # this model's forwards and loss, not loading, tokenizing or the reference
    tokens_per_s: float  # tokens fed to the model per second
    protocol: str
    window: int
    stride: int | None
    max_windows: int | None
    batch_size: int
    bos: str
    model: str
    corpus: str
    corpus_tokens: int
    dtype: str
    method: str
    device: str
    torch_threads: int
    ppl_ci95: tuple[float, float]
    window_nll: list[float]
    window_tokens: list[int]
    ref_dtype: str | None = None
    ref_ppl: float | None = None
    # the reference's share of this call: its forward (unless its states were reused), head, and the KL / top-1 sums
    ref_seconds: float | None = None
    delta_ppl_pct: float | None = None  # 100 (ppl / ref_ppl - 1)
    delta_ppl_pct_ci95: tuple[float, float] | None = None
    kl_vs_ref: float | None = None  # mean KL(P_ref || P_model) in nats per scored token
    kl_vs_ref_ci95: tuple[float, float] | None = None
    top1_agreement: float | None = None  # share of scored positions with the same argmax token
    top1_agreement_ci95: tuple[float, float] | None = None
    window_ref_nll: list[float] | None = None
    window_kl: list[float] | None = None
    window_top1: list[int] | None = None
    kld_percentiles: dict[str, float] | None = None  # "50" ... "99.9", "max": per-token KLD, nats
    kld_percentiles_ci95: dict[str, tuple[float, float]] | None = None  # no "max": it has no interval
    delta_p_mean: float | None = None  # mean of q(next) - p(next), a fraction
    delta_p_mean_ci95: tuple[float, float] | None = None
    delta_p_rms: float | None = None  # sqrt(mean Δp²)
    delta_p_rms_ci95: tuple[float, float] | None = None
    delta_p_percentiles: dict[str, float] | None = None  # "1" ... "99", "min", "max"
    delta_p_percentiles_ci95: dict[str, tuple[float, float]] | None = None  # no "min", "max"
    warmup_seconds: float | None = None  # the first batch's share of `seconds`, one-time set-up included
    steady_tokens_per_s: float | None = None  # tokens fed per second after the first batch; None with one batch
    extra: dict[str, Any] = field(default_factory=dict)
    token_nll: np.ndarray | None = field(default=None, repr=False, compare=False)
    # each scored token's KL(P_ref || P_model), in the order of token_nll; set with a reference
    token_kl: np.ndarray | None = field(default=None, repr=False, compare=False)
    # the reference's NLL of each scored token, in the order of token_nll; set with a reference
    token_ref_nll: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the per-token arrays (``token_nll``, ``token_kl``, ``token_ref_nll``), JSON-ready."""
        d = asdict(self)
        for k in _TOKEN_ARRAYS:
            d.pop(k)
        for k, v in d.items():  # one window has no interval: null, not [NaN, NaN]
            if k.endswith("_ci95"):
                d[k] = _no_nan(v)
        return d

    def _repr_html_(self) -> str:
        return perplexity_html(self)


_TOKEN_ARRAYS = ("token_nll", "token_kl", "token_ref_nll")


def _no_nan(ci: Any) -> Any:
    """An interval, or a dict of them, with any NaN one (one window) made None: JSON has no NaN."""
    if isinstance(ci, dict):
        kept = {k: _no_nan(v) for k, v in ci.items()}
        return None if all(v is None for v in kept.values()) else kept
    return None if ci is None or any(x != x for x in ci) else ci


def perplexity_html(r: PerplexityResult) -> str:
    """``PerplexityResult``: perplexity with its interval, NLL, tokens, speed; against a reference, the paired
    change, KL and top-1 agreement, each with its interval (as ``outliers eval`` prints them)."""
    from outliers.eval.intervals import MIN_WINDOWS

    rows: list[tuple[Any, ...]] = [
        ("perplexity", f"{r.ppl:.4f}", f"{fmt_interval(r.ppl_ci95)} 95 % CI over {r.n_windows} windows".strip()),
        ("mean NLL", r.nll, "nats/token"),
        ("tokens scored", r.n_tokens),
        ("tokens/s", f"{r.tokens_per_s:.1f}", f"{r.seconds:.2f} s"),
    ]
    if r.ref_ppl is not None:
        rows.append(("reference", f"{r.ref_ppl:.4f}", f"{r.ref_dtype}, the same windows"))
    if r.delta_ppl_pct is not None:
        rows.append(
            ("vs reference", f"{r.delta_ppl_pct:+.2f} %", f"{fmt_interval(r.delta_ppl_pct_ci95, '+.2f')} paired")
        )
    if r.kl_vs_ref is not None:
        rows.append(("KL vs reference", f"{r.kl_vs_ref:.5f}", f"{fmt_interval(r.kl_vs_ref_ci95, '.5f')} nats/token"))
    if r.top1_agreement is not None:
        rows.append(
            ("top-1 agreement", f"{100 * r.top1_agreement:.2f} %", fmt_interval(r.top1_agreement_ci95, ".2f", 100))
        )
    rows += agreement_rows(r)
    settings = [
        ("model", r.model),
        ("corpus", r.corpus),
        ("protocol", r.protocol),
        ("window", r.window),
        ("stride", r.stride if r.protocol == "sliding" else None),
        ("bos", r.bos),
        ("dtype", r.dtype),
        ("method", r.method),
        ("threshold", r.extra.get("threshold")),
        ("outlier weights", r.extra.get("outlier_weights")),
        ("device", r.device),
        *provenance(r.extra),
    ]
    rough = r.n_windows < MIN_WINDOWS and r.n_windows > 0
    note = f"only {r.n_windows} windows: intervals over fewer than {MIN_WINDOWS} windows are rough" if rough else ""
    return render_html(named("Perplexity", r.model, r.method), rows, settings, notes=[note])


def _pick(cis: dict[str, Any] | None, key: str) -> Any:
    return (cis or {}).get(key)


def agreement_rows(r: PerplexityResult) -> list[tuple[str, str, str]]:
    """KLD's median, 99th percentile and maximum, Δp's mean and RMS (percent), each with its interval:
    (label, value, interval) as ``outliers eval`` and ``_repr_html_`` show them; [] without a reference."""
    rows: list[tuple[str, str, str]] = []
    if r.kld_percentiles is not None:
        k, kc = r.kld_percentiles, r.kld_percentiles_ci95
        rows += [
            ("KLD median", f"{k['50']:.5f}", fmt_interval(_pick(kc, "50"), ".5f")),
            ("KLD p99", f"{k['99']:.5f}", fmt_interval(_pick(kc, "99"), ".5f")),
            ("KLD max", f"{k['max']:.5f}", "nats, the largest of one token"),
        ]
    if r.delta_p_mean is not None and r.delta_p_rms is not None:
        rows += [
            ("Δp mean", f"{100 * r.delta_p_mean:+.3f} %", fmt_interval(r.delta_p_mean_ci95, "+.3f", 100)),
            ("Δp RMS", f"{100 * r.delta_p_rms:.3f} %", fmt_interval(r.delta_p_rms_ci95, ".3f", 100)),
        ]
    return rows
