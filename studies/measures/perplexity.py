"""Perplexity per quantization method and threshold, and its agreement with the float model.

The paper's Table 1 (Dettmers et al. 2022, "LLM.int8()", arXiv 2208.07339):
per (model, corpus) one fp32 baseline and one cell per (method, threshold),
one per method for methods without decomposition, whose threshold is moot
(``outliers.quant.methods``). A quantized cell is scored against the float
model on the same windows (paired delta, KL, top-1 agreement; windows and
intervals as ``docs/protocols.md`` says); its model shares every unquantized
tensor with the float one (``outliers.quant.model.quantized_copy``), and the
float model's final hidden states are kept per (model, corpus), so the
reference runs once per study. Per-token NLLs are stored beside each row.

``alphas`` and ``rotations`` cross the grid with transforms applied to the
float model before quantizing (``outliers.quant.transforms``: SmoothQuant
smoothing, Hadamard rotation): a transformed cell's method is a row name,
``"llm.int8@smooth=0.5"`` (``row_name``), and its reference is still the
untransformed float model. A worker calibrates each transform once for all
of its cells and holds one transformed copy at a time. Every cell of a
decomposing method records the share of input columns sent through the
float matmul (``float_columns_pct``, ``outliers.quant.decomposed``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError
from outliers.quant.methods import METHODS, label
from outliers.quant.transforms import ROTATIONS, Transform, parse_row, row_name

from ..format import fmt_delta
from ..settings import floats
from . import Context, Image, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from studies.config import StudyConfig

__all__ = [
    "PERPLEXITY",
    "ppl_rows",
    "perplexity_table",
    "agreement_table",
    "threshold_curves",
    "transforms",
    "row_label",
    "evaluated_tokens",
]

SETTINGS = (
    Setting("methods", (list,), ("llm.int8",), items=(str,)),
    Setting("thresholds", (list,), (6.0,), items=(int, float), convert=floats),
    Setting("protocol", (str,), "chunks"),
    Setting("stride", (int,), None),
    Setting("max_windows", (int,), 8),
    Setting("outlier_weights", (str,), "int8"),
    Setting("round_to", (str,), None),
    # None, not (): a study without them writes neither key to study.json, as before they existed
    Setting("alphas", (list,), None, items=(int, float), convert=floats),
    Setting("rotations", (list,), None, items=(str,)),
)


def validate(cfg: StudyConfig) -> None:
    from outliers.eval.windows import PerplexitySettings

    PerplexitySettings(cfg.protocol, cfg.window, cfg.stride, cfg.max_windows, cfg.batch_size, cfg.bos)
    if cfg.report_thresholds is not None:
        if not cfg.report_thresholds:
            raise InvalidArgumentError("[report] thresholds must name at least one threshold")
        missing = [t for t in cfg.report_thresholds if t not in cfg.thresholds]
        if missing:
            raise InvalidArgumentError(
                f"[report] thresholds {missing} are not in the study's thresholds {list(cfg.thresholds)}"
            )
    for m in cfg.methods:
        if parse_row(m)[0] not in METHODS:  # a row name (llm.int8@hadamard) names its method first
            raise InvalidArgumentError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if any(t < 0 for t in cfg.thresholds):
        raise InvalidArgumentError(f"thresholds must be >= 0, got {list(cfg.thresholds)}")
    _validate_transforms(cfg)


def _validate_transforms(cfg: StudyConfig) -> None:
    alphas, rotations = cfg.alphas or (), cfg.rotations or ()
    given = [k for k, v in (("alphas", alphas), ("rotations", rotations)) if v]
    if not given:
        return
    if "perplexity" not in cfg.measure:
        raise InvalidArgumentError(f"{' and '.join(given)} apply to the perplexity measure, which `measure` lacks")
    if not cfg.methods:
        raise InvalidArgumentError(f"{' and '.join(given)} transform methods' inputs, but `methods` is empty")
    if bad := [a for a in alphas if not 0 <= a <= 1]:
        raise InvalidArgumentError(f"alphas (smoothing strengths) must be in [0, 1], got {bad}")
    if bad_r := [r for r in rotations if r not in ROTATIONS]:
        raise InvalidArgumentError(f"unknown rotation(s) {bad_r} in rotations; choose from {', '.join(ROTATIONS)}")
    for key, values in (("alphas", alphas), ("rotations", rotations)):
        if twice := sorted({v for v in values if values.count(v) > 1}):
            raise InvalidArgumentError(f"{key} lists {twice} more than once")
    # every registered method takes every transform: both act on the float model before quantize_model, which
    # replaces its linears whatever their format; a method that could not would be refused here


def transforms(cfg: StudyConfig) -> list[Transform]:
    """The transforms the grid crosses methods with: none, smoothing at each alpha, each rotation."""
    return [
        Transform(),
        *(Transform(smooth=a) for a in cfg.alphas or ()),
        *(Transform(rotate=r) for r in cfg.rotations or ()),
    ]


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    # grouped by transform, so that a worker makes each transformed copy once and holds one at a time
    out: list[dict[str, Any]] = [{"method": "fp32", "threshold": None}]
    for transform in transforms(cfg):
        for name in cfg.methods:
            method, own = parse_row(name)
            if own and transform:  # a row named with its own transform is not crossed with others
                continue
            ts = cfg.thresholds if METHODS[method].decomposition else (0.0,)
            out += [{"method": row_name(method, own or transform), "threshold": t} for t in ts]
    # a row listed by name and also made by alphas/rotations is one cell, not two
    return list({(c["method"], c["threshold"]): c for c in out}.values())


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    s: dict[str, Any] = {
        "protocol": cfg.protocol,
        "stride": cfg.stride,
        "max_windows": cfg.max_windows,
        "batch_size": cfg.batch_size,
    }  # batching moves float sums in the last bits
    if cell["method"] != "fp32":
        s |= {"outlier_weights": cfg.outlier_weights, "round_to": cfg.round_to}
    _, transform = parse_row(cell["method"])
    if transform:  # only transformed cells: the others keep the fingerprints they always had
        s["transform"] = transform.settings()
        if transform.smooth is not None:
            s["calibration"] = "the corpus' last calib_windows windows, after the tokens evaluation reads"
    return s


def evaluated_tokens(ids: Any, cfg: StudyConfig, bos_token_id: int | None) -> int:
    """How many tokens from the start of ``ids`` the cell's windows read: calibration must start after them.

    The windows are cut by the same functions ``perplexity`` cuts them with (``outliers.eval.windows``).
    """
    from outliers.eval.windows import PerplexitySettings, spans, window_ids

    settings = PerplexitySettings(cfg.protocol, cfg.window, cfg.stride, cfg.max_windows, cfg.batch_size, cfg.bos)
    corpus = window_ids(ids, settings, bos_token_id)
    return len(ids) - len(corpus) + max(s.end for s in spans(len(corpus), settings))  # + a dropped leading BOS


def _quantized(source: Any, method: str, threshold: float, ctx: Context) -> tuple[Any, Any]:
    """``source`` quantized by ``method`` at ``threshold``: quantized once per (source, method), then re-thresholded.

    A threshold sweep's cells share their weights' int8 codes (the threshold only picks X's
    columns at run time): ``set_threshold`` gives the held copy each cell's threshold. One copy is
    held at a time, as for transforms.
    """
    from outliers.quant.model import quantized_copy, set_threshold

    cfg = ctx.cfg
    held = ctx.cache.get("quantized")
    if held is None or held[0] is not source or held[1] != method:
        ctx.cache.pop("quantized", None)  # the last copy goes before the next is made
        made = quantized_copy(source, method, threshold, outlier_weights=cfg.outlier_weights, round_to=cfg.round_to)
        ctx.cache["quantized"] = held = (source, method, *made)
    _, _, copy, report = held
    return copy, set_threshold(copy, report, threshold)


def _transformed(transform: Transform, ctx: Context) -> tuple[Any, dict[str, Any]]:
    """The float model after ``transform``, made once for the cells that share it (one held at a time)."""
    held = ctx.cache.get("transformed")
    if held is None or held[0] != transform:
        from outliers.quant.calibration import transformed_copy

        ctx.cache.pop("transformed", None)  # the last transform's copy goes before the next is made,
        ctx.cache.pop("quantized", None)  # with any quantized copy of it
        cfg = ctx.cfg
        copy, info = transformed_copy(
            ctx.model,
            transform,
            ctx.ids,
            window=cfg.window,
            reserved=evaluated_tokens(ctx.ids, cfg, ctx.bos_token_id),
            batch_size=cfg.batch_size,
        )
        ctx.cache["transformed"] = held = (transform, copy, info)
    return held[1], held[2]


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.eval.perplexity import perplexity
    from outliers.quant.decomposed import float_columns

    cfg, model = ctx.cfg, ctx.model
    method, transform = parse_row(cell["method"])
    source, applied = _transformed(transform, ctx) if transform else (model, {})
    target, report = source, None
    if method != "fp32":
        target, report = _quantized(source, method, cell["threshold"], ctx)
    reference = model if report is not None or transform else None  # the untransformed float model
    with float_columns(target) as columns:
        r = perplexity(
            target,
            ctx.ids,
            protocol=cfg.protocol,
            window=cfg.window,
            stride=cfg.stride,
            max_windows=cfg.max_windows,
            batch_size=cfg.batch_size,
            bos=cfg.bos,
            bos_token_id=ctx.bos_token_id,
            reference=reference,
            reference_states=ctx.cache.setdefault("reference_states", {}),
            progress=ctx.progress,
            model_name=cell["model"],
            corpus_name=cell["corpus"],
            method=None if method == "fp32" else method,
        )
    if not math.isfinite(r.ppl):
        raise FloatingPointError(f"perplexity is {r.ppl} (mean NLL {r.nll})")
    r.extra.update(applied)  # the transform's settings, calibration tokens, Hadamard constructions (as outliers eval)
    result = r.to_dict()
    if report is not None:
        result.update(
            weight_bytes_before=report.bytes_before,
            weight_bytes_after=report.bytes_after,
            replaced=len(report.replaced),
        )
    if columns.share is not None:  # a decomposing method: the mean over (layer, forward call) of the float share
        result.update(float_columns_pct=100 * columns.share, float_columns_calls=columns.n_calls)
    result["token_nll"] = r.token_nll
    return result


# ---------------------------------------------------------------- report


def ppl_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The done perplexity rows, with the result's interval and agreement fields as columns."""
    ppl = df[(df.kind == "perplexity") & (df.status == "done")].copy()
    for col in ("ppl_ci95", "delta_ppl_pct", "delta_ppl_pct_ci95", "kl_vs_ref", "top1_agreement", "n_windows"):
        ppl[col] = ppl.result.map(lambda r, c=col: r.get(c))
    return ppl


def _untransformed(ppl: pd.DataFrame, listed: tuple[str, ...] = ()) -> pd.DataFrame:
    """The Table-1 layout's rows: those without a transform (a plain method name, ``row_name``) and those the
    study's ``methods`` name with theirs (``"absmax-vector@smooth=0.5"``)."""
    canonical = {row_name(*parse_row(m)) for m in listed}  # "smooth=0.50" names the row "smooth=0.5"
    return ppl[~ppl.method.str.contains("@", regex=False) | ppl.method.isin(canonical)]


def _base(name: str) -> str:
    return parse_row(name)[0]


def row_label(name: str) -> str:
    """A row's report label: its method's, and the transform before it (``"... after smooth 0.5"``)."""
    method, transform = parse_row(name)
    return label(method) + (f" after {transform.label}" if transform else "")


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
    """KL against the float model and top-1 agreement per quantized cell, each with its interval."""
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
            "top-1 agreement %": interval(
                r.result.get("top1_agreement"), r.result.get("top1_agreement_ci95"), 100, ".2f"
            ),
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
            "top1_agreement",
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
            "Mean KL(P_fp32 || P_method) in nats per scored token and the share of scored positions whose "
            "top-1 token is the same, with 95 % bootstrap intervals over windows.",
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
        from ..transform_report import transform_section

        parts += transform_section(ppl, cfg)
    return parts


PERPLEXITY = register_measure(
    Measure(
        name="perplexity",
        compute=compute,
        settings=SETTINGS,
        cells=cells,
        fingerprint=fingerprint,
        columns={"ppl": "REAL", "n_tokens": "INTEGER", "seconds": "REAL", "tokens_per_s": "REAL", "token_nll": "BLOB"},
        report=report,
        validate=validate,
        absent='No perplexity was measured (`measure` lacks "perplexity"): no Table-1 layout.',
    )
)
