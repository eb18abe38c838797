"""Caches that heal: every file the toolkit keeps under $OUTLIERS_CACHE, damaged the way a full disk or a
killed process leaves it, is moved aside with a one-line warning and rebuilt, and the next command gives
the same numbers as a clean cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_atomic import write_llama_gguf

from outliers.cli import main


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x8f not what was written \x00" * max(1, p.stat().st_size // 26))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "empty": _empty}


@pytest.fixture
def cached_run(tmp_path, tokenizer, text_file, monkeypatch, capsys):
    """Run ``outliers eval`` on a tiny GGUF with a cache of its own; return (run, cache folder)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OUTLIERS_CACHE", str(cache))
    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, tokenizer)
    out = tmp_path / "r.json"

    def run() -> tuple[dict, str]:
        argv = ["eval", "--model", str(gguf), "--corpus", str(text_file), "--window", "32", "--max-windows", "3"]
        argv += ["--method", "llm.int8", "--threshold", "0.5", "--json", str(out), "--quiet"]
        assert main(argv) == 0, capsys.readouterr().err
        r = json.loads(out.read_text())
        return {k: r[k] for k in ("ppl", "nll", "kl_vs_ref", "window_nll")}, capsys.readouterr().err

    return run, cache


def _one(folder: Path, pattern: str) -> Path:
    (found,) = [p for p in folder.glob(pattern) if not p.name.startswith(".")]
    return found


def _check_healed(run, clean: dict, target: Path) -> None:
    got, err = run()
    assert got == clean
    warnings = [line for line in err.splitlines() if "was damaged" in line]
    assert len(warnings) == 1 and target.name in warnings[0], err
    assert any(p.name.startswith(f".damaged-{target.name}") for p in target.parent.iterdir())


@pytest.mark.parametrize("how", list(DAMAGE))
def test_token_ids(cached_run, how):
    run, cache = cached_run
    clean, _ = run()
    npy = _one(cache / "tokens", "*.npy")
    DAMAGE[how](npy)
    _check_healed(run, clean, npy)
    assert run()[1].count("was damaged") == 0  # the rebuilt file is read back as it is


def test_token_ids_outside_the_vocabulary(cached_run):
    import numpy as np

    run, cache = cached_run
    clean, _ = run()
    npy = _one(cache / "tokens", "*.npy")
    np.save(npy, np.full(10, 10**6, dtype=np.int32))  # a whole file, but not this tokenizer's ids
    _check_healed(run, clean, npy)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_file_facts_database(cached_run, how):
    run, cache = cached_run
    clean, _ = run()
    db = cache / "file_facts.sqlite"
    DAMAGE[how](db)
    _check_healed(run, clean, db)


def test_empty_file_facts_database_is_a_new_one(cached_run):
    run, cache = cached_run
    clean, _ = run()
    _empty(cache / "file_facts.sqlite")
    got, err = run()
    assert got == clean and "was damaged" not in err  # sqlite reads an empty file as an empty database


@pytest.mark.parametrize(
    "what, how",
    [
        ("model.safetensors", "truncated"),
        ("model.safetensors", "garbage"),
        ("model.safetensors", "empty"),
        ("config.json", "garbage"),
        ("model.safetensors", "missing"),  # a half-written folder
        ("outliers_source.json", "missing"),
        ("outliers_source.json", "garbage"),
    ],
)
def test_converted_model(cached_run, what, how):
    run, cache = cached_run
    clean, _ = run()
    folder = _one(cache / "models", "*")
    f = folder / what
    f.unlink() if how == "missing" else DAMAGE[how](f)
    _check_healed(run, clean, folder)
    assert run()[1].count("was damaged") == 0


def test_converted_model_that_verifies_but_fails_to_load_is_rebuilt(cached_run, monkeypatch):
    # damage the manifest's checks cannot see (here: a config whose hash is recorded as it now is)
    from outliers.fingerprint import record_sha256

    run, cache = cached_run
    clean, _ = run()
    folder = _one(cache / "models", "*")
    config = folder / "config.json"
    config.write_text("{ this is not json")
    manifest = json.loads((folder / "outliers_source.json").read_text())
    manifest["files"]["config.json"] = {"size": config.stat().st_size, "sha256": "x" * 64}
    (folder / "outliers_source.json").write_text(json.dumps(manifest))
    record_sha256(config, "x" * 64)
    _check_healed(run, clean, folder)


def test_damaged_choice_of_int8_gemm(cached_run, monkeypatch):
    from outliers.quant import gemm

    run, cache = cached_run
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "_choice", None)
    clean, _ = run()
    choice = _one(cache / "int8_gemm", "*.json")
    _truncate(choice)
    monkeypatch.setattr(gemm, "_choice", None)  # a new process reads the file again
    _check_healed(run, clean, choice)
