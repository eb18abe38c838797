"""Outlier tokens: which tokens carry massive activations, where in the window, in which blocks, how reliably.

The criteria (Sun et al.'s on the residual stream, PrefixQuant's at the down projection's input) and the
streaming counts are ``outliers.quant.prefix``'s, the ones PrefixQuant's prefix is chosen by
(``outliers.eval.static_rows``). Here: windows cut from a corpus, batches run one at a time (memory
bounded by a batch's activations and one count per token id), and the records with their token strings.

A record is one token id flagged somewhere: its outlier occurrences (by either criterion, and by each),
the positions in the window they were at, the blocks where each criterion fired, its largest residual
``|x|`` and that value's dim, and ``share``: its outlier occurrences over all its occurrences in the
scanned text (1.0: an outlier wherever it occurs; small: an outlier only where it stands, e.g. first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.scan import cut_windows
from outliers.quant.prefix import CRITERIA, TokenCounts, choose_prefix, compact_blocks, outlier_flags

__all__ = ["TokenReport", "outlier_tokens", "token_table"]


@dataclass
class TokenReport:
    """What ``outlier_tokens`` measured: the counts, and the windows they came from."""

    counts: TokenCounts
    window: int
    bos: str  # "corpus" or "window", as the windows were cut
    first_token: int  # PrefixQuant's first prefix token: the BOS, else the corpus' first token

    @property
    def windows(self) -> int:
        return self.counts.windows

    @property
    def tokens(self) -> int:
        return self.counts.tokens

    def records(self, tokenizer: Any = None, top: int | None = None) -> list[dict[str, Any]]:
        """The flagged token ids, most outlier occurrences first (``top``: the first ``top``), with their
        strings where a tokenizer is given."""
        out = self.counts.records()[:top]
        for r in out:
            r["token"] = tokenizer.decode([r["token_id"]]) if tokenizer is not None else ""
        return out

    def first_position(self) -> dict[str, int]:
        """Windows whose first position each criterion flagged."""
        return {name: int(f[0]) for name, f in self.counts.by_position.items()}

    def prefix(self) -> list[int]:
        """The prefix PrefixQuant would put before every window, chosen on this text."""
        return choose_prefix(self.counts, self.first_token)

    def to_dict(self, tokenizer: Any = None, top: int | None = None) -> dict[str, Any]:
        """The JSON ``outliers tokens --json`` writes."""
        prefix = self.prefix()
        return {
            "tokens": self.records(tokenizer, top),
            "criteria": dict(CRITERIA),
            "windows": self.windows,
            "window": self.window,
            "bos": self.bos,
            "tokens_measured": self.tokens,
            "blocks": self.counts.blocks,
            "first_position": self.first_position(),
            "flagged_positions": dict(self.counts.flagged_positions),
            "prefix_ids": prefix,
            "prefix": [tokenizer.decode([t]) for t in prefix] if tokenizer is not None else [],
        }


@torch.no_grad()
def outlier_tokens(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    max_tokens: int | None = 8192,
    max_windows: int | None = None,
    batch_size: int = 4,
    bos_token_id: int | None = None,
    first_token: int | None = None,
    progress: bool = True,
) -> TokenReport:
    """Flag outlier tokens over non-overlapping windows cut from the start of ``ids`` (``cut_windows``).

    ``bos_token_id``: every window is that BOS and ``window - 1`` corpus tokens. ``first_token``: the
    prefix's first token (None: the BOS given, else the corpus' first token).

    Raises:
        CorpusError: fewer tokens than one window.
        InvalidArgumentError: a family without blocks or a down projection the registry knows.
    """
    windows, _ = cut_windows(ids, window, bos_token_id=bos_token_id, max_tokens=max_tokens, max_windows=max_windows)
    counts = TokenCounts()
    for start in tqdm(
        range(0, len(windows), batch_size), desc="tokens", unit="batch", disable=not progress, leave=False
    ):
        batch = windows[start : start + batch_size]
        counts.add(batch, outlier_flags(model, batch))
    if first_token is None:
        first_token = bos_token_id if bos_token_id is not None else int(ids[0])
    return TokenReport(counts, window, "corpus" if bos_token_id is None else "window", int(first_token))


def _positions(positions: list[int]) -> str:
    shown = ", ".join(map(str, positions[:4]))
    return shown + (f" (+{len(positions) - 4})" if len(positions) > 4 else "")


def token_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as ``outliers tokens`` prints them."""
    rows = [
        {
            "token": repr(r.get("token", "")),
            "id": r["token_id"],
            "count": r["count"],
            "sun": r["count_sun"],
            "prefixquant": r["count_prefixquant"],
            "occurs": r["occurrences"],
            "share": f"{100 * r['share']:.0f} %",
            "positions": _positions(r["positions"]),
            "blocks (sun)": compact_blocks(r["blocks_sun"]),
            "blocks (prefixquant)": compact_blocks(r["blocks_prefixquant"]),
            "max |x|": "" if r["max_abs"] is None else f"{r['max_abs']:.0f}",
            "dim": "" if r["dim"] is None else r["dim"],
        }
        for r in records
    ]
    cols = ["token", "id", "count", "sun", "prefixquant", "occurs", "share", "positions"]
    return pd.DataFrame(rows, columns=[*cols, "blocks (sun)", "blocks (prefixquant)", "max |x|", "dim"])
