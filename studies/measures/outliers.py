"""The outlier-feature scan: how many hidden dimensions hold large activations, per model.

The paper's Table 4 and Fig. 3 (Dettmers et al. 2022, "LLM.int8()", arXiv
2208.07339): one scan per (model, corpus) of ``outlier_tokens`` tokens at the
attention and FFN inputs (``outliers.analysis.scan``), counted under both the
paper's absolute criterion (``|x| >= outlier_threshold``) and a relative one
(``outliers.analysis.criteria``), and reported beside the model's fp32 and
llm.int8 perplexity where the study measured those. The same scan takes the
block outputs too, for Bondarenko et al. 2023's quantizability numbers (max
∞-norm and mean kurtosis of the block outputs; ``outliers.analysis.moments``)
and the token kurtosis of the attention and FFN inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..format import fmt_delta
from . import Context, Image, Measure, Setting, Table, register_measure
from .perplexity_report import ppl_rows
from .phenomena import phenomena_figure, phenomena_table

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from studies.config import StudyConfig

__all__ = ["OUTLIERS", "outlier_table", "moments_table", "emergence"]

POINTS = "attn,ffn,residual"  # the residual stream is a space of its own: the hidden-space counts do not change
SETTINGS = (
    Setting("outlier_tokens", (int,), 4096),  # tokens scanned per (model, corpus)
    Setting("outlier_threshold", (int, float), 6.0),
)


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    return [{"method": "fp32", "threshold": cfg.outlier_threshold}]


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {
        "outlier_tokens": cfg.outlier_tokens,
        "batch_size": cfg.batch_size,
        "points": POINTS,
        "moments": True,
    }


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.criteria import Criteria, massive_activations, outlier_features, summary
    from outliers.analysis.moments import quantizability
    from outliers.analysis.scan import scan

    cfg = ctx.cfg
    st = scan(
        ctx.model,
        ctx.ids,
        points=POINTS,
        threshold=cell["threshold"],
        max_tokens=cfg.outlier_tokens,
        window=cfg.window,
        batch_size=cfg.batch_size,
        progress=False,
        meta={"model": cell["model"]},
        bos_token_id=ctx.bos_token_id,
    )
    rows = {scale: summary(st, Criteria(scale=scale)) for scale in ("absolute", "relative")}
    criteria = Criteria()
    largest = {}  # the largest-magnitude outlier feature's shares, as the paper's Fig. 3 draws them
    for scale in rows:
        found = outlier_features(st, Criteria(scale=scale))  # largest |x| first
        largest[scale] = (
            {k: float(found[k].iloc[0]) for k in ("dim", "max_abs", "pct_layers", "pct_positions")}
            if len(found)
            else None
        )
    return {
        "n_params": ctx.info.n_params,
        "model_type": ctx.info.architecture,  # the family an emergence curve is fitted over
        "model_class": ctx.info.model_class,
        "largest": largest,
        "n_tokens": st.meta["tokens_scanned"],
        "threshold": cell["threshold"],
        "relative_k": st.relative_k,
        "layers": criteria.layers,
        "positions": criteria.positions,
        "absolute": rows["absolute"],
        "relative": rows["relative"],
        "moments": quantizability(st),
        "massive_activations": len(massive_activations(st)),
    }


def outlier_table(df: pd.DataFrame, thresholds: tuple[float, ...] | None = None) -> pd.DataFrame:
    """The paper's Table-4 layout per model (both criteria, as scanned), with fp32 and llm.int8 perplexity.

    ``thresholds``: the llm.int8 decomposition thresholds to show a perplexity column for
    (default: every one the study has).
    """
    import pandas as pd

    scans = df[(df.kind == "outliers") & (df.status == "done")]
    ppl = ppl_rows(df)
    int8 = ppl[ppl.method == "llm.int8"]
    thresholds = thresholds if thresholds is not None else tuple(sorted(int8.threshold.unique()))
    rows = []
    for r in scans.itertuples():
        res = r.result
        base = ppl[(ppl.model == r.model) & (ppl.method == "fp32")].ppl
        row = {
            "model": r.model,
            "family": res.get("model_type", ""),  # "" for a cell stored before it was recorded
            "params (M)": res["n_params"] / 1e6,
            "criterion": res["absolute"]["criterion"],
            "outlier dims": res["absolute"]["outlier_dims"],
            "% layers": res["absolute"]["pct_layers"],
            "% positions": res["absolute"]["pct_positions"],
            "relative criterion": res["relative"]["criterion"],
            "dims (relative)": res["relative"]["outlier_dims"],
            "fp32 ppl": base.iloc[-1] if len(base) else float("nan"),
        }
        for t in thresholds:
            q = int8[(int8.model == r.model) & (int8.threshold == t)]
            row[f"llm.int8 ppl (t={t:g})"] = q.ppl.iloc[-1] if len(q) else float("nan")
            row[f"llm.int8 vs fp32 (t={t:g})"] = (
                fmt_delta(q.delta_ppl_pct.iloc[-1], q.delta_ppl_pct_ci95.iloc[-1]) if len(q) else ""
            )
        rows.append(row)
    return pd.DataFrame(rows).sort_values("params (M)") if rows else pd.DataFrame(rows)


def moments_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model: Bondarenko et al.'s max ∞-norm and mean kurtosis of the block outputs, and token kurtosis."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "outliers") & (df.status == "done")].itertuples():
        m = r.result.get("moments")
        if not m:  # a cell stored before the scan took moments
            continue
        token = m["token_kurtosis"]
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": r.result["n_params"] / 1e6,
                "max ∞-norm": m["max_inf_norm"],
                "at block": m["max_inf_norm_layer"],
                "mean kurtosis": m["avg_kurtosis"],
                **{f"token kurtosis {k}": token.get(k, float("nan")) for k in ("attn_in", "attn_out", "ffn_in")},
                "massive activations": r.result.get("massive_activations"),
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def emergence(table: pd.DataFrame) -> Figure:
    """The paper's Fig. 3a/3b: shares of layers and positions against parameters and fp32 perplexity.

    ``table``: ``studies.measures.emergence.emergence_table`` of a study's results, or
    this module's ``outlier_table`` (its shares are means over the features).
    The paper's points join the parameter axis; a family with at least six
    models gets its logistic fit (``studies.measures.emergence``).
    """
    from .emergence import emergence_figure, fit_table, paper_points

    if "params" not in table:  # the Table-4 layout
        table = table.assign(params=table["params (M)"] * 1e6)
    if "family" not in table:
        table = table.assign(family="")
    paper = paper_points()
    return emergence_figure(table, paper, fit_table({"this study": table, "paper": paper}))


def _emergence_section(df: pd.DataFrame) -> list:
    from .emergence import MIN_MODELS, emergence_figure, emergence_table, fit_table, paper_points

    ours = emergence_table(df)
    if len(ours) < 2:
        return []
    paper = paper_points()
    fits = fit_table({"this study": ours, "paper": paper})
    parts: list = [
        "## Emergence (the paper's Fig. 3)",
        "",
        "Per model, the share of layers and of token positions touched by its largest outlier feature (|x| >= "
        "the threshold), against parameters and against this study's fp32 perplexity. The paper's Table-4 "
        "points (docs/paper_points.md; arXiv 2208.07339) join the parameter axis only: their perplexities are "
        "on C4, this study's on its own corpus.",
        "",
        Table(ours, "emergence", ".3g"),
        "",
    ]
    if len(fits):
        parts += [
            f"Logistic fits, share = top / (1 + exp(-slope (log10 params - midpoint))), per family with at least "
            f"{MIN_MODELS} models (midpoint in log10 parameters); the _se columns are standard errors from the "
            "fit's covariance:",
            "",
            Table(fits, "emergence_fits", ".3g"),
            "",
        ]
    else:
        parts += [f"No logistic fit: no family has {MIN_MODELS} models in one series; points, not a curve.", ""]
    return parts + [Image(emergence_figure(ours, paper, fits), "emergence.png", "emergence"), ""]


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The Table-4 layout and, with more than one model, the emergence figure."""
    if not (df.kind == "outliers").any():
        return ["No outlier scan is done yet: no Table-4 layout.", ""]
    t4 = outlier_table(df, cfg.report_thresholds or cfg.thresholds)
    first = t4.iloc[0]
    parts: list = [
        f"## Outlier features (Table-4 layout; {first['criterion']} and {first['relative criterion']}, "
        "hidden space, in >= 25 % of layers and >= 6 % of positions)",
        "",
        Table(t4, "table4", ".1f"),
        "",
    ]
    parts += _emergence_section(df)
    phen = phenomena_table(df)
    if len(phen) > 1 and ((df.kind == "sinks") | (df.kind == "superweights")).any():
        parts += [
            "## Beside the emergence: the phenomena found since 2022",
            "",
            "Per model: outlier feature dims, the block outputs' max ∞-norm and mean kurtosis (Bondarenko et al. "
            "2023), massive activations (Sun et al. 2024), the attention sink rate (Gu et al. 2024) and the super "
            "weights with the perplexity ratio when they are zeroed (Yu et al. 2024); sections below give each "
            "measure's detail.",
            "",
            Table(phen, "phenomena", ".3g"),
            "",
            Image(phenomena_figure(phen), "phenomena.png", "phenomena against parameters"),
            "",
        ]
    kurt = moments_table(df)
    if len(kurt):
        parts += [
            "## Kurtosis and ∞-norm (Bondarenko et al. 2023)",
            "",
            "Per block output, each sequence's largest |x| and the kurtosis of all its values (Pearson's: a normal "
            "distribution has 3), averaged over sequences; then the largest ∞-norm over blocks and the mean "
            "kurtosis over blocks. Token kurtosis: per token across dims, averaged over tokens and blocks, at the "
            "inputs the quantizer sees. Massive activations: (block, dim) pairs of the residual stream with "
            "|x| > 100 and > 1000x the median (Sun et al. 2024).",
            "",
            Table(kurt, "kurtosis", ".1f"),
            "",
        ]
    return parts


OUTLIERS = register_measure(
    Measure(
        name="outliers",
        compute=compute,
        settings=SETTINGS,
        cells=cells,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        absent='No outlier scan was measured (`measure` lacks "outliers"): no Table-4 layout.',
    )
)
