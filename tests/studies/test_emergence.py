"""Emergence as the paper draws it (studies.measures.emergence): shares from stored results, the paper's points, and a
logistic fit only for a family of at least six models, checked on planted sigmoids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from studies.measures.emergence import (
    MIN_MODELS,
    SHARES,
    emergence_figure,
    emergence_table,
    fit_logistic,
    fit_table,
    logistic,
    paper_points,
)

MIDPOINT = 9.6  # log10 parameters: about 4B


def planted(family: str, n: int, seed: int = 0, noise: float = 1.5) -> pd.DataFrame:
    """``n`` models of one family from 70M to 30B whose shares follow a logistic in log10(params), plus noise."""
    g = np.random.default_rng(seed)
    x = np.linspace(7.85, 10.5, n)
    layers = logistic(x, 100.0, MIDPOINT, 4.0) + g.normal(0, noise, n)
    positions = logistic(x, 75.0, MIDPOINT + 0.1, 5.0) + g.normal(0, noise, n)
    return pd.DataFrame(
        {
            "model": [f"{family}-{i}" for i in range(n)],
            "family": family,
            "params": 10**x,
            SHARES[0]: layers.clip(0, 100),
            SHARES[1]: positions.clip(0, 100),
            "fp32 ppl": np.linspace(40, 10, n),
        }
    )


def test_the_fit_recovers_the_planted_midpoint_within_its_error():
    points = planted("opt", 8)
    fit = fit_logistic(points.params.to_numpy(), points[SHARES[0]].to_numpy())
    assert fit.n == 8 and 0 < fit.midpoint_se < 0.2
    assert abs(fit.midpoint - MIDPOINT) < max(3 * fit.midpoint_se, 0.05)
    assert abs(fit.top - 100) < 10 and abs(fit.midpoint_params / 1e9 - 10**MIDPOINT / 1e9) < 1.5
    positions = fit_logistic(points.params.to_numpy(), points[SHARES[1]].to_numpy())
    assert abs(positions.top - 75) < 8 and abs(positions.midpoint - (MIDPOINT + 0.1)) < 0.15


def test_a_fit_needs_points_to_spare():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_logistic(np.array([1e8, 1e9, 1e10]), np.array([0.0, 50.0, 100.0]))


def test_only_a_family_with_six_models_gets_a_curve():
    mixed = pd.concat([planted("opt", MIN_MODELS), planted("gpt_neox", MIN_MODELS - 1, seed=1)])
    builtins = pd.DataFrame(
        {
            "family": ["llama", "gemma3_text", "qwen2", "qwen2"],
            "params": [135e6, 268e6, 630e6, 1.78e9],
            SHARES[0]: [30.0, 100.0, 90.0, 95.0],
            SHARES[1]: [7.0, 80.0, 20.0, 30.0],
        }
    )
    fits = fit_table({"this study": mixed, "built-ins": builtins})
    assert sorted(zip(fits.family, fits.share, strict=True)) == [("opt", SHARES[0]), ("opt", SHARES[1])]
    assert (fits.n == MIN_MODELS).all() and fits.midpoint_se.notna().all()
    assert fit_table({"built-ins": builtins}).empty


def test_the_papers_points_name_their_source_and_get_no_curve():
    paper = paper_points()
    assert len(paper) >= 5 and paper.source.str.contains("arXiv 2208.07339").all()
    row = paper[paper.model == "fairseq 6.7B"].iloc[0]
    assert (row[SHARES[0]], row[SHARES[1]], row["outlier dims"]) == (100, 75, 6)
    assert fit_table({"paper": paper}).empty  # at most three models of one family
    assert paper_points("/no/such/file.csv").empty


def stored(model, family, n_params, largest, ppl):
    """Rows as ``Store.frame`` returns them: one done outlier cell and one fp32 perplexity cell."""
    scan = {
        "n_params": n_params,
        "absolute": {"outlier_dims": 2, "pct_layers": 40.0, "pct_positions": 10.0},
        **({"model_type": family, "largest": {"absolute": largest, "relative": None}} if family else {}),
    }
    base = dict(model=model, corpus="builtin", status="done")
    return [
        base | {"kind": "outliers", "method": "fp32", "threshold": 6.0, "result": scan},
        base | {"kind": "perplexity", "method": "fp32", "threshold": None, "result": {}, "ppl": ppl},
    ]


def test_the_table_reads_the_largest_features_shares_and_falls_back_for_older_cells():
    big = {"dim": 5.0, "max_abs": 60.0, "pct_layers": 100.0, "pct_positions": 75.0}
    df = pd.DataFrame(
        stored("big", "opt", 6.7e9, big, 13.0)
        + stored("none", "opt", 125e6, None, 30.0)  # no feature qualifies: 0 %
        + stored("old", "", 1.3e9, None, 16.0)  # stored before the family and the largest feature were
    )
    t = emergence_table(df).set_index("model")
    assert list(t.index) == ["none", "old", "big"]  # by parameters
    assert (t.loc["big", SHARES[0]], t.loc["big", SHARES[1]], t.loc["big", "fp32 ppl"]) == (100.0, 75.0, 13.0)
    assert (t.loc["none", SHARES[0]], t.loc["none", "share of"]) == (0.0, "largest feature")
    assert (t.loc["old", SHARES[0]], t.loc["old", "share of"], t.loc["old", "family"]) == (
        40.0,
        "mean over features",
        "",
    )


def test_the_figure_draws_a_curve_only_where_there_is_a_fit():
    ours, paper = planted("opt", 7), paper_points()
    fig = emergence_figure(ours, paper, fit_table({"this study": ours}))
    ax1, ax2 = fig.axes
    curves = [line for line in ax1.get_lines() if "logistic fit" in line.get_label()]
    assert len(curves) == 2 and ax1.get_xscale() == "log"
    assert not any("paper" in line.get_label() for line in ax2.get_lines())  # C4 perplexities stay off this axis
    fig = emergence_figure(ours.head(4), paper, fit_table({"this study": ours.head(4)}))
    assert not [line for line in fig.axes[0].get_lines() if "logistic fit" in line.get_label()]


def test_a_study_of_two_families_reports_points_and_no_curve(tmp_path, model_dir, text_file):
    from studies.config import parse_config
    from studies.report import write_report
    from studies.runner import run_study

    cfg = parse_config(
        {
            "study": {
                "name": "two",
                "models": [str(model_dir("llama")), str(model_dir("gpt2"))],
                "corpora": [str(text_file)],
                "methods": [],
                "measure": ["perplexity", "outliers"],
                "window": 32,
                "max_windows": 2,
                "batch_size": 2,
                "outlier_tokens": 128,
            }
        }
    )
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False)["failed"] == 0
    text = write_report(out).read_text()
    assert "## Emergence (the paper's Fig. 3)" in text and "No logistic fit" in text
    table = pd.read_csv(out / "emergence.csv")
    assert sorted(table.family) == ["gpt2", "llama"] and (table["share of"] == "largest feature").all()
    assert table["fp32 ppl"].gt(1).all() and (out / "emergence.png").exists()
