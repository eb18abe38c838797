"""``PerplexityResult``: a perplexity with everything needed to reproduce, bound or compare it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from outliers.display import perplexity_html

__all__ = ["PerplexityResult"]


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and everything needed to reproduce, bound or compare it.

    ``window_nll`` and ``window_tokens`` are each window's NLL sum and scored
    tokens (their ratio of sums is ``nll``); ``token_nll`` holds every scored
    token's NLL in window order (float32, left out of ``to_dict``). The
    ``*_ci95`` fields are 95 % bootstrap intervals over windows. The fields
    from ``ref_dtype`` to ``window_top1`` are set when a reference model was given.

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
    warmup_seconds: float | None = None  # the first batch's share of `seconds`, one-time set-up included
    steady_tokens_per_s: float | None = None  # tokens fed per second after the first batch; None with one batch
    extra: dict[str, Any] = field(default_factory=dict)
    token_nll: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``token_nll``, JSON-ready."""
        d = asdict(self)
        d.pop("token_nll")
        return d

    def _repr_html_(self) -> str:
        return perplexity_html(self)
