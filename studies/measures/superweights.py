"""Super weights: the spike rule's candidates, which of them are super weights by their effect, and the controls.

Yu et al. 2024 ("The Super Weight in Large Language Models", arXiv
2411.07191): one run of ``outliers.analysis.superweights`` per (model,
corpus), detection on 2 windows of the study's ``window``, then
``outliers.analysis.superweight_effects`` with controls on
``superweight_windows`` windows: the original perplexity, the candidates
zeroed, zeroed with the super activation restored, and the four controls
(``matched`` over ``superweight_seeds`` seeds, the fair one; ``paper``;
``outside_massive``; ``largest_down_{superweight_control_k}``), each as a
ratio to the original, and each candidate's verdict (``super_weight`` when
zeroing it moves perplexity by at least ``superweight_min_effect`` % and the
lower end of that change's interval exceeds every matched seed's; else
``spike``; ``outliers.analysis.superweight_verdicts``).

Its settings default to None (meaning 4 windows, k = 7000, 10 seeds and a
100 % minimum effect, ``outliers superweights``' defaults), so that the
``study.json`` and report of a study that does not take this measure stay as
they were; the result lives in the row's JSON (no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["SUPERWEIGHTS", "superweight_table"]

WINDOWS, CONTROL_K, DETECT_WINDOWS, SEEDS, MIN_EFFECT = 4, 7000, 2, 10, 100.0
SETTINGS = (
    Setting("superweight_windows", (int,), None),  # None: WINDOWS windows of the study's window
    Setting("superweight_control_k", (int,), None),  # None: CONTROL_K (largest_down_7000)
    Setting("superweight_seeds", (int,), None),  # None: SEEDS magnitude-matched draws
    Setting("superweight_min_effect", (int, float), None),  # None: MIN_EFFECT % (a super weight's smallest effect)
)
CONTROLS = ("matched", "paper", "outside_massive")  # and largest_down_{k}, last


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.superweight_windows is None else int(cfg.superweight_windows)


def _control_k(cfg: StudyConfig) -> int:
    return CONTROL_K if cfg.superweight_control_k is None else int(cfg.superweight_control_k)


def _seeds(cfg: StudyConfig) -> int:
    return SEEDS if cfg.superweight_seeds is None else int(cfg.superweight_seeds)


def _min_effect(cfg: StudyConfig) -> float:
    return MIN_EFFECT if cfg.superweight_min_effect is None else float(cfg.superweight_min_effect)


def validate(cfg: StudyConfig) -> None:
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"superweight_windows must be >= 1, got {cfg.superweight_windows}")
    if _control_k(cfg) < 0:
        raise InvalidArgumentError(f"superweight_control_k must be >= 0, got {cfg.superweight_control_k}")
    if _seeds(cfg) < 1:
        raise InvalidArgumentError(f"superweight_seeds must be >= 1, got {cfg.superweight_seeds}")


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {
        "superweight_windows": _windows(cfg),
        "superweight_control_k": _control_k(cfg),
        "superweight_seeds": _seeds(cfg),
        "superweight_min_effect": _min_effect(cfg),
        "batch_size": cfg.batch_size,
    }


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.superweight_controls import ControlSettings
    from outliers.analysis.superweight_effects import super_weight_effects
    from outliers.analysis.superweights import super_weights

    cfg = ctx.cfg
    found = super_weights(ctx.model, ctx.ids, window=cfg.window, max_windows=DETECT_WINDOWS, batch_size=cfg.batch_size)
    eff = super_weight_effects(
        ctx.model,
        ctx.ids,
        found.weights,
        window=cfg.window,
        max_windows=_windows(cfg),
        batch_size=cfg.batch_size,
        controls=ControlSettings(seeds=_seeds(cfg), min_effect=_min_effect(cfg), largest_k=_control_k(cfg)),
        progress=ctx.progress,
    )
    d = eff.to_dict()
    first = found.weights[0] if found.weights else None

    def ratio(ppl: float | None) -> float | None:
        return ppl / d["ppl"] if ppl is not None else None

    controls = {c["name"]: c for c in d["controls"]}
    return {
        "n_params": ctx.info.n_params,
        "n_tokens": eff.original.n_tokens,
        "n_candidates": len(found.weights),
        "n_super_weights": d["n_super_weights"],
        "first": {k: getattr(first, k) for k in ("block", "row", "col", "value", "massive")} if first else None,
        "verdicts": [
            {k: v[k] for k in ("block", "row", "col", "value", "verdict", "delta_ppl_pct", "delta_ppl_pct_ci95")}
            for v in d["super_weights"]
        ],
        "stop": found.stop,
        "window": cfg.window,
        "n_windows": eff.original.n_windows,
        **{k: d[k] for k in ("ppl", "ppl_zeroed", "ppl_restored", "ppl_control", "control_k", "min_effect", "seeds")},
        "ratio_zeroed": ratio(d["ppl_zeroed"]),
        "ratio_restored": ratio(d["ppl_restored"]),
        "ratio_control": ratio(d["ppl_control"]),
        **{f"ratio_{name}": ratio(controls[name]["ppl"]) for name in CONTROLS},
        "matched_max_delta_pct": (controls["matched"].get("spread") or {}).get("max"),
        "controls": d["controls"],
        "seconds": d["seconds"],
    }


def superweight_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): the candidates and their verdicts, the perplexity ratios of the edits and of
    each control (matched: its median seed)."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "superweights") & (df.status == "done")].itertuples():
        res, first = r.result, r.result["first"]
        verdicts = res.get("verdicts") or []
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "candidates": res.get("n_candidates", res["n_super_weights"]),
                "super weights": res["n_super_weights"] if verdicts or not first else None,
                "first (block, row, col)": f"{first['block']}, {first['row']}, {first['col']}" if first else "none",
                "verdicts": ", ".join(v["verdict"] for v in verdicts) or "-",
                "ppl": res["ppl"],
                "zeroed / ppl": res["ratio_zeroed"],
                "restored / ppl": res["ratio_restored"],
                "matched / ppl": res.get("ratio_matched"),
                "paper / ppl": res.get("ratio_paper"),
                "outside massive / ppl": res.get("ratio_outside_massive"),
                f"largest {res['control_k']} / ppl": res["ratio_control"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The super-weight table."""
    if not (df.kind == "superweights").any():
        return ["No super-weight measurement is done yet.", ""]
    return [
        "## Super weights (Yu et al. 2024: single down-projection weights whose zeroing breaks the model)",
        "",
        f"Detection on {DETECT_WINDOWS} windows, perplexities on {_windows(cfg)} windows of {cfg.window} tokens: "
        "the original, the spike rule's candidates zeroed, zeroed with the super activation restored, and four "
        f"controls (ratios to the original): matched ({_seeds(cfg)} seeds of as many weights of the same "
        "magnitudes from the same matrices, away from the candidates' rows and columns; its median seed), paper "
        "(the top 1e-6 of every linear, at least one each), outside massive (as many of the largest weights "
        f"outside the massive dims' rows and columns) and the {_control_k(cfg)} largest other down-projection "
        "weights. The matched control is the fair one: it differs from the candidates only in which weights it "
        "zeroes; the others zero the largest weights, on a small model the massive dims' own rows among them. "
        f"A candidate is a super weight when zeroing it moves perplexity by >= {_min_effect(cfg):g} % and the "
        "lower end of that change's paired interval exceeds every matched seed's; otherwise a spike.",
        "",
        Table(superweight_table(df), "superweights", ".3f"),
        "",
    ]


SUPERWEIGHTS = register_measure(
    Measure(
        name="superweights",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
