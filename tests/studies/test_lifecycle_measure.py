"""The built-in ``lifecycle`` measure: one trace per (model, corpus), stored, resumed and reported with the chain,
the edits' table and a diagram per model."""

import pytest
from helpers import save_planted_chain

from outliers import InvalidArgumentError
from studies.config import as_tables, parse_config
from studies.report import write_report
from studies.runner import run_study
from studies.store import Store

W = 32


def test_lifecycle_measure_runs_stores_and_reports(tmp_path, tokenizer, text_file):
    save_planted_chain(tmp_path / "chain", tokenizer)
    study = {"name": "lc", "models": [str(tmp_path / "chain")], "corpora": [str(text_file)], "window": W}
    assert not any(k.startswith("lifecycle") for k in as_tables(parse_config({"study": study}))["study"])
    # one window: the cheapest trace, and its intervals are None (nothing to resample)
    cfg = parse_config({"study": {**study, "measure": ["lifecycle"], "lifecycle_windows": 1, "bos": "window"}})
    out = tmp_path / "out"
    counts = run_study(cfg, out, progress=False)
    row = Store(out).frame().iloc[0]
    assert counts["done"] == 1, row.error
    res = row.result
    assert row.kind == "lifecycle" and row.n_tokens == W and res["n_windows"] == 1
    assert [e["edit"] for e in res["edits"]][-1] == "clamp_control" and "heads" not in res["chain"]
    by = {e["edit"]: e for e in res["edits"]}
    assert by["clamp_massive"]["sink_rate"] == 0 < by["none"]["sink_rate"] and "kl_vs_ref_llm_int8" in by["none"]
    assert by["clamp_massive"]["sink_rate_delta"] < 0 and by["clamp_massive"]["sink_rate_delta_ci95"] is None
    assert run_study(cfg, out, progress=False)["skipped"] == 1  # nothing recomputed
    text = write_report(out).read_text()
    assert "## Outlier lifecycle" in text and "lifecycle_0.png" in text
    for f in ("lifecycle.csv", "lifecycle_chain.csv", "lifecycle_0.png"):
        assert (out / f).stat().st_size > 0, f
    table = (out / "lifecycle.md").read_text()
    assert "clamp_massive" in table and "llm.int8 KL" in table and "5, 9" in (out / "lifecycle_chain.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"lifecycle_windows": 0}, "lifecycle_windows must be >= 1"), ({"lifecycle_rows": ["int3"]}, "int3")],
)
def test_lifecycle_settings_are_checked(extra, message):
    study = {"name": "lc", "models": ["m"], "corpora": ["builtin"], "measure": ["lifecycle"], **extra}
    with pytest.raises(InvalidArgumentError, match=message):
        parse_config({"study": study})
