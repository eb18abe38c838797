"""The built-in ``kv_quant`` measure: one cell per (model, corpus, cache format, kept tokens), stored and reported."""

import pytest

from outliers import InvalidArgumentError
from studies.config import load_config
from studies.report import write_report
from studies.runner import cells, run_study
from studies.store import Store


def _config(tmp_path, model, corpus, extra=""):
    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "kv"\nmodels = ["{model}"]\ncorpora = ["{corpus}"]\nmethods = []\n'
        f'window = 32\nbatch_size = 2\nmeasure = ["kv_quant"]\n{extra}'
    )
    return load_config(path)


def test_kv_quant_measure_runs_stores_resumes_and_reports(tmp_path, model_dir, text_file):
    extra = 'kv_quant_specs = ["int8-kivi-g8", "int2-kivi-g8"]\nkv_quant_keep = [0, 2]\nkv_quant_windows = 3\n'
    cfg = _config(tmp_path, model_dir("llama"), text_file, extra)
    methods = [c["method"] for c in cells(cfg)]
    assert methods == ["int8-kivi-g8+keep0", "int2-kivi-g8+keep0", "int8-kivi-g8+keep2", "int2-kivi-g8+keep2"]
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False) == {"done": 4, "failed": 0, "skipped": 0, "stale": 0}
    frame = Store(out).frame()
    res = frame[frame.method == "int2-kivi-g8+keep2"].iloc[0].result
    assert res["extra"]["kv_cache"] == "int2-kivi-g8" and res["extra"]["kv_keep"] == 2 and res["n_windows"] == 3
    assert res["kl_vs_ref"] > 0 and res["delta_ppl_pct_ci95"] is not None
    assert run_study(cfg, out, progress=False)["skipped"] == 4  # nothing recomputed
    text = write_report(out).read_text()
    assert "## Key-value cache quantization" in text and (out / "kv_quant.csv").exists()
    assert (out / "kv_quant.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('kv_quant_specs = ["int3-kivi"]\n', "int3 is not offered"),
        ("kv_quant_specs = []\n", "at least one cache format"),
        ("kv_quant_keep = [-1]\n", "kv_quant_keep must list distinct"),
        ("kv_quant_windows = 0\n", "kv_quant_windows must be >= 1"),
    ],
)
def test_kv_quant_settings_are_checked(tmp_path, extra, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _config(tmp_path, "m", "builtin", extra)
