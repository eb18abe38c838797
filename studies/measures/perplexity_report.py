"""The perplexity measure's report: the paper's Table-1 layout, agreement, threshold curves, and the section
on smoothing and rotation before quantizing for studies with ``alphas`` or ``rotations``.

Transformed rows name their transform in the method (``llm.int8@smooth=0.5``;
``outliers.quant.transforms.row_name``): per decomposition threshold and transform, the perplexity change
against fp32 and the share of input columns LLM.int8() sent through float (``outliers.quant.decomposed``),
as tables and curves. The measure itself (cells, fingerprints, computing a cell) is
``studies.measures.perplexity``; this module imports nothing from it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from outliers.quant.methods import METHODS, label
from outliers.quant.transform_spec import Transform, parse_row, row_name

from ..format import fmt_delta
from . import Image, Table

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from studies.config import StudyConfig

__all__ = [
    "transforms",
    "ppl_rows",
    "row_label",
    "perplexity_table",
    "agreement_table",
    "threshold_curves",
    "report",
    "transform_tables",
    "transform_curves",
    "transform_section",
    "transform_label",
    "seed_table",
]


def transforms(cfg: StudyConfig) -> list[Transform]:
    """The transforms the grid crosses methods with: none, smoothing at each alpha, each rotation with each
    of ``seeds`` (None: seed 0 alone)."""
    return [
        Transform(),
        *(Transform(smooth=a) for a in cfg.alphas or ()),
        *(Transform(rotate=r, seed=s) for r in cfg.rotations or () for s in cfg.seeds or (0,)),
    ]


def transform_label(t: Transform) -> str:
    """A transform's label with its rotation's seed where that is not 0 (``"hadamard seed 3"``)."""
    return t.label + (f" seed {t.seed}" if t.rotate and t.seed else "")


def ppl_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The done perplexity rows, with the result's interval and agreement fields as columns; ``kld_p99`` and
    ``delta_p_rms`` are None for cells stored before they were computed."""
    ppl = df[(df.kind == "perplexity") & (df.status == "done")].copy()
    for col in ("ppl_ci95", "delta_ppl_pct", "delta_ppl_pct_ci95", "kl_vs_ref", "top1_agreement", "n_windows"):
        ppl[col] = ppl.result.map(lambda r, c=col: r.get(c))
    ppl["kld_p99"] = ppl.result.map(lambda r: (r.get("kld_percentiles") or {}).get("99"))
    ppl["delta_p_rms"] = ppl.result.map(lambda r: r.get("delta_p_rms"))
    return ppl


def _untransformed(ppl: pd.DataFrame, listed: tuple[str, ...] = ()) -> pd.DataFrame:
    """The Table-1 layout's rows: those without a transform (a plain method name, ``row_name``) and those the
    study's ``methods`` name with theirs (``"absmax-vector@smooth=0.5"``)."""
    canonical = {row_name(*parse_row(m), seed=True) for m in listed}  # "smooth=0.50" names the row "smooth=0.5"
    return ppl[~ppl.method.str.contains("@", regex=False) | ppl.method.isin(canonical)]


def _base(name: str) -> str:
    return parse_row(name)[0]


def row_label(name: str) -> str:
    """A row's report label: its method's, and the transform before it (``"... after smooth 0.5"``)."""
    method, transform = parse_row(name)
    return label(method) + (f" after {transform_label(transform)}" if transform else "")


def perplexity_table(df: pd.DataFrame, threshold: float, listed: tuple[str, ...] = ()) -> pd.DataFrame:
    """The paper's Table-1 layout at one decomposition threshold: one row per method, per model its
    perplexity and the paired change against fp32 with its 95 % interval.

    Methods without decomposition have one cell each (their threshold is moot) and appear in every
    threshold's table. ``listed``: transformed rows the study names in ``methods``, shown after the rest.
    """
    import pandas as pd

    ppl = _untransformed(ppl_rows(df), listed)
    decomposes = ppl.method.map(lambda m: m != "fp32" and METHODS[_base(m)].decomposition)
    ppl = ppl[
        (ppl.method == "fp32") | (decomposes & (ppl.threshold == threshold)) | (~decomposes & (ppl.method != "fp32"))
    ]
    order = ["fp32", *METHODS]
    rows = []
    for method in sorted(ppl.method.unique(), key=lambda m: ("@" in m, order.index(_base(m)), m)):
        row = {"method": row_label(method)}
        for model, r in ppl[ppl.method == method].groupby("model", sort=False):
            r = r.iloc[-1]
            row[model] = r.ppl
            row[f"{model} vs fp32"] = fmt_delta(r.delta_ppl_pct, r.delta_ppl_pct_ci95)
        rows.append(row)
    return pd.DataFrame(rows)


def agreement_table(ppl: pd.DataFrame) -> pd.DataFrame:
    """KL against the float model, KLD's 99th percentile, top-1 agreement and the RMS change in the next token's
    probability (Δp, in %) per quantized cell, each with its interval (blank for a cell stored before it)."""
    import pandas as pd

    def interval(v, ci, scale, fmt):
        if v is None:
            return ""
        return f"{v * scale:{fmt}}" + (f" [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]" if ci else "")

    rows = [
        {
            "model": r.model,
            "method": row_label(r.method),
            "threshold": f"{r.threshold:g}",
            "KL nats/token": interval(r.result.get("kl_vs_ref"), r.result.get("kl_vs_ref_ci95"), 1, ".4f"),
            "KLD p99": interval(
                (r.result.get("kld_percentiles") or {}).get("99"),
                (r.result.get("kld_percentiles_ci95") or {}).get("99"),
                1,
                ".4f",
            ),
            "top-1 agreement %": interval(
                r.result.get("top1_agreement"), r.result.get("top1_agreement_ci95"), 100, ".2f"
            ),
            "Δp RMS %": interval(r.result.get("delta_p_rms"), r.result.get("delta_p_rms_ci95"), 100, ".3f"),
        }
        for r in ppl.itertuples()
    ]
    return pd.DataFrame(rows)


def threshold_curves(df: pd.DataFrame) -> Figure:
    """Perplexity against the decomposition threshold per method and model, the fp32 line dashed."""
    import seaborn as sns
    from matplotlib.figure import Figure

    ppl = _untransformed(df[(df.kind == "perplexity") & (df.status == "done")])  # transform_curves has the rest
    curves = ppl[ppl.method != "fp32"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(curves, x="threshold", y="ppl", hue="method", style="model", marker="o", ax=ax)
    for model, base in ppl[ppl.method == "fp32"].groupby("model"):
        ax.axhline(base.ppl.iloc[-1], ls="--", c="k", lw=1, label=f"fp32 {model}")
    ax.set(xlabel="decomposition threshold", ylabel="perplexity", title="Perplexity vs threshold")
    ax.legend(fontsize=8)
    return fig


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """Table-1 blocks (one per reported threshold), the flat perplexity.csv, agreement and threshold curves."""
    from outliers.eval.intervals import MIN_WINDOWS

    ppl = ppl_rows(df)
    if not len(ppl):
        return ["No perplexity cell is done yet: no Table-1 layout.", ""]
    n_windows = int(ppl.n_windows.dropna().max())
    thresholds = cfg.report_thresholds or cfg.thresholds
    parts: list = [
        "## Perplexity (Table-1 layout)",
        "",
        f"{cfg.protocol} windows of {cfg.window} (bos {cfg.bos}), {n_windows} windows. Beside each "
        "perplexity: its change against fp32 on the same windows, with a paired 95 % bootstrap "
        "interval over windows."
        + (f" Fewer than {MIN_WINDOWS} windows: the intervals are rough." if n_windows < MIN_WINDOWS else "")
        + " Adjacent windows of one document are correlated: the intervals speak for "
        "this corpus slice.",
        "",
    ]
    has_decomp = any(METHODS[_base(m)].decomposition for m in cfg.methods)
    plain = _untransformed(ppl, cfg.methods)
    for t in thresholds if has_decomp else thresholds[:1]:
        heading = f"### Decomposition threshold {t:g}" if has_decomp else "### Methods"
        if has_decomp and not ((plain.threshold == t) & (plain.method != "fp32")).any():
            parts += [heading, "", f"No decomposition cell at threshold {t:g} is done.", ""]
            continue
        stem = f"table1_t{t:g}" if has_decomp else "table1"
        parts += [heading, "", Table(perplexity_table(df, t, cfg.methods), stem, ".3f"), ""]
    flat = ppl[
        [
            "model",
            "corpus",
            "method",
            "threshold",
            "ppl",
            "delta_ppl_pct",
            "kl_vs_ref",
            "kld_p99",
            "top1_agreement",
            "delta_p_rms",
            "n_tokens",
            "tokens_per_s",
        ]
    ]
    parts.append(Table(flat, "perplexity", csv_only=True))
    quantized = ppl[ppl.method != "fp32"]
    if len(quantized):
        parts += [
            "## Agreement with the float model",
            "",
            "Mean KL(P_fp32 || P_method) in nats per scored token, its 99th percentile over scored tokens "
            "(KLD p99), the share of scored positions whose top-1 token is the same, and the RMS change in "
            "the probability of the next token (Δp RMS, in percentage points), as llama.cpp's `perplexity "
            "--kl-divergence` reports them, with 95 % bootstrap intervals over windows. Blank: a cell computed "
            "before KLD p99 and Δp were recorded.",
            "",
            Table(agreement_table(quantized), "agreement", ".4f"),
            "",
        ]
    if len(quantized) and quantized.threshold.nunique() > 1:
        parts += [
            "## Perplexity vs threshold",
            "",
            Image(threshold_curves(df), "threshold_curves.png", "threshold curves"),
            "",
        ]
    if cfg.alphas or cfg.rotations:
        parts += transform_section(ppl, cfg)
    return parts


# ---------------------------------------------------------------- smoothing and rotation


def _by_transform(ppl: pd.DataFrame) -> pd.DataFrame:
    """The quantized rows with their method (``base``), ``transform_label`` (``""``: none) and report ``line``."""
    rows = ppl[ppl.method != "fp32"]
    parsed = rows.method.map(parse_row)
    return rows.assign(
        base=parsed.map(lambda p: p[0]),
        transform_label=parsed.map(lambda p: transform_label(p[1])),
        line=rows.method.map(row_label),
        float_columns_pct=rows.result.map(lambda r: r.get("float_columns_pct", math.nan)),
    )


def transform_tables(ppl: pd.DataFrame, cfg: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (model, method, threshold) a row, per transform a column: the perplexity change against fp32 with
    its paired interval, and (decomposing methods only) the % of input columns that went through float."""
    import pandas as pd

    rows = _by_transform(ppl)
    heads = {transform_label(t): f"after {transform_label(t)}" if t else "no transform" for t in transforms(cfg)}
    several = len(cfg.corpora) > 1
    delta, share = [], []
    for (model, corpus), at in rows.groupby(["model", "corpus"], sort=False):
        for method in (m for m in cfg.methods if "@" not in m):  # named rows with a transform are in Table 1
            decomposes = METHODS[method].decomposition
            for t in cfg.thresholds if decomposes else (0.0,):
                key = {"model": model, **({"corpus": corpus} if several else {})}
                key |= {"method": label(method), "threshold": f"{t:g}"}
                d, f = dict(key), dict(key)
                for name, head in heads.items():
                    r = at[(at.base == method) & (at.threshold == t) & (at.transform_label == name)]
                    d[head] = fmt_delta(r.delta_ppl_pct.iloc[-1], r.delta_ppl_pct_ci95.iloc[-1]) if len(r) else ""
                    f[head] = r.float_columns_pct.iloc[-1] if len(r) else math.nan
                delta.append(d)
                share += [f] if decomposes else []
    return pd.DataFrame(delta), pd.DataFrame(share)


def transform_curves(ppl: pd.DataFrame) -> Figure:
    """The perplexity change against fp32 (95 % bands) and the % of columns through float against the
    decomposition threshold: one line per method and transform (and model, corpus where there are several)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    rows = _by_transform(ppl)
    rows = rows[rows.base.map(lambda m: METHODS[m].decomposition)].sort_values("threshold")
    if rows.model.nunique() > 1 or rows.corpus.nunique() > 1:
        rows = rows.assign(line=rows.line + " · " + rows.model + " · " + rows.corpus)
    lines = list(dict.fromkeys(rows.line))
    colours = dict(zip(lines, sns.color_palette(n_colors=len(lines)), strict=True))
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_d, ax_f = fig.subplots(1, 2)
    common = {"x": "threshold", "hue": "line", "hue_order": lines, "palette": colours, "marker": "o"}
    sns.lineplot(rows, y="delta_ppl_pct", ax=ax_d, estimator=None, **common)
    sns.lineplot(rows, y="float_columns_pct", ax=ax_f, estimator=None, legend=False, **common)
    for line, g in rows.groupby("line", sort=False):
        ci = [c if c else (math.nan, math.nan) for c in g.delta_ppl_pct_ci95]
        lo, hi = [c[0] for c in ci], [c[1] for c in ci]
        ax_d.fill_between(g.threshold, lo, hi, color=colours[line], alpha=0.15, lw=0)
    ax_d.axhline(0, ls="--", c="k", lw=1)
    ax_d.set(xlabel="decomposition threshold", ylabel="perplexity vs fp32 (%)", title="Perplexity change vs fp32")
    ax_f.set(xlabel="decomposition threshold", ylabel="input columns through float (%)", title="Columns through float")
    ax_d.legend(fontsize=8)
    return fig


def transform_section(ppl: pd.DataFrame, cfg: StudyConfig) -> list:
    """The report's section on smoothing and rotation before quantizing (studies with alphas or rotations)."""
    delta, share = transform_tables(ppl, cfg)
    default = Transform()
    applied = (
        [
            f"SmoothQuant smoothing at strength alpha, its per-channel maxima from the last {default.calib_windows} "
            f"windows of {cfg.window} tokens of each corpus (never tokens evaluation reads)"
        ]
        if cfg.alphas
        else []
    )
    seeds = ", ".join(str(s) for s in cfg.seeds or (default.seed,))
    applied += [f"a randomized Hadamard rotation (seed{'s' if cfg.seeds else ''} {seeds})"] if cfg.rotations else []
    parts: list = [
        "## Smoothing and rotation vs decomposition",
        "",
        "Each transform is applied to the float model before quantizing and leaves its function unchanged "
        f"(to float rounding): {'; '.join(applied)}. Every row is scored against the untransformed fp32 model "
        "on the same windows.",
        "",
        "### Perplexity change vs fp32",
        "",
        "Per decomposition threshold (threshold 0: no decomposition) and transform, the change in perplexity "
        "against fp32 with its paired 95 % bootstrap interval over windows.",
        "",
        Table(delta, "transforms_delta"),
        "",
    ]
    if len(share):
        parts += [
            "### Input columns through float",
            "",
            "The share (%) of a decomposing layer's input columns that hold any |x| >= threshold, which "
            "LLM.int8() sends through the float matmul: the mean over every (quantized layer, forward call) of "
            f"that call's share, each call weighted alike. A call is one batch of up to {cfg.batch_size} windows, "
            "so the share grows with the batch. Blank: a cell computed before the share was recorded "
            "(`studies run --recompute-older` redoes it).",
            "",
            Table(share, "transforms_float_columns", ".2f"),
            "",
        ]
    if cfg.seeds and len(cfg.seeds) > 1 and len(spread := seed_table(ppl)):
        parts += [
            "### Spread over rotation seeds",
            "",
            f"Per method and rotation, over its {len(cfg.seeds)} random-sign seeds: the mean KL divergence "
            "from the fp32 model (nats per token) and the perplexity change (%), with the standard deviation, "
            "minimum and maximum across seeds and a 95 % t interval for the mean over seeds.",
            "",
            Table(spread, "transforms_seeds", ".4f"),
            "",
        ]
    rows = _by_transform(ppl)
    if rows[rows.base.map(lambda m: METHODS[m].decomposition)].threshold.nunique() > 1:
        parts += [Image(transform_curves(ppl), "transform_curves.png", "transform curves"), ""]
    return parts


def seed_table(ppl: pd.DataFrame) -> pd.DataFrame:
    """Per (model, corpus, method, threshold, rotation) with more than one seed: KL vs fp32 and the perplexity
    change over the seeds (n, mean, sd, min, max, and the mean's 95 % t interval)."""
    import pandas as pd
    from scipy import stats

    rows = _by_transform(ppl)
    parsed = rows.method.map(parse_row)
    rows = rows.assign(
        rotate=parsed.map(lambda p: p[1].rotate),
        smooth=parsed.map(lambda p: p[1].smooth),
        seed=parsed.map(lambda p: p[1].seed),
    )
    rows = rows[rows.rotate.notna() & rows.smooth.isna()]
    out = []
    for (model, corpus, base, threshold, rotate), g in rows.groupby(
        ["model", "corpus", "base", "threshold", "rotate"], sort=False
    ):
        if g.seed.nunique() < 2:
            continue
        row = {"model": model, "corpus": corpus, "method": label(base), "threshold": f"{threshold:g}"}
        row |= {"rotation": rotate, "seeds": g.seed.nunique()}
        for col, name in (("kl_vs_ref", "KL"), ("delta_ppl_pct", "Δppl %")):
            v = g[col].astype(float)
            half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
            row |= {f"{name} mean": v.mean(), f"{name} sd": v.std(ddof=1), f"{name} min": v.min()}
            row |= {f"{name} max": v.max(), f"{name} mean 95% t": f"[{v.mean() - half:.4g}, {v.mean() + half:.4g}]"}
        out.append(row)
    return pd.DataFrame(out)
