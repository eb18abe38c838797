"""The built-in ``sensitivity`` measure: one cell per (model, corpus, method), stored, resumed and reported."""

import pytest

from outliers import InvalidArgumentError
from studies.config import load_config
from studies.report import write_report
from studies.runner import cells, run_study
from studies.store import Store


def _config(tmp_path, model, corpus, extra=""):
    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "where"\nmodels = ["{model}"]\ncorpora = ["{corpus}"]\nmethods = []\n'
        f'window = 32\nbatch_size = 2\nmeasure = ["sensitivity"]\n{extra}'
    )
    return load_config(path)


def test_sensitivity_measure_runs_stores_resumes_and_reports(tmp_path, model_dir, text_file):
    extra = 'sensitivity_windows = 4\nsensitivity_unit = "linear"\nsensitivity_methods = ["absmax", "llm.int8"]\n'
    cfg = _config(tmp_path, model_dir("llama"), text_file, extra)
    assert [(c["kind"], c["method"]) for c in cells(cfg)] == [("sensitivity", "absmax"), ("sensitivity", "llm.int8")]
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False) == {"done": 2, "failed": 0, "skipped": 0, "stale": 0}
    res = Store(out).frame().iloc[0].result
    assert res["unit"] == "linear" and len(res["units"]) == 14 and res["n_windows"] == 4
    assert res["ranking"] and res["spearman_halves"] is not None and res["mixed"]["random_draws"] == 0
    assert run_study(cfg, out, progress=False)["skipped"] == 2  # nothing recomputed
    text = write_report(out).read_text()
    assert "## Per-layer sensitivity (linears" in text and (out / "sensitivity.csv").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('sensitivity_unit = "head"\n', "sensitivity_unit must be one of"),
        ('sensitivity_methods = ["nope"]\n', "unknown sensitivity_methods"),
        ("sensitivity_windows = 1\n", "sensitivity_windows must be >= 2"),
    ],
)
def test_sensitivity_settings_are_checked(tmp_path, extra, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _config(tmp_path, "m", "builtin", extra)
