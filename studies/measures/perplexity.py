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
from outliers.quant.methods import METHODS
from outliers.quant.transforms import ROTATIONS, Transform, parse_row, row_name

from ..settings import floats
from . import Context, Measure, Setting, register_measure
from .perplexity_report import report, transforms

if TYPE_CHECKING:
    from studies.config import StudyConfig

__all__ = ["PERPLEXITY", "evaluated_tokens"]

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
