"""The report's section on smoothing and rotation before quantizing, for studies with ``alphas`` or ``rotations``.

Rows of the perplexity measure whose method names a transform (``llm.int8@smooth=0.5``;
``outliers.quant.transforms.row_name``): per decomposition threshold and transform, the perplexity
change against fp32 and the share of input columns LLM.int8() sent through float
(``outliers.quant.decomposed``), as tables and curves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from outliers.quant.methods import METHODS, label
from outliers.quant.transforms import Transform, parse_row

from .format import fmt_delta
from .measures import Image, Table

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from studies.config import StudyConfig

__all__ = ["transform_tables", "transform_curves", "transform_section"]


def _by_transform(ppl: pd.DataFrame) -> pd.DataFrame:
    """The quantized rows with their method (``base``), ``transform_label`` (``""``: none) and report ``line``."""
    rows = ppl[ppl.method != "fp32"]
    parsed = rows.method.map(parse_row)
    return rows.assign(
        base=parsed.map(lambda p: p[0]),
        transform_label=parsed.map(lambda p: p[1].label),
        line=rows.method.map(_row_label),
        float_columns_pct=rows.result.map(lambda r: r.get("float_columns_pct", math.nan)),
    )


def transform_tables(ppl: pd.DataFrame, cfg: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (model, method, threshold) a row, per transform a column: the perplexity change against fp32 with
    its paired interval, and (decomposing methods only) the % of input columns that went through float."""
    import pandas as pd

    rows = _by_transform(ppl)
    heads = {t.label: f"after {t.label}" if t else "no transform" for t in _transforms(cfg)}
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
    applied += [f"a randomized Hadamard rotation (seed {default.seed})"] if cfg.rotations else []
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
    rows = _by_transform(ppl)
    if rows[rows.base.map(lambda m: METHODS[m].decomposition)].threshold.nunique() > 1:
        parts += [Image(transform_curves(ppl), "transform_curves.png", "transform curves"), ""]
    return parts


def _row_label(name: str) -> str:
    from .measures.perplexity import row_label

    return row_label(name)


def _transforms(cfg: StudyConfig) -> list[Transform]:
    from .measures.perplexity import transforms

    return transforms(cfg)
