"""Before a study runs: a hub model out of reach stops it before any cell, and ``--dry-run`` prints the grid,
each cell's state and memory and where it fits. The network is never touched: reachability is monkeypatched."""

from __future__ import annotations

import pytest

from outliers import HubUnavailableError
from outliers.models import hub
from outliers.models.size import ModelSize, model_size
from studies import dryrun
from studies.cli import main
from studies.config import load_config
from studies.dryrun import Device, cell_memory, dry_run
from studies.runner import run_study


def write_config(tmp_path, models, corpus, **extra):
    lines = ["[study]", 'name = "tiny"', f"models = {list(map(str, models))!r}".replace("'", '"')]
    lines += [f'corpora = ["{corpus}"]', 'methods = ["llm.int8"]', "thresholds = [6]", "window = 32"]
    lines += ["max_windows = 2", "batch_size = 2", *(f"{k} = {v}" for k, v in extra.items())]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def offline(monkeypatch):
    """No hub and an empty hub cache; returns the list of reachability probes made."""
    probes: list[int] = []

    def unreachable(timeout: float = 3.0) -> str:
        probes.append(1)
        return "test: no network"

    monkeypatch.setattr(hub, "hub_unreachable", unreachable)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: unreachable(timeout) is None)
    monkeypatch.setattr(hub, "hub_snapshot", lambda hub_id: None)
    return probes


def test_an_unreachable_hub_model_stops_the_study_before_any_cell(tmp_path, model_dir, text_file, offline):
    models = [model_dir("llama"), "org/first-missing", "org/second-missing"]
    cfg = load_config(write_config(tmp_path, models, text_file))
    seen: list = []
    with pytest.raises(HubUnavailableError, match=r"org/first-missing cannot be reached: .*local cache \(test: no"):
        run_study(cfg, tmp_path / "out", progress=False, on_cell=lambda cell, status: seen.append(cell))
    assert seen == [] and not (tmp_path / "out").exists() and len(offline) == 1  # one probe, no store


def test_a_cached_hub_model_needs_no_hub(tmp_path, model_dir, text_file, monkeypatch, offline):
    from studies.planning import check_reachable

    monkeypatch.setattr(hub, "hub_snapshot", lambda hub_id: model_dir("llama"))
    check_reachable(load_config(write_config(tmp_path, ["org/cached"], text_file)))
    assert offline == []  # nothing to probe: every hub id is cached


def test_the_cli_names_the_model_and_exits_2(tmp_path, text_file, capsys, offline):
    path = write_config(tmp_path, ["org/missing"], text_file)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "org/missing cannot be reached" in capsys.readouterr().err


def test_cell_memory_adds_what_each_cell_holds(tmp_path, text_file):
    cfg = load_config(write_config(tmp_path, ["m"], text_file, alphas="[0.5]"))
    size = ModelSize(
        n_params=10_000, hidden_size=4, num_layers=2, num_heads=2, vocab_size=10, model_type="t", source=""
    )
    b, w, P, h, V, H, L = 2, 32, 10_000, 4, 10, 2, 2
    base = P * 4 + b * w * 16 * h * 4 + b * H * w * w * 4

    def need(kind, method="fp32"):
        return cell_memory(size, {"kind": kind, "method": method, "threshold": 6.0}, cfg)

    fp32 = need("perplexity")
    assert fp32 == base + 2 * 2**23 * 4 + 2 * w * h * 4  # chunked logits, the reference's hidden states
    assert need("perplexity", "llm.int8") - fp32 == P - V * h  # one byte per code, embedding left out
    assert need("perplexity", "llm.int8@smooth=0.5") - need("perplexity", "llm.int8") == P * 4  # a float copy
    assert need("sinks") == base + b * V * 4 + b * H * w * w * 4  # the last position's logits only
    assert need("outliers") == base + b * V * 4 + 4 * L * h * 16 * 8


def test_dry_run_prints_grid_states_memory_and_fit(tmp_path, model_dir, text_file, monkeypatch, offline):
    monkeypatch.setattr(dryrun, "devices", lambda: [Device("cpu", 2**40, 2**40), Device("cuda:0", 1, 2**34)])
    cfg = load_config(write_config(tmp_path, [model_dir("llama"), "org/missing"], text_file))
    out = tmp_path / "out"
    text = dry_run(cfg, out)
    size, _ = model_size(str(model_dir("llama")))
    assert "tiny: 4 cells (nothing stored yet)" in text and "devices: cpu 1024.0 GiB free" in text and "cuda:0" in text
    assert (
        f"llama, {size.n_params:,} params, hidden 32, 2 layers, vocab 384 (from config.json + safetensors headers)"
        in text
    )
    assert "org/missing [" in text and "size unknown (offline)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  perplexity")]
    assert [r[1] for r in rows] == ["fp32", "llm.int8", "fp32", "llm.int8"]
    assert rows[0][-1] == "cpu" and rows[2][-1] == "?"  # fits the CPU, not the 1-byte GPU; unknown size: ?
    assert "'studies run' would stop before any cell" in text
    assert not out.exists()  # a dry run writes nothing

    cfg = load_config(write_config(tmp_path, [model_dir("llama")], text_file))
    run_study(cfg, out, progress=False)
    text = dry_run(cfg, out)
    assert "(states from" in text and "done 2" in text and "pending" not in text.splitlines()[-1]


def test_cli_dry_run_runs_nothing(tmp_path, model_dir, text_file, capsys, monkeypatch):
    monkeypatch.setattr(dryrun, "devices", lambda: [Device("cpu", 1, 1)])  # no room anywhere
    unreadable = tmp_path / "no-config"  # a folder without config.json: shown in the grid, not raised
    unreadable.mkdir()
    path = write_config(tmp_path, [model_dir("llama"), unreadable], text_file)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "no device has that much free" in printed and not (tmp_path / "out").exists()
    assert f"size unknown (could not read the config of {unreadable}" in printed
