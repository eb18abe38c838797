"""How numbers are written in a study's tables: Markdown without a tabulate dependency, and paired changes.

Shared by the report (``studies.report``) and every measure's report sections (``studies.measures``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["markdown", "fmt_delta"]


def markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table (no tabulate dependency); a ``|`` inside a cell (``|x| >= 6``) is escaped."""

    def cell(v) -> str:
        if isinstance(v, float) and math.isnan(v):
            return ""
        return (format(v, floatfmt) if isinstance(v, float) else str(v)).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def fmt_delta(value: float | None, ci) -> str:
    """``+1.7 % [+1.2, +2.3]``; empty for the baseline."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    interval = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci and not any(map(math.isnan, ci)) else ""
    return f"{value:+.1f} %{interval}"
