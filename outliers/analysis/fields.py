"""The names, dtypes and saved keys of every statistic ``OutlierStats`` keeps, and the histogram's bins.

Names are enums, so a misspelt one fails in the type checker, not as a
KeyError mid-analysis. What each statistic means: ``outliers.analysis.stats``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import torch

__all__ = [
    "Stat",
    "PointStat",
    "SpaceStat",
    "Top",
    "BatchStats",
    "HIST_WIDTH",
    "HIST_BINS",
    "HIST_EDGES",
    "FORMAT",
    "FORMAT_V1",
]

# |x| histogram per space: bins of 0.5 from 0 to 128; the last bin also takes larger values
HIST_WIDTH, HIST_BINS = 0.5, 256
HIST_EDGES = torch.arange(HIST_BINS + 1) * HIST_WIDTH
FORMAT = "outliers.stats/2"  # v1 and the per-point moments
FORMAT_V1 = "outliers.stats/1"  # what a scan without moments writes, and the code before moments wrote


class Stat(StrEnum):
    """A per-(capture point, dim) statistic, saved as ``"<point>/<value>"``."""

    ABSMAX = "absmax"
    COUNT = "count"
    POS = "pos"
    NEG = "neg"
    SUM_OUT = "sum_out"
    SUM = "sum"
    SUMSQ = "sumsq"
    REL_COUNT = "rel_count"
    MASSIVE = "massive"  # residual points only

    @property
    def dtype(self) -> torch.dtype:
        return {
            Stat.ABSMAX: torch.float32,
            Stat.SUM_OUT: torch.float64,
            Stat.SUM: torch.float64,
            Stat.SUMSQ: torch.float64,
        }.get(self, torch.int64)


class PointStat(StrEnum):
    """A per-capture-point sum over tokens or sequences (float64, one value), saved as ``"<point>/<value>"``.

    Kept only when a scan takes moments (``OutlierStats.moments``). A token's
    kurtosis is the fourth standardized moment of its values across the
    point's dims; a sequence's is that of all its values (tokens x dims), and
    its ∞-norm their largest |x| (Bondarenko et al. 2023). Pearson's
    definition: a normal distribution has kurtosis 3.
    """

    TOKEN_KURT = "token_kurt"  # the sum over tokens of each token's kurtosis
    TOKEN_KURT_MAX = "token_kurt_max"  # the largest token kurtosis
    KURT_TOKENS = "kurt_tokens"  # tokens with a kurtosis (some spread across dims)
    SEQ_KURT = "seq_kurt"  # the sum over sequences of each sequence's kurtosis
    SEQ_INF = "seq_inf"  # the sum over sequences of each sequence's ∞-norm
    SEQS = "seqs"  # sequences counted


class SpaceStat(StrEnum):
    """A per-(feature space, dim) statistic (``HIST``: per |x| bin), int64, saved as ``"<space>/<value>"``."""

    UNION = "union"
    REL_UNION = "rel_union"
    HIST = "hist"


class Top(StrEnum):
    """A field of the largest |x| seen (one per token and point), saved under its value."""

    ABS = "top_abs"
    VALUE = "top_value"
    POINT = "top_point"  # index into ``OutlierStats.points``
    SEQ = "top_seq"
    POS = "top_pos"
    TOKEN = "top_token"
    DIM = "top_dim"


class BatchStats(NamedTuple):
    """One point's sums over a batch of rows: what ``cpu_kernels.point_stats`` and the torch path return."""

    absmax: torch.Tensor
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, on purpose: the statistic's name
    pos: torch.Tensor
    sum_out: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor
    rel_count: torch.Tensor
    hist: torch.Tensor
    nonfinite: torch.Tensor  # 0-dim
    row_max: torch.Tensor  # each row's largest |x|, and its dim
    row_arg: torch.Tensor
    row_moments: torch.Tensor | None = None  # (rows, 5) float64: finite values, mean, centred sums of d^2, d^3, d^4
