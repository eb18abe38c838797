"""Scan a model over corpus windows and return its outlier statistics."""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from outliers.analysis.hooks import capture
from outliers.analysis.stats import OutlierStats
from outliers.arch.lmhead import run_for_hooks
from outliers.errors import CorpusError, InvalidArgumentError
from outliers.models.dispatch import input_device

__all__ = ["scan", "cut_windows"]


def cut_windows(
    ids: torch.Tensor,
    window: int,
    *,
    bos_token_id: int | None = None,
    max_tokens: int | None = None,
    max_windows: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Return ``(windows, corpus tokens)``: non-overlapping rows of ``window`` tokens cut from the corpus' start.

    With ``bos_token_id`` every row is that BOS followed by ``window - 1``
    corpus tokens, and a BOS at the corpus' start is dropped, not doubled
    (the second number counts the corpus tokens left). At most ``max_tokens``
    corpus tokens and ``max_windows`` rows are used.

    Raises:
        CorpusError: fewer tokens than one window.
    """
    prefix = 0 if bos_token_id is None else 1
    if prefix and len(ids) and int(ids[0]) == bos_token_id:
        ids = ids[1:]
    per = window - prefix
    usable = len(ids) if max_tokens is None else min(max_tokens, len(ids))
    n = usable // per if per > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CorpusError(f"corpus has {len(ids)} tokens, fewer than one window of {window}")
    rows = ids[: n * per].view(n, per)
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_token_id, dtype=rows.dtype), rows], dim=1)
    return rows, len(ids)


@torch.inference_mode()
def scan(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    points="attn_in,attn_out,ffn_in",
    threshold: float = 6.0,
    relative_k: float = 6.0,
    max_tokens: int = 8192,
    window: int = 512,
    batch_size: int = 4,
    top_k: int = 32,
    patterns: dict[str, str] | None = None,
    progress: bool = True,
    stats: OutlierStats | None = None,
    meta: dict | None = None,
    bos_token_id: int | None = None,
    moments: bool = True,
) -> OutlierStats:
    """Run non-overlapping windows of ``window`` tokens (up to ``max_tokens``) and return the statistics.

    With ``bos_token_id`` every window is that BOS followed by ``window - 1``
    corpus tokens (the ``bos="window"`` protocol of ``outliers.eval.windows``);
    a BOS at the corpus' start is then dropped, not doubled.

    ``moments=False`` leaves out the kurtosis and ∞-norm sums (``outliers.analysis.moments``).

    A corpus shorter than ``max_tokens`` is scanned whole; ``stats.meta``
    records tokens asked for and scanned, and a warning says so.

    Raises:
        InvalidArgumentError: bad threshold, window or max_tokens.
        CorpusError: fewer tokens than one window.
    """
    if not threshold > 0:
        raise InvalidArgumentError(f"threshold must be > 0, got {threshold!r}")
    if window < 1 or max_tokens < 1:
        raise InvalidArgumentError(f"window and max_tokens must be >= 1, got {window} and {max_tokens}")
    windows, corpus_tokens = cut_windows(ids, window, bos_token_id=bos_token_id, max_tokens=max_tokens)
    n_windows = len(windows)
    scanned = n_windows * window
    note = ""
    if corpus_tokens < max_tokens:
        note = f"asked for {max_tokens} tokens but the corpus holds {corpus_tokens}: scanned {scanned}"
        warnings.warn(note, stacklevel=2)
    device = input_device(model)
    with capture(
        model,
        points,
        threshold=threshold,
        relative_k=relative_k,
        top_k=top_k,
        patterns=patterns,
        stats=stats,
        moments=moments,
    ) as st:
        for start in tqdm(
            range(0, n_windows, batch_size), desc="scan", unit="batch", disable=not progress, leave=False
        ):
            run_for_hooks(model, windows[start : start + batch_size].to(device))
    from outliers.models.load import model_name

    st.meta.update({"model": model_name(model)} if model_name(model) else {})
    st.meta.update(meta or {})
    st.meta.update(
        tokens_asked=max_tokens,
        tokens_scanned=st.meta.get("tokens_scanned", 0) + scanned,
        window=window,
        bos="corpus" if bos_token_id is None else "window",
        note=note,
    )
    bad = {k: v for k, v in st.nonfinite.items() if v}
    if bad:
        warnings.warn(f"NaN/inf values left out of the statistics: {bad}", stacklevel=2)
    return st
