"""Turn a study's store into tables (CSV, Markdown), figures (PNG) and ``report.md``."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .store import Store

__all__ = ["status", "perplexity_table", "threshold_curves", "write_report", "markdown"]

METHOD_LABELS = {"fp32": "32-bit float", "absmax": "int8 absmax", "zeropoint": "int8 zeropoint",
                 "absmax-row": "absmax row-wise", "absmax-vector": "absmax vector-wise",
                 "zeropoint-vector": "zeropoint vector-wise",
                 "absmax-row+decomp": "absmax row-wise + decomposition",
                 "llm.int8": "absmax LLM.int8() (vector-wise + decomposition)",
                 "zeropoint-llm.int8": "zeropoint LLM.int8()"}


def markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    def cell(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def status(folder: str | Path) -> pd.DataFrame:
    """Cells done / failed / pending per kind, against the study's grid."""
    from .config import StudyConfig
    from .runner import cell_key, cells

    folder = Path(folder)
    cfg_data = json.loads((folder / "study.json").read_text())
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_data.items()})
    store = Store(folder)
    df = store.frame()
    store.close()
    state = dict(zip(df.key, df.status))
    rows = [{"kind": c["kind"], "model": c["model"], "method": c["method"], "threshold": c["threshold"],
             "status": state.get(cell_key(c, cfg), "pending")} for c in cells(cfg)]
    return pd.DataFrame(rows)


def perplexity_table(df: pd.DataFrame, threshold: float = 6.0) -> pd.DataFrame:
    """The paper's Table-1 layout: one row per method (fp32 first), one column per model."""
    ppl = df[(df.kind == "perplexity") & (df.status == "done")]
    from outliers.nn import METHODS

    # decomposition methods at the table's threshold; the others have one cell each (threshold 0)
    decomposes = ppl.method.map(lambda m: m != "fp32" and METHODS[m].decomposition)
    ppl = ppl[(ppl.method == "fp32") | (decomposes & (ppl.threshold == threshold)) | (~decomposes & (ppl.threshold == 0.0))]
    table = ppl.pivot_table(index="method", columns="model", values="ppl", aggfunc="last")
    order = [m for m in METHOD_LABELS if m in table.index]
    table = table.loc[order]
    table.index = [METHOD_LABELS[m] for m in table.index]
    return table.reset_index(names="method")


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


def outlier_table(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table-4 layout per model, both criteria, with fp32 and llm.int8 perplexity beside it."""
    scans = df[(df.kind == "outliers") & (df.status == "done")]
    ppl = df[(df.kind == "perplexity") & (df.status == "done")]
    rows = []
    for r in scans.itertuples():
        res = r.result
        base = ppl[(ppl.model == r.model) & (ppl.method == "fp32")].ppl
        int8 = ppl[(ppl.model == r.model) & (ppl.method == "llm.int8") & (ppl.threshold == 6.0)].ppl
        rows.append({"model": r.model, "params (M)": res["n_params"] / 1e6,
                     "outlier dims": res["absolute"]["outlier_dims"],
                     "% layers": res["absolute"]["pct_layers"], "% positions": res["absolute"]["pct_positions"],
                     "dims (relative)": res["relative"]["outlier_dims"],
                     "fp32 ppl": base.iloc[-1] if len(base) else float("nan"),
                     "llm.int8 ppl": int8.iloc[-1] if len(int8) else float("nan")})
    return pd.DataFrame(rows).sort_values("params (M)") if rows else pd.DataFrame(rows)


def emergence(table: pd.DataFrame) -> Figure:
    """Outlier dims against parameters and against fp32 perplexity (paper Fig. 3a/3b)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for ax, x, scale in ((ax1, "params (M)", "log"), (ax2, "fp32 ppl", "linear")):
        for col, label in (("outlier dims", "|x| >= 6"), ("dims (relative)", "|x| >= 6 rms")):
            sns.lineplot(table, x=x, y=col, marker="o", ax=ax, label=label)
        for _, r in table.iterrows():
            ax.annotate(r["model"], (r[x], r["outlier dims"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale=scale, ylabel="outlier feature dims", title=f"emergence vs {x}")
        ax.set_yscale("symlog", linthresh=1)  # absolute counts run from 1 to the whole hidden size
    ax2.invert_xaxis()  # lower perplexity (better models) to the right, as in the paper
    return fig


def write_report(folder: str | Path) -> Path:
    """Write tables (CSV + Markdown), figures and ``report.md`` into ``folder``; return the report path."""
    import outliers
    import torch
    import transformers

    folder = Path(folder)
    store = Store(folder)
    df = store.frame()
    store.close()
    cfg = json.loads((folder / "study.json").read_text())
    parts = [f"# Study: {cfg['name']}", "", cfg.get("description", ""), ""]
    done = df[df.status == "done"]
    failed = df[df.status == "failed"]
    parts += [f"{len(done)} cells done, {len(failed)} failed.", ""]
    if (done.kind == "perplexity").any():
        table = perplexity_table(df)
        table.to_csv(folder / "table1.csv", index=False)
        (folder / "table1.md").write_text(markdown(table) + "\n")
        parts += ["## Perplexity (Table-1 layout, threshold 6 for decomposition methods)", "", markdown(table), ""]
        flat = done[done.kind == "perplexity"][["model", "corpus", "method", "threshold", "ppl", "n_tokens",
                                                 "tokens_per_s"]]
        flat.to_csv(folder / "perplexity.csv", index=False)
        if (done.method != "fp32").any() and done.threshold.nunique() > 2:
            threshold_curves(df).savefig(folder / "threshold_curves.png", dpi=120)
            parts += ["## Perplexity vs threshold", "", "![threshold curves](threshold_curves.png)", "",
                      markdown(flat.sort_values(["model", "method", "threshold"])), ""]
    if (done.kind == "outliers").any():
        t4 = outlier_table(df)
        t4.to_csv(folder / "table4.csv", index=False)
        (folder / "table4.md").write_text(markdown(t4, ".1f") + "\n")
        parts += ["## Outlier features (Table-4 layout; paper criteria on the hidden space)", "",
                  markdown(t4, ".1f"), ""]
        if len(t4) > 1:
            emergence(t4).savefig(folder / "emergence.png", dpi=120)
            parts += ["![emergence](emergence.png)", ""]
    if len(failed):
        parts += ["## Failed cells", ""] + [f"- {r.model} {r.method} t={r.threshold}: {str(r.error).splitlines()[0]}"
                                             for r in failed.itertuples()] + [""]
    settings = {k: v for k, v in cfg.items() if k not in ("name", "description")}
    parts += ["## Settings", "", "```json", json.dumps(settings, indent=1), "```", "",
              f"outliers {outliers.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"Python {platform.python_version()}, {platform.machine()}.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path
