"""Turn a study's store into tables (CSV, Markdown), figures (PNG) and ``report.md``.

Every table is built from what the study's grid holds: its thresholds,
methods, models and corpora, and only from *current* rows (the fingerprint
the grid asks for now; ``studies.runner.plan``). Stale rows are counted,
never shown. A layout the grid cannot fill says so in the report.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from outliers.quant.methods import METHODS, label

from .config import StudyConfig, as_tables, read_study
from .store import Store

__all__ = ["status", "current_results", "perplexity_table", "agreement_table", "threshold_curves", "outlier_table", "emergence",
           "write_report", "markdown", "fmt_delta"]


def markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    def cell(v):
        if isinstance(v, float) and math.isnan(v):
            return ""
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def fmt_delta(value: float | None, ci) -> str:
    """``+1.7 % [+1.2, +2.3]``; empty for the baseline."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    interval = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci and not any(map(math.isnan, ci)) else ""
    return f"{value:+.1f} %{interval}"


def _load(folder: str | Path) -> tuple[StudyConfig, list, pd.DataFrame]:
    """Return the study's validated config, its planned cells (``studies.runner.plan``) and every stored row."""
    from .runner import plan

    cfg = read_study(folder)
    store = Store(folder)
    try:
        return cfg, plan(cfg, store), store.frame()
    finally:
        store.close()


def status(folder: str | Path) -> pd.DataFrame:
    """One row per cell of the grid: kind, model, corpus, method, threshold, state, commit."""
    _, planned, frame = _load(folder)
    commits = dict(zip(frame.key, frame.commit_sha))
    return pd.DataFrame([{"kind": p.cell["kind"], "model": p.cell["model"], "corpus": p.cell["corpus"],
                          "method": p.cell["method"], "threshold": p.cell["threshold"], "state": p.state,
                          "commit": (commits.get(p.key) or "")[:10]} for p in planned])


def current_results(folder: str | Path) -> tuple[StudyConfig, pd.DataFrame, dict[str, int]]:
    """Return the study's config, its current rows (done or older, with ``state``) and counts per state."""
    cfg, planned, frame = _load(folder)
    return (cfg, *_current(planned, frame))


def _current(planned: list, df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    from .runner import STATES

    state = {p.key: p.state for p in planned}
    counts = {s: sum(p.state == s for p in planned) for s in STATES}
    df = df[df.key.map(lambda k: state.get(k) in ("done", "older"))].copy()
    df["state"] = df.key.map(state)
    return df, counts


def _ppl_rows(df: pd.DataFrame) -> pd.DataFrame:
    ppl = df[(df.kind == "perplexity") & (df.status == "done")].copy()
    for col in ("ppl_ci95", "delta_ppl_pct", "delta_ppl_pct_ci95", "kl_vs_ref", "top1_agreement", "n_windows"):
        ppl[col] = ppl.result.map(lambda r, c=col: r.get(c))
    return ppl


def perplexity_table(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The paper's Table-1 layout at one decomposition threshold: one row per method, per model its
    perplexity and the paired change against fp32 with its 95 % interval.

    Methods without decomposition have one cell each (their threshold is moot) and appear in every
    threshold's table.
    """
    ppl = _ppl_rows(df)
    decomposes = ppl.method.map(lambda m: m != "fp32" and METHODS[m].decomposition)
    ppl = ppl[(ppl.method == "fp32") | (decomposes & (ppl.threshold == threshold))
              | (~decomposes & (ppl.method != "fp32"))]
    order = ["fp32", *METHODS]
    rows = []
    for method in sorted(ppl.method.unique(), key=order.index):
        row = {"method": label(method)}
        for model, r in ppl[ppl.method == method].groupby("model", sort=False):
            r = r.iloc[-1]
            row[model] = r.ppl
            row[f"{model} vs fp32"] = fmt_delta(r.delta_ppl_pct, r.delta_ppl_pct_ci95)
        rows.append(row)
    return pd.DataFrame(rows)


def agreement_table(ppl: pd.DataFrame) -> pd.DataFrame:
    """KL against the float model and top-1 agreement per quantized cell, each with its interval."""
    def interval(v, ci, scale, fmt):
        if v is None:
            return ""
        return f"{v * scale:{fmt}}" + (f" [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]" if ci else "")

    rows = [{"model": r.model, "method": label(r.method), "threshold": f"{r.threshold:g}",
             "KL nats/token": interval(r.result.get("kl_vs_ref"), r.result.get("kl_vs_ref_ci95"), 1, ".4f"),
             "top-1 agreement %": interval(r.result.get("top1_agreement"), r.result.get("top1_agreement_ci95"),
                                           100, ".2f")}
            for r in ppl.itertuples()]
    return pd.DataFrame(rows)


def threshold_curves(df: pd.DataFrame) -> Figure:
    """Perplexity against the decomposition threshold per method and model, the fp32 line dashed."""
    ppl = df[(df.kind == "perplexity") & (df.status == "done")]
    curves = ppl[ppl.method != "fp32"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(curves, x="threshold", y="ppl", hue="method", style="model", marker="o", ax=ax)
    for model, base in ppl[ppl.method == "fp32"].groupby("model"):
        ax.axhline(base.ppl.iloc[-1], ls="--", c="k", lw=1, label=f"fp32 {model}")
    ax.set(xlabel="decomposition threshold", ylabel="perplexity", title="Perplexity vs threshold")
    ax.legend(fontsize=8)
    return fig


def outlier_table(df: pd.DataFrame, thresholds: tuple[float, ...] | None = None) -> pd.DataFrame:
    """The paper's Table-4 layout per model (both criteria, as scanned), with fp32 and llm.int8 perplexity.

    ``thresholds``: the llm.int8 decomposition thresholds to show a perplexity column for
    (default: every one the study has).
    """
    scans = df[(df.kind == "outliers") & (df.status == "done")]
    ppl = _ppl_rows(df)
    int8 = ppl[ppl.method == "llm.int8"]
    thresholds = thresholds if thresholds is not None else tuple(sorted(int8.threshold.unique()))
    rows = []
    for r in scans.itertuples():
        res = r.result
        base = ppl[(ppl.model == r.model) & (ppl.method == "fp32")].ppl
        row = {"model": r.model, "params (M)": res["n_params"] / 1e6,
               "criterion": res["absolute"]["criterion"], "outlier dims": res["absolute"]["outlier_dims"],
               "% layers": res["absolute"]["pct_layers"], "% positions": res["absolute"]["pct_positions"],
               "relative criterion": res["relative"]["criterion"],
               "dims (relative)": res["relative"]["outlier_dims"],
               "fp32 ppl": base.iloc[-1] if len(base) else float("nan")}
        for t in thresholds:
            q = int8[(int8.model == r.model) & (int8.threshold == t)]
            row[f"llm.int8 ppl (t={t:g})"] = q.ppl.iloc[-1] if len(q) else float("nan")
            row[f"llm.int8 vs fp32 (t={t:g})"] = fmt_delta(q.delta_ppl_pct.iloc[-1], q.delta_ppl_pct_ci95.iloc[-1]) \
                if len(q) else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values("params (M)") if rows else pd.DataFrame(rows)


def emergence(table: pd.DataFrame) -> Figure:
    """Outlier dims against parameters and against fp32 perplexity (paper Fig. 3a/3b)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    absolute = table["criterion"].iloc[0] if "criterion" in table else "absolute"
    relative = table["relative criterion"].iloc[0] if "relative criterion" in table else "relative"
    for ax, x, scale in ((ax1, "params (M)", "log"), (ax2, "fp32 ppl", "linear")):
        for col, name in (("outlier dims", absolute), ("dims (relative)", relative)):
            sns.lineplot(table, x=x, y=col, marker="o", ax=ax, label=name)
        for _, r in table.iterrows():
            ax.annotate(r["model"], (r[x], r["outlier dims"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale=scale, ylabel="outlier feature dims", title=f"emergence vs {x}")
        ax.set_yscale("symlog", linthresh=1)  # absolute counts run from 1 to the whole hidden size
    ax2.invert_xaxis()  # lower perplexity (better models) to the right, as in the paper
    return fig


def _provenance_lines(df: pd.DataFrame) -> list[str]:
    lines = []
    for model, rows in df.groupby("model", sort=False):
        p = rows.provenance.iloc[-1] or {}
        sha = (p.get("weights_sha256") or "")[:12]
        lines.append(f"- `{model}`: {p.get('weights', 'weights of unknown provenance')}"
                     + (f" (SHA-256 {sha})" if sha else "") + (f", revision {p['revision']}" if p.get("revision") else ""))
    return lines


def write_report(folder: str | Path) -> Path:
    """Write tables (CSV + Markdown), figures and ``report.md`` into ``folder``; return the report path."""
    import outliers
    import torch
    import transformers
    from outliers.cache import atomic_write, save_csv, save_figure
    from outliers.eval.intervals import MIN_WINDOWS

    folder = Path(folder)
    cfg, planned, frame = _load(folder)
    df, counts = _current(planned, frame)
    failed = frame[frame.status == "failed"]

    def save_table(table: pd.DataFrame, stem: str, floatfmt: str) -> str:
        save_csv(table, folder / f"{stem}.csv")
        atomic_write(folder / f"{stem}.md", markdown(table, floatfmt) + "\n")
        return markdown(table, floatfmt)

    parts = [f"# Study: {cfg.name}", "", cfg.description, "",
             f"{counts['done'] + counts['older']} cells current, {counts['failed']} failed, "
             f"{counts['stale']} stale, {counts['pending']} pending.", ""]
    if counts["stale"]:
        parts += [f"{counts['stale']} cell(s) were computed from other inputs (corpus text, weights or settings "
                  "changed) and are left out; `studies run` recomputes them.", ""]
    if counts["older"]:
        parts += [f"{counts['older']} current cell(s) were computed by another commit of the code "
                  "(`studies status -v` lists them; `studies run --recompute-older` redoes them).", ""]
    if len(df):
        # the hash each row recorded when it ran (the plan has checked it is still the corpus' hash)
        hashes = {r.corpus: (r.provenance or {}).get("corpus_sha256") or "unknown" for r in df.itertuples()}
        corpora = ", ".join(f"`{c}` (SHA-256 {sha[:12]})" for c, sha in hashes.items())
        parts += ["Weights (every number below was measured on these):", "", *_provenance_lines(df), "",
                  f"Corpora: {corpora}.", ""]

    ppl = _ppl_rows(df)
    if "perplexity" not in cfg.measure:
        parts += ["No perplexity was measured (`measure` lacks \"perplexity\"): no Table-1 layout.", ""]
    elif not len(ppl):
        parts += ["No perplexity cell is done yet: no Table-1 layout.", ""]
    else:
        n_windows = int(ppl.n_windows.dropna().max())
        thresholds = cfg.report_thresholds or cfg.thresholds
        parts += ["## Perplexity (Table-1 layout)", "",
                  f"{cfg.protocol} windows of {cfg.window} (bos {cfg.bos}), {n_windows} windows. Beside each "
                  "perplexity: its change against fp32 on the same windows, with a paired 95 % bootstrap "
                  "interval over windows."
                  + (f" Fewer than {MIN_WINDOWS} windows: the intervals are rough." if n_windows < MIN_WINDOWS
                     else "") + " Adjacent windows of one document are correlated: the intervals speak for "
                  "this corpus slice.", ""]
        has_decomp = any(METHODS[m].decomposition for m in cfg.methods)
        for t in thresholds if has_decomp else thresholds[:1]:
            table = perplexity_table(df, t)
            heading = f"### Decomposition threshold {t:g}" if has_decomp else "### Methods"
            if has_decomp and not ((ppl.threshold == t) & (ppl.method != "fp32")).any():
                parts += [heading, "", f"No decomposition cell at threshold {t:g} is done.", ""]
                continue
            stem = f"table1_t{t:g}" if has_decomp else "table1"
            parts += [heading, "", save_table(table, stem, ".3f"), ""]
        flat = ppl[["model", "corpus", "method", "threshold", "ppl", "delta_ppl_pct", "kl_vs_ref",
                    "top1_agreement", "n_tokens", "tokens_per_s"]]
        save_csv(flat, folder / "perplexity.csv")
        quantized = ppl[ppl.method != "fp32"]
        if len(quantized):
            parts += ["## Agreement with the float model", "",
                      "Mean KL(P_fp32 || P_method) in nats per scored token and the share of scored positions whose "
                      "top-1 token is the same, with 95 % bootstrap intervals over windows.", "",
                      save_table(agreement_table(quantized), "agreement", ".4f"), ""]
        if len(quantized) and quantized.threshold.nunique() > 1:
            save_figure(threshold_curves(df), folder / "threshold_curves.png")
            parts += ["## Perplexity vs threshold", "", "![threshold curves](threshold_curves.png)", ""]

    if "outliers" not in cfg.measure:
        parts += ["No outlier scan was measured (`measure` lacks \"outliers\"): no Table-4 layout.", ""]
    elif (df.kind == "outliers").any():
        t4 = outlier_table(df, cfg.report_thresholds or cfg.thresholds)
        first = t4.iloc[0]
        parts += [f"## Outlier features (Table-4 layout; {first['criterion']} and {first['relative criterion']}, "
                  "hidden space, in >= 25 % of layers and >= 6 % of positions)", "",
                  save_table(t4, "table4", ".1f"), ""]
        if len(t4) > 1:
            save_figure(emergence(t4), folder / "emergence.png")
            parts += ["![emergence](emergence.png)", ""]
    else:
        parts += ["No outlier scan is done yet: no Table-4 layout.", ""]

    if len(failed):
        parts += ["## Failed cells", ""] + [f"- {r.model} {r.method} t={r.threshold}: {str(r.error).splitlines()[0]}"
                                             for r in failed.itertuples()] + [""]
    commits = sorted({(c or "unknown")[:10] + ("+dirty" if d else "") for c, d in zip(df.commit_sha, df.dirty)})
    parts += ["## Settings", "", "```json", json.dumps(as_tables(cfg), indent=1), "```", "",
              f"Computed by outliers {outliers.__version__} (commit {', '.join(commits) or 'unknown'}); "
              f"report by torch {torch.__version__}, transformers {transformers.__version__}, "
              f"Python {platform.python_version()}, {platform.machine()}.", ""]
    return atomic_write(folder / "report.md", "\n".join(parts))
