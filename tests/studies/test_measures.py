"""The measure registry: a measure registered from this file alone is validated, planned, run, stored and reported.

The toy measure ("params") counts the model's parameters in units of its one setting, ``params_unit``.
"""

import json
import sqlite3

import pytest

from outliers import InvalidArgumentError
from studies.config import parse_config, read_study
from studies.measures import MEASURES, Measure, Setting, Table, register_measure
from studies.report import status, write_report
from studies.runner import cells, run_study
from studies.store import Store


def _compute(cell, ctx):
    return {
        "param_count": sum(p.numel() for p in ctx.model.parameters()) // ctx.cfg.params_unit,
        "n_tokens": int(len(ctx.ids)),
    }


def _validate(cfg):
    if cfg.params_unit < 1:
        raise InvalidArgumentError(f"params_unit must be >= 1, got {cfg.params_unit}")


def _report(frame, cfg):
    rows = frame[frame.kind == "params"][["model", "param_count"]]
    return ["## Parameters", "", f"In units of {cfg.params_unit}.", "", Table(rows, "params", ".0f"), ""]


@pytest.fixture
def params_measure():
    measure = register_measure(
        Measure(
            name="params",
            compute=_compute,
            settings=(Setting("params_unit", (int,), 1),),
            columns={"param_count": "INTEGER", "n_tokens": "INTEGER"},
            report=_report,
            validate=_validate,
            absent='No parameter count (`measure` lacks "params").',
        )
    )
    yield measure
    del MEASURES["params"]


def _study(model, corpus, **extra):
    study = {
        "name": "toy",
        "models": [str(model)],
        "corpora": [str(corpus)],
        "methods": ["absmax"],
        "measure": ["perplexity", "params"],
        "window": 32,
        "max_windows": 2,
        "batch_size": 2,
        **extra,
    }
    return {"study": study}


def test_config_validates_a_registered_measure(params_measure, tmp_path):
    data = _study("m", "builtin", params_unit=1000)
    cfg = parse_config(data, "toy.toml")
    assert cfg.params_unit == 1000 and cfg.measure == ("perplexity", "params")
    assert parse_config(_study("m", "builtin")).params_unit == 1  # the default
    assert [c["kind"] for c in cells(cfg)] == ["perplexity", "perplexity", "params"]
    with pytest.raises(InvalidArgumentError, match=r"toy.toml: \[study\] params_unit must be int, got str"):
        parse_config(_study("m", "builtin", params_unit="k"), "toy.toml")
    with pytest.raises(InvalidArgumentError, match="toy.toml: params_unit must be >= 1, got 0"):
        parse_config(_study("m", "builtin", params_unit=0), "toy.toml")


def test_without_registration_its_key_and_name_are_unknown():
    assert "params" not in MEASURES
    with pytest.raises(InvalidArgumentError, match="unknown key 'params_unit' in \\[study\\]"):
        parse_config(_study("m", "builtin", params_unit=1))
    with pytest.raises(InvalidArgumentError, match="unknown measure 'params'; choose from perplexity, outliers"):
        parse_config(_study("m", "builtin"))


def test_a_registered_measure_runs_stores_and_reports(params_measure, tmp_path, model_dir, text_file):
    from helpers import make_model

    n_params = sum(p.numel() for p in make_model("llama").parameters())
    cfg = parse_config(_study(model_dir("llama"), text_file))
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False) == {"done": 3, "failed": 0, "skipped": 0, "stale": 0}
    assert run_study(cfg, out, progress=False)["skipped"] == 3
    assert "param_count" in [r[1] for r in sqlite3.connect(out / "results.sqlite").execute("PRAGMA table_info(cells)")]
    rows = Store(out).frame()
    toy = rows[rows.kind == "params"].iloc[0]
    assert toy.param_count == n_params and toy.result["param_count"] == n_params and toy.n_tokens > 0
    assert toy.provenance["weights_sha256"] and toy.result["n_params"] == n_params
    assert rows[rows.kind == "perplexity"].param_count.isna().all()  # another measure's column stays NULL
    assert json.loads((out / "study.json").read_text())["study"]["params_unit"] == 1
    assert read_study(out) == cfg

    text = write_report(out).read_text()
    assert "## Parameters" in text and f"| {n_params} |" in (out / "params.md").read_text()
    assert "### Methods" in text and "32-bit float" in text  # the built-in sections are still there
    assert "No outlier scan was measured" in text and "No parameter count" not in text
    assert text.index("## Perplexity") < text.index("## Parameters") < text.index("## Settings")
    assert (out / "params.csv").exists() and '"params_unit": 1' in text

    changed = parse_config(_study(model_dir("llama"), text_file, params_unit=1000))  # its fingerprint moves
    assert status(out).state.tolist() == ["done"] * 3
    assert run_study(changed, out, progress=False) == {"done": 1, "failed": 0, "skipped": 2, "stale": 1}
    rows = Store(out).frame()
    assert rows[rows.kind == "params"].param_count.iloc[0] == n_params // 1000


def test_a_study_without_it_names_it_absent(params_measure, tmp_path, model_dir, text_file):
    cfg = parse_config(
        {
            "study": {
                "name": "scan",
                "models": [str(model_dir("llama"))],
                "corpora": [str(text_file)],
                "measure": ["outliers"],
                "window": 32,
                "outlier_tokens": 64,
            }
        }
    )
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False)["done"] == 1
    text = write_report(out).read_text()
    assert 'No parameter count (`measure` lacks "params").' in text and "Table-4 layout" in text
    assert not (out / "params.csv").exists()


@pytest.mark.parametrize(
    "measure, message",
    [
        (Measure("perplexity", _compute), "already registered"),
        (Measure("toy", _compute, settings=(Setting("window", (int,)),)), "setting 'window' is already taken"),
        (Measure("toy", _compute, settings=(Setting("thresholds", (list,)),)), "setting 'thresholds' is already taken"),
        (Measure("toy", _compute, columns={"status": "TEXT"}), "column 'status' TEXT is reserved"),
        (Measure("toy", _compute, columns={"ppl": "TEXT"}), "already REAL"),
        (Measure("toy", _compute, columns={"a b": "REAL"}), "not a name"),
        (Measure("toy", _compute, columns={"x": "FLOAT"}), "not one of INTEGER"),
    ],
    ids=["name", "core-setting", "measure-setting", "reserved-column", "column-type", "column-name", "sql-type"],
)
def test_registration_refuses_clashes(measure, message):
    with pytest.raises(ValueError, match=message):
        register_measure(measure)
    assert "toy" not in MEASURES
