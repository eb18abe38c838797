"""Turn a study's store into tables (CSV, Markdown), figures (PNG), ``report.md`` and ``report.html``.

Every table is built from what the study's grid holds, and only from
*current* rows (the fingerprint the grid asks for now;
``studies.planning.plan``). Stale rows are counted, never shown. The report
is a header (counts, weights' provenance, corpora), then each measure's
sections in registration order (``studies.measures``: a measure the study
does not take says so, a layout the grid cannot fill says so), the failed
cells, and the settings. ``report.html`` is the same blocks as one self-contained page
(``outliers.html_page``): the figures embedded, a table of contents, tables that sort.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import StudyConfig, as_tables, read_study
from .format import fmt_delta, markdown
from .measures.outliers import emergence, outlier_table
from .measures.perplexity_report import agreement_table, perplexity_table, threshold_curves
from .store import Store

__all__ = [
    "status",
    "current_results",
    "perplexity_table",
    "agreement_table",
    "threshold_curves",
    "outlier_table",
    "emergence",
    "write_report",
    "StudySummary",
    "summary",
    "markdown",
    "fmt_delta",
]


def _load(folder: str | Path) -> tuple[StudyConfig, list, pd.DataFrame]:
    """Return the study's validated config, its planned cells (``studies.planning.plan``) and every stored row."""
    from .planning import plan

    cfg = read_study(folder)
    store = Store(folder)
    try:
        return cfg, plan(cfg, store), store.frame()
    finally:
        store.close()


def status(folder: str | Path) -> pd.DataFrame:
    """One row per cell of the grid: kind, model, corpus, method, threshold, state, commit."""
    _, planned, frame = _load(folder)
    commits = dict(zip(frame.key, frame.commit_sha, strict=True))
    return pd.DataFrame(
        [
            {
                "kind": p.cell["kind"],
                "model": p.cell["model"],
                "corpus": p.cell["corpus"],
                "method": p.cell["method"],
                "threshold": p.cell["threshold"],
                "state": p.state,
                "commit": (commits.get(p.key) or "")[:10],
            }
            for p in planned
        ]
    )


def current_results(folder: str | Path) -> tuple[StudyConfig, pd.DataFrame, dict[str, int]]:
    """Return the study's config, its current rows (done or older, with ``state``) and counts per state."""
    cfg, planned, frame = _load(folder)
    return (cfg, *_current(planned, frame))


def _current(planned: list, df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    from .planning import STATES

    state = {p.key: p.state for p in planned}
    counts = {s: sum(p.state == s for p in planned) for s in STATES}
    df = df[df.key.map(lambda k: state.get(k) in ("done", "older"))].copy()
    df["state"] = df.key.map(state)
    return df, counts


@dataclass(frozen=True, eq=False)
class StudySummary:
    """A study's current results as a notebook shows them: ``summary(folder)`` in a cell.

    ``frame``: the current rows (done or older, with ``state``); ``counts``: cells per state;
    ``tables``: the report's tables (``report.md``), each under its heading.
    """

    config: StudyConfig
    frame: pd.DataFrame = field(repr=False)
    counts: dict[str, int]
    tables: tuple[tuple[str, pd.DataFrame], ...] = field(repr=False)
    failed: pd.DataFrame = field(repr=False)  # model, method, threshold, error (its first line)

    def _repr_html_(self) -> str:
        from outliers.display import render_html

        cfg, c = self.config, self.counts
        rows = [
            ("cells current", c["done"] + c["older"], f"{c['older']} by another commit" if c["older"] else ""),
            ("failed", c["failed"]),
            ("stale", c["stale"], "inputs changed: left out; studies run recomputes them" if c["stale"] else ""),
            ("pending", c["pending"]),
        ]
        weights = [
            (f"weights of {model}", (group.provenance.iloc[-1] or {}).get("weights"))
            for model, group in self.frame.groupby("model", sort=False)
        ]
        settings = [
            ("models", ", ".join(cfg.models)),
            ("corpora", ", ".join(cfg.corpora)),
            ("measures", ", ".join(cfg.measure)),
            ("window", cfg.window),
            ("bos", cfg.bos),
            ("dtype", cfg.dtype),
            *weights,
        ]
        tables = [*self.tables, *([("failed cells", self.failed)] if len(self.failed) else [])]
        title = f"Study {cfg.name}" + (f": {cfg.description}" if cfg.description else "")
        return render_html(title, rows, settings, tables=tables)


def summary(folder: str | Path) -> StudySummary:
    """Return a study's current results with the report's tables; a notebook shows it as HTML.

    Only current rows count (as in ``write_report``); figures are left to ``report.md`` and the
    measures' plotting functions.
    """
    from .measures import MEASURES, Table

    cfg, planned, frame = _load(folder)
    df, counts = _current(planned, frame)
    tables = []
    for measure in MEASURES.values():
        if measure.name not in cfg.measure:
            continue
        section, heading = measure.name, measure.name
        for block in measure.report(df, cfg):
            if isinstance(block, str) and block.startswith("## "):
                section = heading = block[3:]
            elif isinstance(block, str) and block.startswith("### "):
                heading = f"{section} · {block[4:]}"
            elif isinstance(block, Table) and not block.csv_only:
                tables.append((heading, block.frame))
    failed = frame[frame.status == "failed"]
    errors = failed.assign(error=failed.error.map(lambda e: str(e).splitlines()[0] if e else ""))
    return StudySummary(cfg, df, counts, tuple(tables), errors[["model", "method", "threshold", "error"]])


def _weights(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``(model, where its weights came from)`` for each model with a current row."""
    out = []
    for model, rows in df.groupby("model", sort=False):
        p = rows.provenance.iloc[-1] or {}
        sha = (p.get("weights_sha256") or "")[:12]
        out.append(
            (
                str(model),
                f"{p.get('weights', 'weights of unknown provenance')}"
                + (f" (SHA-256 {sha})" if sha else "")
                + (f", revision {p['revision']}" if p.get("revision") else ""),
            )
        )
    return out


def _render(block, folder: Path) -> str | None:
    """Write a measure's table or figure beside ``report.md``; return its Markdown (None: CSV only)."""
    from outliers.cache import atomic_write, save_csv, save_figure

    from .measures import Image, Table

    if isinstance(block, Table):
        save_csv(block.frame, folder / f"{block.stem}.csv")
        if block.csv_only:
            return None
        text = markdown(block.frame, block.floatfmt)
        atomic_write(folder / f"{block.stem}.md", text + "\n")
        return text
    if isinstance(block, Image):
        save_figure(block.figure, folder / block.file)
        return f"![{block.alt}]({block.file})"
    return block


def _page_blocks(blocks: list, folder: Path) -> tuple[list, list]:
    """The report's blocks as a page's (``outliers.html_page``): ``(summary, sections)``.

    The same blocks as ``report.md``: a ``## `` or ``### `` line opens a section or subsection; ``- `` lines
    make a list, a fenced block a preformatted one, other lines paragraphs; tables and figures are the
    ones written beside the report (figures embedded from their PNG). Blocks before the first heading are
    the summary.
    """
    from outliers import html_page as page

    from .measures import Image, Table

    summary: list = []
    sections: list[tuple[str, int, list]] = []
    into: list = summary  # the blocks of the section being read
    bullets: list[str] = []
    code: list[str] | None = None  # inside a fenced block: its lines

    def flush() -> None:
        if bullets:
            into.append(page.Bullets(tuple(bullets)))
            bullets.clear()

    for block in blocks:
        if isinstance(block, Table | Image):
            flush()
            if isinstance(block, Image):
                into.append(page.Figure(folder / block.file, block.alt))
            elif not block.csv_only:
                into.append(page.Table(block.frame, floatfmt=block.floatfmt))
            continue
        for line in str(block).split("\n"):
            if code is not None:
                if line.startswith("```"):
                    into.append(page.Code("\n".join(code)))
                    code = None
                else:
                    code.append(line)
            elif line.startswith("```"):
                flush()
                code = []
            elif line.startswith(("## ", "### ")):
                flush()
                level, title = line.split(" ", 1)
                sections.append((title, len(level), []))
                into = sections[-1][2]
            elif line.startswith("- "):
                bullets.append(line[2:])
            else:
                flush()
                if line.strip() and not line.startswith("# "):
                    into.append(line)
    flush()
    return summary, [page.Section(title, tuple(body), level=level) for title, level, body in sections]


def write_report(folder: str | Path) -> Path:
    """Write tables (CSV + Markdown), figures, ``report.md`` and ``report.html`` into ``folder``.

    Both reports are made from the same blocks: ``report.html`` is one self-contained page
    (``outliers.html_page``) with a table of contents, sortable tables and the figures embedded.
    Returns the path of ``report.md``.
    """
    import torch
    import transformers

    import outliers
    from outliers.cache import atomic_write
    from outliers.html_page import write_page

    from .measures import MEASURES

    folder = Path(folder)
    cfg, planned, frame = _load(folder)
    df, counts = _current(planned, frame)
    failed = frame[frame.status == "failed"]
    head = [
        f"# Study: {cfg.name}",
        "",
        cfg.description,
        "",
        f"{counts['done'] + counts['older']} cells current, {counts['failed']} failed, "
        f"{counts['stale']} stale, {counts['pending']} pending.",
        "",
    ]
    if counts["stale"]:
        head += [
            f"{counts['stale']} cell(s) were computed from other inputs (corpus text, weights or settings "
            "changed) and are left out; `studies run` recomputes them.",
            "",
        ]
    if counts["older"]:
        head += [
            f"{counts['older']} current cell(s) were computed by another commit of the code "
            "(`studies status -v` lists them; `studies run --recompute-older` redoes them).",
            "",
        ]
    weights = _weights(df)
    corpora = ""
    if len(df):
        # the hash each row recorded when it ran (the plan has checked it is still the corpus' hash)
        hashes = {r.corpus: (r.provenance or {}).get("corpus_sha256") or "unknown" for r in df.itertuples()}
        corpora = ", ".join(f"`{c}` (SHA-256 {sha[:12]})" for c, sha in hashes.items())
    commits = sorted(
        {(c or "unknown")[:10] + ("+dirty" if d else "") for c, d in zip(df.commit_sha, df.dirty, strict=True)}
    )
    computed = f"outliers {outliers.__version__} (commit {', '.join(commits) or 'unknown'})"
    reported = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}"
    )

    body: list = []
    for measure in MEASURES.values():
        if measure.name in cfg.measure:
            body += measure.report(df, cfg)
        elif measure.absent:
            body += [measure.absent, ""]
    if len(failed):
        body += (
            ["## Failed cells", ""]
            + [f"- {r.model} {r.method} t={r.threshold}: {str(r.error).splitlines()[0]}" for r in failed.itertuples()]
            + [""]
        )
    body += [
        "## Settings",
        "",
        "```json",
        json.dumps(as_tables(cfg), indent=1),
        "```",
        "",
        f"Computed by {computed}; report by {reported}.",
        "",
    ]

    provenance_md = []
    if len(df):
        provenance_md = [
            "Weights (every number below was measured on these):",
            "",
            *[f"- `{model}`: {where}" for model, where in weights],
            "",
            f"Corpora: {corpora}.",
            "",
        ]
    rendered = (_render(block, folder) for block in body)
    report = atomic_write(
        folder / "report.md", "\n".join(head + provenance_md + [t for t in rendered if t is not None])
    )

    summary, sections = _page_blocks(head + body, folder)
    provenance = [
        *[(f"weights of {model}", where) for model, where in weights],
        ("corpora", corpora),
        ("computed by", computed),
        ("report by", reported),
    ]
    title = f"Study: {cfg.name}"
    write_page(folder / "report.html", title, sections, summary=summary, provenance=provenance)
    return report
