"""Emergence as the paper draws it: the share of layers and of positions that outlier features touch.

Dettmers et al. 2022, "LLM.int8()" (arXiv 2208.07339), Fig. 3: the % of
layers and of sequence dimensions affected by the largest outlier features,
against parameters (3a, log axis) and against C4 perplexity (3b). Here: the
study's models against parameters and against the study's own fp32
perplexity, the paper's published points (``docs/paper_points.csv``) on the
parameter axis only (their perplexities are on C4, ours on another corpus),
and a logistic curve in log10(parameters) only where a series holds at least
``MIN_MODELS`` models of one family (``model_type`` of the outlier cell), so
that four built-ins of four families stay points.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "MIN_MODELS",
    "SHARES",
    "PAPER_POINTS",
    "Fit",
    "logistic",
    "fit_logistic",
    "emergence_table",
    "paper_points",
    "fit_table",
    "emergence_figure",
]

MIN_MODELS = 6  # fewer models of one family than this get points, not a curve (3 parameters are fitted)
SHARES = ("% layers", "% positions")
PAPER_POINTS = Path(__file__).resolve().parents[2] / "docs" / "paper_points.csv"


def logistic(x: np.ndarray, top: float, midpoint: float, slope: float) -> np.ndarray:
    """Return ``top / (1 + exp(-slope (x - midpoint)))``; x is log10(parameters), the result a share in %."""
    return top / (1.0 + np.exp(-slope * (x - midpoint)))


@dataclass(frozen=True)
class Fit:
    """A logistic fit of a share (%) against log10(parameters), with the standard errors of its parameters."""

    n: int
    top: float  # the share the curve levels off at (%)
    midpoint: float  # log10(parameters) where the share is top / 2
    slope: float  # per decade of parameters
    top_se: float
    midpoint_se: float  # nan where the covariance cannot be estimated
    slope_se: float

    @property
    def midpoint_params(self) -> float:
        return 10.0**self.midpoint


def fit_logistic(params: np.ndarray, share: np.ndarray) -> Fit:
    """Return the least-squares logistic fit of ``share`` (%) against log10(``params``) (scipy's curve_fit).

    Standard errors are the square roots of the covariance's diagonal (curve_fit
    scales it by the residual variance); nan where it cannot be estimated.

    Raises:
        ValueError: fewer than 4 points (3 parameters need a residual), or no fit converged.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    x, y = np.log10(np.asarray(params, dtype=float)), np.asarray(share, dtype=float)
    if len(x) < 4:
        raise ValueError(f"a logistic fit needs at least 4 points, got {len(x)}")
    p0 = (max(float(y.max()), 1.0), float(np.median(x)), 3.0)
    bounds = ([0.0, float(x.min()) - 2, 0.0], [100.0, float(x.max()) + 2, 50.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # a covariance it cannot estimate comes back inf: nan
        try:
            popt, pcov = curve_fit(logistic, x, y, p0=p0, bounds=bounds, maxfev=20_000)
        except RuntimeError as e:
            raise ValueError(f"the logistic fit did not converge: {e}") from None
    se = [math.sqrt(v) if np.isfinite(v) and v >= 0 else math.nan for v in np.diag(pcov)]
    return Fit(len(x), *(float(v) for v in popt), *se)


def emergence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per done outlier cell: model, family, parameters, the shares of layers and positions, fp32 perplexity.

    The shares are those of the largest outlier feature (by |x|) under the
    paper's absolute criterion, 0 where no feature qualifies; a cell stored
    before that was recorded gives the mean over its features (``share of``
    says which). ``family`` is the model's ``model_type`` ("" for older cells).
    """
    import pandas as pd

    from .perplexity_report import ppl_rows

    ppl = ppl_rows(df)
    rows = []
    for r in df[(df.kind == "outliers") & (df.status == "done")].itertuples():
        res = r.result
        if "largest" in res:
            big = res["largest"]["absolute"] or {"pct_layers": 0.0, "pct_positions": 0.0}
            shares, of = (big["pct_layers"], big["pct_positions"]), "largest feature"
        else:
            shares, of = (res["absolute"]["pct_layers"], res["absolute"]["pct_positions"]), "mean over features"
        base = ppl[(ppl.model == r.model) & (ppl.corpus == r.corpus) & (ppl.method == "fp32")].ppl
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "family": res.get("model_type", ""),
                "params": res["n_params"],
                "outlier dims": res["absolute"]["outlier_dims"],
                SHARES[0]: shares[0],
                SHARES[1]: shares[1],
                "share of": of,
                "fp32 ppl": base.iloc[-1] if len(base) else float("nan"),
            }
        )
    return pd.DataFrame(rows).sort_values("params").reset_index(drop=True) if rows else pd.DataFrame(rows)


def paper_points(path: str | Path = PAPER_POINTS) -> pd.DataFrame:
    """Return the paper's published points (``docs/paper_points.csv``) with the table's column names.

    An empty frame where the file is absent (a wheel installed without the repository's ``docs/``).
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=["model", "family", "params", "outlier dims", *SHARES, "source"])
    raw = pd.read_csv(path)
    return raw.rename(
        columns={"outlier_dims": "outlier dims", "pct_layers": SHARES[0], "pct_positions": SHARES[1]}
    ).sort_values("params")


def fit_table(series: dict[str, pd.DataFrame], min_models: int = MIN_MODELS) -> pd.DataFrame:
    """Return one row per (series, family, share) with at least ``min_models`` models: the fit and its errors.

    ``series``: name -> a frame with ``family``, ``params`` and the ``SHARES``
    columns (``emergence_table``, ``paper_points``). A fit that fails is a row
    with its reason in ``note``.
    """
    import pandas as pd

    rows = []
    for name, points in series.items():
        if points.empty:
            continue
        for family, group in points.groupby("family"):
            group = group.drop_duplicates("params")
            if not family or len(group) < min_models:
                continue
            for share in SHARES:
                row = {"series": name, "family": family, "share": share}
                try:
                    fit = fit_logistic(group.params.to_numpy(), group[share].to_numpy())
                except ValueError as e:
                    rows.append(row | {"n": len(group), "note": str(e)})
                    continue
                rows.append(row | asdict(fit) | {"midpoint params (B)": fit.midpoint_params / 1e9, "note": ""})
    return pd.DataFrame(rows)


def emergence_figure(ours: pd.DataFrame, paper: pd.DataFrame, fits: pd.DataFrame) -> Figure:
    """Shares of layers and positions against parameters (log; with the paper's points) and fp32 perplexity."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    colors = {SHARES[0]: "C0", SHARES[1]: "C1"}
    markers = {family: m for family, m in zip(sorted(set(ours.get("family", []))), "osD^vP*X<>", strict=False)}
    for share, color in colors.items():
        for family, group in ours.groupby("family") if len(ours) else ():
            marker = markers.get(family, "o")
            kw = dict(color=color, marker=marker, linestyle="", label=f"{share}: {family or '?'}")
            ax1.plot(group.params, group[share], **kw)
            ax2.plot(group["fp32 ppl"], group[share], **kw)
        if len(paper):
            ax1.plot(
                paper.params,
                paper[share],
                linestyle="",
                marker="x",
                color=color,
                label=f"{share}: paper, Table 4 (C4)",
            )
    plotted = np.log10(np.concatenate([ours.params.to_numpy(float) if len(ours) else [], paper.params.to_numpy(float)]))
    if "top" in fits and len(plotted):
        xs = np.linspace(plotted.min() - 0.2, plotted.max() + 0.2, 200)
        for r in fits[fits.top.notna()].itertuples():
            curve = logistic(xs, r.top, r.midpoint, r.slope)
            ax1.plot(10**xs, curve, color=colors[r.share], linewidth=1, label=f"{r.share}: logistic fit, {r.family}")
    for _, r in ours.iterrows():
        for ax, x in ((ax1, r.params), (ax2, r["fp32 ppl"])):
            ax.annotate(r.model, (x, r[SHARES[0]]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax1.set(xscale="log", xlabel="parameters", ylabel="% affected", ylim=(-3, 103), title="against parameters")
    ax2.set(xlabel="fp32 perplexity (this study's corpus)", title="against the study's perplexity")
    ax2.invert_xaxis()  # better models to the right, as in the paper's Fig. 3b
    ax1.legend(fontsize=6, loc="upper left")
    return fig
