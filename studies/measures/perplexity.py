"""Perplexity per quantization method and threshold, and its agreement with the float model.

The paper's Table 1 (Dettmers et al. 2022, "LLM.int8()", arXiv 2208.07339):
per (model, corpus) one fp32 baseline and one cell per (method, threshold),
one per method for methods without decomposition, whose threshold is moot
(``outliers.quant.methods``). A quantized cell is scored against the float
model on the same windows (paired delta, KL, top-1 agreement, and KLD's
percentiles and the change in the next token's probability as llama.cpp
reports them, ``outliers.eval.agreement``: all in the stored result's JSON,
none in the cell's key or fingerprint; windows and intervals as
``docs/protocols.md`` says); its model shares every unquantized
tensor with the float one (``outliers.quant.model.quantized_copy``), and the
float model's final hidden states are kept per (model, corpus), so the
reference runs once per study. Per-token NLLs are stored beside each row.

``alphas`` and ``rotations`` cross the grid with transforms applied to the
float model before quantizing (``outliers.quant.transforms``: SmoothQuant
smoothing, Hadamard rotation): a transformed cell's method is a row name,
``"llm.int8@smooth=0.5"`` (``row_name``), and its reference is still the
untransformed float model. ``seeds`` crosses each rotation with its
random-sign seeds (``"llm.int8@hadamard+seed=3"``; seed 0, the only one
without ``seeds``, keeps its name and fingerprint). A worker calibrates each transform once for all
of its cells and holds one transformed copy at a time. Every cell of a
decomposing method records the share of input columns sent through the
float matmul (``float_columns_pct``, ``outliers.quant.decomposed``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError
from outliers.quant.methods import METHODS
from outliers.quant.transform_spec import ROTATIONS, parse_row, row_name

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
    Setting("seeds", (list,), None, items=(int,)),  # the rotations' random signs; None: seed 0 alone
)


def validate(cfg: StudyConfig) -> None:
    _settings(cfg)
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
    alphas, rotations, seeds = cfg.alphas or (), cfg.rotations or (), cfg.seeds
    if seeds is not None and not (seeds and rotations):
        raise InvalidArgumentError("seeds are the rotations' random signs: give rotations, and at least one seed")
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
    for key, values in (("alphas", alphas), ("rotations", rotations), ("seeds", seeds or ())):
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
            out += [{"method": row_name(method, own or transform, seed=True), "threshold": t} for t in ts]
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
    """How many tokens from the start of ``ids`` the cell's windows read: calibration must start after them
    (the one rule, ``outliers.eval.windows.evaluated_tokens``)."""
    from outliers.eval.windows import evaluated_tokens as rule

    return rule(ids, _settings(cfg), bos_token_id)


def _settings(cfg: StudyConfig) -> Any:
    from outliers.eval.windows import PerplexitySettings

    return PerplexitySettings(cfg.protocol, cfg.window, cfg.stride, cfg.max_windows, cfg.batch_size, cfg.bos)


def _evaluator(cell: dict[str, Any], ctx: Context) -> Any:
    """The row evaluator of this (model, corpus): its held copies and the reference's states outlive one cell."""
    from outliers.eval.rows import RowEvaluator

    ev = ctx.cache.get("rows")
    if ev is None:
        ev = ctx.cache["rows"] = RowEvaluator(
            ctx.model,
            ctx.ids,
            _settings(ctx.cfg),
            bos_token_id=ctx.bos_token_id,
            model_name=cell["model"],
            corpus_name=cell["corpus"],
        )
    ev.progress = ctx.progress
    return ev


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.eval.rows import Row

    cfg = ctx.cfg
    method, transform = parse_row(cell["method"])
    threshold = cell["threshold"] if cell["threshold"] is not None else 6.0
    row = Row(method, transform, threshold, outlier_weights=cfg.outlier_weights, round_to=cfg.round_to)
    done = _evaluator(cell, ctx).evaluate(row)
    r = done.result
    if not math.isfinite(r.ppl):
        raise FloatingPointError(f"perplexity is {r.ppl} (mean NLL {r.nll})")
    result = r.to_dict()  # with the transform's settings, calibration tokens, Hadamard constructions (as eval)
    if done.report is not None:
        result.update(
            weight_bytes_before=done.report.bytes_before,
            weight_bytes_after=done.report.bytes_after,
            replaced=len(done.report.replaced),
        )
    if done.float_columns_pct is not None:  # a decomposing method: the mean over (layer, call) of the float share
        result.update(float_columns_pct=done.float_columns_pct, float_columns_calls=done.float_columns_calls)
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
