"""The built-in ``range`` measure: one number-format headroom cell per (model, corpus), stored and reported."""

import pytest

from outliers import InvalidArgumentError
from studies.config import load_config
from studies.report import write_report
from studies.runner import cells, run_study
from studies.store import Store


def _config(tmp_path, model, corpus, extra=""):
    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "headroom"\nmodels = ["{model}"]\ncorpora = ["{corpus}"]\nmethods = []\n'
        f'window = 32\nbatch_size = 2\nmeasure = ["range"]\n{extra}'
    )
    return load_config(path)


def test_range_measure_runs_stores_and_reports(tmp_path, model_dir, text_file):
    cfg = _config(tmp_path, model_dir("llama"), text_file, "range_windows = 2\n")
    assert [c["kind"] for c in cells(cfg)] == ["range"]
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False) == {"done": 1, "failed": 0, "skipped": 0, "stale": 0}
    row = Store(out).frame().iloc[0]
    res = row.result
    assert row.n_tokens == 2 * 32 and res["n_windows"] == 2
    assert res["first_overflow"] == {"float16": None, "bfloat16": None}
    assert res["emulated_float16"]["clean"] and res["emulated_float16"]["ppl"] > 1
    assert len(res["points"]) == 5 * 2 and res["points"][3]["kind"] == "down_in"
    text = write_report(out).read_text()
    assert "## Number-format headroom" in text and (out / "range.csv").exists()
    assert "| clean |" in (out / "range.md").read_text()


def test_range_windows_is_checked(tmp_path):
    with pytest.raises(InvalidArgumentError, match="range_windows must be >= 1, got 0"):
        _config(tmp_path, "m", "builtin", "range_windows = 0\n")
