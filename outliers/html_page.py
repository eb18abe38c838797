"""One self-contained HTML page: a title, a summary, the provenance, a table of contents and sections.

A page is what a researcher attaches to an email or puts beside a paper: one file that opens offline.
Figures are embedded as base64 PNG data URIs, the style is inline, and a few lines of inline JavaScript
(no library) sort every table with a header row (an embedded ``_repr_html_``'s too) by the header clicked,
numbers as numbers (``+1.7 % [+1.2, +2.3]`` sorts as 1.7), blanks last. A Content-Security-Policy
forbids the page to load anything from anywhere.

A section holds blocks, in order:

* ``str``: a paragraph, escaped; a span between backticks becomes ``<code>``, as in Markdown (``inline``);
* ``Bullets``: a list of such lines; ``Code``: preformatted text;
* ``Table``: a DataFrame as a sortable table (no index; floats in ``floatfmt``, NaN blank);
* ``Figure``: a matplotlib Figure, a PNG file or PNG bytes, embedded;
* ``Html``: a fragment already rendered (a result's ``_repr_html_``), the one thing inserted as is.

``studies report`` writes ``report.html`` with it (``studies.report``). ``write_page`` writes a page;
``render_page`` returns its text.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Html", "Bullets", "Code", "Table", "Figure", "Block", "Section", "render_page", "write_page", "inline"]


@dataclass(frozen=True)
class Html:
    """A fragment inserted as is: HTML a trusted renderer made (a result's ``_repr_html_``)."""

    html: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list; each item is escaped like a paragraph."""

    items: Sequence[str]


@dataclass(frozen=True)
class Code:
    """Preformatted text (settings as JSON, a command line), escaped."""

    text: str


@dataclass(frozen=True, eq=False)
class Table:
    """A DataFrame as a table sortable by any header: no index, floats as ``floatfmt``, NaN and None blank."""

    frame: pd.DataFrame
    caption: str = ""
    floatfmt: str = ".3f"


@dataclass(frozen=True, eq=False)
class Figure:
    """A figure embedded as a PNG: ``source`` is a matplotlib Figure, a PNG file's path or PNG bytes."""

    source: Any
    alt: str
    caption: str = ""


Block: TypeAlias = str | Html | Bullets | Code | Table | Figure


@dataclass(frozen=True)
class Section:
    """A heading and its blocks. ``level`` 2 is a section, 3 a subsection (nested in the contents).

    ``anchor``: the heading's id (the link ``#anchor``); '' makes one from the title, unique on the page.
    """

    title: str
    blocks: Sequence[Block] = ()
    anchor: str = ""
    level: int = 2


_RESERVED = {"top", "summary", "provenance", "contents"}  # the page's own ids
_ANCHOR = re.compile(r"[A-Za-z][\w-]*")

# in print a page is about 7.5 in wide: a DataFrame's twenty columns would be cut at its edge (Chromium's PDF
# of SmolLM2's profile lost the weights' and the super weights' last columns), so tables take small type and
# their headers may break inside a word
_CSS = """
:root{color-scheme:light}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#fff;
 max-width:76rem;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 .25rem}h2{font-size:1.3rem;margin:2rem 0 .5rem;padding-top:.5rem;
 border-top:1px solid #ddd}h3{font-size:1.08rem;margin:1.4rem 0 .4rem}
code,pre{font:.85em/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f4f4f6;border-radius:3px}
code{padding:0 .25em}pre{padding:.6em .8em;overflow-x:auto;white-space:pre-wrap}
.summary{background:#f3f7fc;border-left:4px solid #3a6ea5;padding:.4rem 1rem;margin:.8rem 0}
.facts{font-size:.85rem;color:#444;border-collapse:collapse;margin:.6rem 0}
.facts th{text-align:left;font-weight:600;padding:1px 1rem 1px 0;vertical-align:top;white-space:nowrap}
.facts td{padding:1px 0}
nav.toc{font-size:.9rem;margin:1rem 0}nav.toc ul{margin:.2rem 0;padding-left:1.3rem}
.scroll{overflow-x:auto;margin:.5rem 0 1rem}
table.sortable{border-collapse:collapse;font-size:.85rem}
table.sortable caption{text-align:left;font-weight:600;padding-bottom:.2rem}
table.sortable th,table.sortable td{padding:.2rem .6rem;border-bottom:1px solid #e3e3e3;text-align:left}
table.sortable td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sortable thead th{background:#f4f4f6;cursor:pointer;user-select:none;vertical-align:bottom;
 border-bottom:2px solid #bbb}table.sortable th.num{text-align:right}
table.sortable thead th::after{content:"\\a0\\2195";color:#aaa}
table.sortable thead th[aria-sort=ascending]::after{content:"\\a0\\25B2";color:#333}
table.sortable thead th[aria-sort=descending]::after{content:"\\a0\\25BC";color:#333}
table.sortable tbody tr:nth-child(even){background:#fafafa}
figure{margin:.8rem 0 1.2rem}figure img{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#555}
@media print{body{max-width:none;padding:0;font-size:11pt}nav.toc{break-after:page}
 .scroll{overflow:visible}h2,h3{break-after:avoid}figure,tr{break-inside:avoid}
 table.sortable thead th::after{content:none}table.sortable td.num{white-space:normal}
 a{color:inherit;text-decoration:none}
 table{font-size:7pt}th,td{padding:1px 3px!important}th{overflow-wrap:anywhere}}
"""

# every table with one header row (a DataFrame's, a ``_repr_html_``'s too) sorts by the header clicked (or
# Enter on it): by the number a cell starts with (its data-v where it has one; 23,000 reads as 23000), else
# by its text with the numbers inside compared as numbers; numbers first, then text, blanks last
_JS = """
const num = s => parseFloat(s.replace("\\u2212", "-").replace(/(\\d),(?=\\d{3}(\\D|$))/g, "$1"));
document.querySelectorAll("table").forEach(t => {
  if (!t.tHead || t.tHead.rows.length !== 1 || !t.tBodies.length) return;
  t.classList.add("sortable");
  const heads = Array.from(t.tHead.rows[0].cells);
  heads.forEach((th, i) => {
    const sort = () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(h => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      const key = r => {
        const c = r.cells[i], s = c ? (c.dataset.v ?? c.textContent).trim() : "", n = num(s);
        return s === "" ? [2, 0, s] : isNaN(n) ? [1, 0, s] : [0, n, s];
      };
      const cmp = (a, b) => a[1] - b[1] || a[2].localeCompare(b[2], undefined, {numeric: true});
      const body = t.tBodies[0], rows = Array.from(body.rows, r => [key(r), r]);
      rows.sort(([a], [b]) => a[0] - b[0] || (a[0] === 2 ? 0 : up ? cmp(a, b) : cmp(b, a)));
      rows.forEach(([, r]) => body.appendChild(r));
    };
    th.tabIndex = 0;
    th.title = "sort by this column";
    th.addEventListener("click", sort);
    th.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def inline(text: str) -> str:
    """A line of text as HTML: escaped, with each span between backticks as ``<code>``."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an odd number of backticks: no spans
        return escape(str(text))
    return "".join(escape(p) if i % 2 == 0 else f"<code>{escape(p)}</code>" for i, p in enumerate(parts))


def _cell(value: Any, floatfmt: str) -> str:
    if (
        value is None
        or type(value).__name__ in ("NAType", "NaTType")
        or (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value))
    ):
        return "<td></td>"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f'<td class="num" data-v="{int(value)}">{int(value)}</td>'
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        exact = repr(v) if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")  # as JavaScript reads it
        return f'<td class="num" data-v="{exact}">{escape(format(v, floatfmt))}</td>'
    return f"<td>{escape(str(value))}</td>"


_NUM = ' class="num"'


def _table(block: Table) -> str:
    frame = block.frame
    caption = f"<caption>{inline(block.caption)}</caption>" if block.caption else ""
    numeric = [kind in "iuf" for kind in (dtype.kind for dtype in frame.dtypes)]  # right-aligned, as numbers are
    head = "".join(
        f'<th scope="col"{_NUM if num else ""}>{escape(str(c))}</th>'
        for c, num in zip(frame.columns, numeric, strict=True)
    )
    body = "\n".join(
        "<tr>" + "".join(_cell(v, block.floatfmt) for v in row) + "</tr>"
        for row in frame.itertuples(index=False, name=None)
    )
    return (
        f'<div class="scroll"><table class="sortable">{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _png(source: Any, dpi: int) -> bytes:
    if isinstance(source, bytes):
        return source
    if hasattr(source, "savefig"):
        buffer = io.BytesIO()
        source.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    return Path(source).read_bytes()


def _figure(block: Figure, dpi: int) -> str:
    data = base64.b64encode(_png(block.source, dpi)).decode("ascii")
    caption = f"<figcaption>{inline(block.caption)}</figcaption>" if block.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.alt)}">{caption}</figure>'


def _block(block: Block, dpi: int) -> str:
    if isinstance(block, str):
        return f"<p>{inline(block)}</p>" if block.strip() else ""
    if isinstance(block, Html):
        return block.html
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Code):
        return f"<pre>{escape(block.text)}</pre>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block, dpi)
    raise TypeError(f"not a page block: {type(block).__name__}")


def _anchors(sections: Sequence[Section]) -> list[str]:
    """Each section's id: its own (checked) or one made from its title, unique on the page."""
    taken = set(_RESERVED) | {s.anchor for s in sections if s.anchor}
    out: list[str] = []
    for s in sections:
        if s.anchor:
            if not _ANCHOR.fullmatch(s.anchor) or s.anchor in out or s.anchor in _RESERVED:
                raise ValueError(f"section {s.title!r}: anchor {s.anchor!r} is not a name, or is taken")
            out.append(s.anchor)
            continue
        base = re.sub(r"[^a-z0-9]+", "-", s.title.lower()).strip("-") or "section"
        base = base if base[0].isalpha() else f"s-{base}"
        anchor, n = base, 1
        while anchor in taken:
            n += 1
            anchor = f"{base}-{n}"
        taken.add(anchor)
        out.append(anchor)
    return out


def _contents(sections: Sequence[Section], anchors: Sequence[str]) -> str:
    """The nested list of links: level-3 sections inside the level-2 section before them."""
    parts, open_sub = ['<nav class="toc" id="contents"><b>Contents</b><ul>'], False
    for i, (s, anchor) in enumerate(zip(sections, anchors, strict=True)):
        link = f'<a href="#{anchor}">{escape(s.title)}</a>'
        if s.level > 2 and i > 0:
            parts.append(("" if open_sub else "<ul>") + f"<li>{link}</li>")
            open_sub = True
            continue
        parts.append(("</ul></li>" if open_sub else "</li>" if i else "") + f"<li>{link}")
        open_sub = False
    parts.append(("</ul></li>" if open_sub else "</li>" if sections else "") + "</ul></nav>")
    return "".join(parts)


def render_page(
    title: str,
    sections: Sequence[Section],
    *,
    summary: Sequence[Block] = (),
    provenance: Sequence[tuple[str, Any]] = (),
    subtitle: str = "",
    dpi: int = 110,
) -> str:
    """Return the page's HTML text.

    Args:
        title: the page's title and first heading.
        sections: the page's sections in order; each is listed in the contents.
        summary: blocks in a box under the title: what a reader should take away.
        provenance: ``(name, value)`` pairs in a small table under the summary (weights, corpus, code);
            None and '' values are left out.
        subtitle: a line under the title.
        dpi: the resolution a matplotlib Figure is rendered at.

    Raises:
        ValueError: a section's own anchor is not a name (a letter, then letters, digits, ``_`` or ``-``)
            or is taken.
    """
    anchors = _anchors(sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head>",
        '<body><header id="top">',
        f"<h1>{escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{inline(subtitle)}</p>")
    if summary:
        parts.append('<div class="summary" id="summary">' + "\n".join(_block(b, dpi) for b in summary) + "</div>")
    facts = [(k, v) for k, v in provenance if v is not None and v != ""]
    if facts:
        rows = "".join(f'<tr><th scope="row">{escape(str(k))}</th><td>{inline(str(v))}</td></tr>' for k, v in facts)
        parts.append(f'<table class="facts" id="provenance"><tbody>{rows}</tbody></table>')
    parts.append("</header>")
    if sections:
        parts.append(_contents(sections, anchors))
    parts.append("<main>")
    for section, anchor in zip(sections, anchors, strict=True):
        h = "h3" if section.level > 2 else "h2"
        parts.append(f'<section aria-labelledby="{anchor}"><{h} id="{anchor}">{escape(section.title)}</{h}>')
        parts += [text for text in (_block(b, dpi) for b in section.blocks) if text]
        parts.append("</section>")
    parts += ["</main>", f"<script>{_JS}</script>", "</body></html>", ""]
    return "\n".join(parts)


def write_page(
    path: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    *,
    summary: Sequence[Block] = (),
    provenance: Sequence[tuple[str, Any]] = (),
    subtitle: str = "",
    dpi: int = 110,
) -> Path:
    """Write the page (``render_page``) to ``path`` atomically; return the path."""
    from .cache import atomic_write

    text = render_page(title, sections, summary=summary, provenance=provenance, subtitle=subtitle, dpi=dpi)
    return atomic_write(path, text)
