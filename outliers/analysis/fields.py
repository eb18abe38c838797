"""The names, dtypes and saved keys of every statistic ``OutlierStats`` keeps, and the histogram's bins.

Names are enums, so a misspelt one fails in the type checker, not as a
KeyError mid-analysis. What each statistic means: ``outliers.analysis.stats``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import torch

__all__ = ["Stat", "SpaceStat", "Top", "BatchStats", "HIST_WIDTH", "HIST_BINS", "HIST_EDGES", "FORMAT"]

# |x| histogram per space: bins of 0.5 from 0 to 128; the last bin also takes larger values
HIST_WIDTH, HIST_BINS = 0.5, 256
HIST_EDGES = torch.arange(HIST_BINS + 1) * HIST_WIDTH
FORMAT = "outliers.stats/1"


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
