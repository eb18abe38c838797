"""How results show themselves in a notebook: compact HTML for Jupyter's ``_repr_html_``.

``render_html`` lays out any result as a title line, a two-column table of
its headline numbers (a 95 % interval in grey beside a number that has one,
written as ``outliers`` commands print it: ``[low, high]``), one line of
settings in small grey text (model, corpus, window, ... and the weights'
provenance where known) and optionally DataFrames, each capped at
``max_rows`` rows. Every string is escaped; no JavaScript, no stylesheet,
a few inline styles. Each result draws itself: its ``_repr_html_`` lives
beside it and picks its numbers; this module keeps only the shared helpers
(intervals, provenance, the layout) and imports no result type, so any
result module can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["render_html", "fmt_interval", "provenance", "named"]

MAX_ROWS = 10
_GREY = "color:#777"
_SMALL = "color:#777;font-size:85%"
_CELL = "text-align:left;padding:1px 8px 1px 0"


def fmt_interval(ci: Sequence[float] | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``[low, high]`` as the commands print it; '' for no interval; "n/a (1 window)" for a NaN one."""
    if not ci:
        return ""
    if any(math.isnan(x) for x in ci):
        return "n/a (1 window)"
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def provenance(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The settings line's entries for the facts ``outliers.cli.common.run_facts`` records, where present."""
    out: list[tuple[str, Any]] = [(k, meta.get(k)) for k in ("architecture", "weights")]
    if meta.get("n_params"):
        out.append(("params", f"{meta['n_params'] / 1e6:.1f}M"))
    for key in ("weights_sha256", "corpus_sha256"):
        if meta.get(key):
            out.append((key.replace("_", " "), str(meta[key])[:12]))
    return out


def _frame_html(frame: pd.DataFrame, max_rows: int) -> str:
    html = frame.head(max_rows).to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}", na_rep="")
    more = len(frame) - max_rows
    if more > 0:
        html += f'<div style="{_SMALL}">… {more} more row{"s" if more > 1 else ""}</div>'
    return html


def render_html(
    title: str,
    rows: Sequence[tuple[Any, ...]],
    settings: Sequence[tuple[str, Any]] = (),
    *,
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
    notes: Sequence[str] = (),
    max_rows: int = MAX_ROWS,
) -> str:
    """Return a result as an HTML fragment for Jupyter.

    Args:
        title: the first line, in bold.
        rows: ``(label, value)`` or ``(label, value, aside)``: a float value is written as the commands
            write it (4 decimals), the aside (an interval, a unit, a count) in grey beside it.
        settings: ``(name, value)`` pairs for the grey settings line (a float as ``:g``); None and ''
            values are left out.
        tables: ``(caption, DataFrame)`` pairs shown below, each capped at ``max_rows`` rows with a
            "… N more rows" note.
        notes: lines in grey below the settings (a warning about rough intervals).
    """
    parts = ['<div class="outliers-result" style="font-size:90%">', f"<div><b>{escape(title)}</b></div>"]
    if rows:
        parts.append('<table style="border-collapse:collapse;margin:2px 0"><tbody>')
        for label, value, *aside in rows:
            side = f' <span style="{_GREY}">{escape(str(aside[0]))}</span>' if aside and aside[0] else ""
            parts.append(
                f'<tr><th style="{_CELL}">{escape(str(label))}</th>'
                f'<td style="{_CELL}">{escape(_fmt(value))}{side}</td></tr>'
            )
        parts.append("</tbody></table>")
    shown = [
        f"{escape(k)} {escape(format(v, 'g') if isinstance(v, float) else str(v))}"
        for k, v in settings
        if v is not None and v != ""
    ]
    if shown:
        parts.append(f'<div style="{_SMALL}">{" · ".join(shown)}</div>')
    parts += [f'<div style="{_SMALL}">{escape(n)}</div>' for n in notes if n]
    for caption, frame in tables:
        if caption:
            parts.append(f'<div style="margin-top:6px"><b>{escape(caption)}</b></div>')
        parts.append(_frame_html(frame, max_rows))
    parts.append("</div>")
    return "\n".join(parts)


def named(what: str, *names: str) -> str:
    return " · ".join([what, *(n for n in names if n)])
