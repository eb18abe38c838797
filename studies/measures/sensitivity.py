"""Per-layer sensitivity: which units break a model when quantized alone, how sure we are, and what predicts it.

One run of ``outliers.analysis.sensitivity`` per (model, corpus, method) on
``sensitivity_windows`` windows of the study's ``window`` (chunks): per unit
(``sensitivity_unit``: block, linear or kind) the KL and Δppl against the
float model with paired intervals, the ranking and its stability between
even and odd windows, the cheap predictors' ρ with the measured KL, and the
mixed-precision curve (``sensitivity_random`` random draws per k beside the
ranked choice; 0, the default here, leaves the baseline out: it costs about
100 forwards of half the windows for SmolLM2).

Its settings default to None, so the ``study.json`` and report of a study
that does not take this measure stay as they were; the result lives in the
row's JSON (no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["SENSITIVITY", "sensitivity_table"]

METHODS, UNIT, WINDOWS, RANDOM = ("llm.int8",), "block", 16, 0
SETTINGS = (
    Setting("sensitivity_methods", (list,), None, items=(str,)),  # None: METHODS
    Setting("sensitivity_unit", (str,), None),  # None: UNIT
    Setting("sensitivity_windows", (int,), None),  # None: WINDOWS windows of the study's window
    Setting("sensitivity_random", (int,), None),  # None: RANDOM draws per k
)


def _methods(cfg: StudyConfig) -> tuple[str, ...]:
    return METHODS if cfg.sensitivity_methods is None else tuple(cfg.sensitivity_methods)


def _unit(cfg: StudyConfig) -> str:
    return UNIT if cfg.sensitivity_unit is None else cfg.sensitivity_unit


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.sensitivity_windows is None else int(cfg.sensitivity_windows)


def _random(cfg: StudyConfig) -> int:
    return RANDOM if cfg.sensitivity_random is None else int(cfg.sensitivity_random)


def validate(cfg: StudyConfig) -> None:
    from outliers.analysis.sensitivity import UNITS
    from outliers.quant.methods import METHODS as REGISTERED

    if bad := [m for m in _methods(cfg) if m not in REGISTERED]:
        raise InvalidArgumentError(f"unknown sensitivity_methods {bad}; choose from {', '.join(REGISTERED)}")
    if _unit(cfg) not in UNITS:
        raise InvalidArgumentError(f"sensitivity_unit must be one of {', '.join(UNITS)}, got {cfg.sensitivity_unit!r}")
    if _windows(cfg) < 2:
        raise InvalidArgumentError(f"sensitivity_windows must be >= 2, got {cfg.sensitivity_windows}")
    if _random(cfg) < 0:
        raise InvalidArgumentError(f"sensitivity_random must be >= 0, got {cfg.sensitivity_random}")


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    return [{"method": m, "threshold": None} for m in _methods(cfg)]


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {
        "sensitivity_unit": _unit(cfg),
        "sensitivity_windows": _windows(cfg),
        "sensitivity_random": _random(cfg),
        "batch_size": cfg.batch_size,
        "window": cfg.window,
    }


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.sensitivity import sensitivity
    from outliers.eval.windows import PerplexitySettings

    cfg = ctx.cfg
    settings = PerplexitySettings("chunks", cfg.window, None, _windows(cfg), cfg.batch_size, cfg.bos)
    res = sensitivity(
        ctx.model,
        ctx.ids,
        settings,
        cell["method"],
        unit=_unit(cfg),
        bos_token_id=ctx.bos_token_id,
        random_draws=_random(cfg),
        progress=ctx.progress,
        model_name=cell["model"],
        corpus_name=cell["corpus"],
    )
    return {"n_params": ctx.info.n_params, "weights": ctx.info.weights, **res.to_dict()}


def sensitivity_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus, method): the whole model's KL, the three most sensitive units, the ranking's
    stability and the best predictor."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "sensitivity") & (df.status == "done")].itertuples():
        res = r.result
        units = {u["unit"]: u for u in res["units"]}
        top = [f"{n} ({units[n]['kl_vs_ref']:.4f})" for n in res["ranking"][:3]]
        preds = {k: v["rho"] for k, v in res["predictors"].items() if v["rho"] is not None}
        best = max(preds, key=lambda k: preds[k]) if preds else None
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "method": r.method,
                "params (M)": res["n_params"] / 1e6,
                "whole KL": res["whole"]["kl_vs_ref"],
                "most sensitive (KL)": ", ".join(top),
                "ρ halves": res["spearman_halves"],
                "ρ whole set": res["spearman_brown"],
                "best predictor": f"{best} ({preds[best]:+.2f})" if best else "",
                "windows": res["n_windows"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus", "method"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The sensitivity table."""
    if not (df.kind == "sensitivity").any():
        return ["No sensitivity measurement is done yet.", ""]
    return [
        f"## Per-layer sensitivity ({_unit(cfg)}s quantized one at a time)",
        "",
        "Per model and method: the whole model's KL against float, the three units whose quantization alone "
        "costs the most KL (nats/token), Spearman's ρ between the rankings on even and odd windows and its "
        "Spearman–Brown step-up for the whole set, and the cheap predictor that ranks the units best "
        "(docs/sensitivity.md). The weights are as loaded: a GGUF model's are its dequantized 4-bit values.",
        "",
        Table(sensitivity_table(df), "sensitivity", ".4f"),
        "",
    ]


SENSITIVITY = register_measure(
    Measure(
        name="sensitivity",
        compute=compute,
        settings=SETTINGS,
        cells=cells,
        fingerprint=fingerprint,
        report=report,
        validate=validate,
    )
)
