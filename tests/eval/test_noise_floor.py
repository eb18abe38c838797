"""The bfloat16 noise floor (outliers.eval.noise_floor): scored as a row, once per model, text and windows,
kept in the cache, rebuilt when the cache file is damaged; ``outliers eval`` prints it unless told not to."""

import json

import pytest
import torch
from helpers import make_model

from outliers.cli import main
from outliers.eval.noise_floor import NOISE_FLOOR, bf16_copy, cached_noise_floor, noise_floor, noise_floor_key
from outliers.eval.perplexity import perplexity
from outliers.eval.rows import ROW_KINDS, RowEvaluator
from outliers.eval.windows import PerplexitySettings

SETTINGS = PerplexitySettings(window=32, max_windows=6, batch_size=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTLIERS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (1000,), generator=torch.Generator().manual_seed(0))


def _counting(ev: RowEvaluator) -> list:
    scored: list = []
    evaluate = ev.evaluate
    ev.evaluate = lambda row: scored.append(row.kind) or evaluate(row)  # type: ignore[method-assign]
    return scored


def test_scored_once_as_a_row_then_read_from_the_cache(ids):
    model = make_model("llama")
    ev = RowEvaluator(model, ids, SETTINGS, progress=False)
    scored = _counting(ev)
    first = noise_floor(ev)
    assert scored == [NOISE_FLOOR] and NOISE_FLOOR in ROW_KINDS and not first.cached and first.seconds > 0
    assert first.n_windows == 6 and first.n_tokens == 6 * 31 and first.skipped is None
    assert first.kl_vs_ref > 0 and first.kld_p99 > 0 and 0 < first.top1_agreement <= 1 and first.delta_p_rms > 0
    # the row is the float model cast to bfloat16, scored against it on the same windows
    by_hand = perplexity(bf16_copy(model), ids, SETTINGS, reference=model, progress=False)
    assert first.kl_vs_ref == pytest.approx(by_hand.kl_vs_ref)
    assert first.delta_p_rms == pytest.approx(by_hand.delta_p_rms)
    again = noise_floor(RowEvaluator(model, ids, SETTINGS, progress=False))
    assert again.cached and again.kl_vs_ref == first.kl_vs_ref and again.seconds == first.seconds
    assert "cached" in again.line() and "KLD p99" in again.line() and "Δp RMS" in again.line()
    other = RowEvaluator(model, ids, PerplexitySettings(window=32, max_windows=4, batch_size=2), progress=False)
    assert not noise_floor(other).cached  # other windows, another noise floor


def test_the_key_follows_weights_tokens_and_windows(ids):
    a, b = make_model("llama", seed=0), make_model("llama", seed=1)
    key = noise_floor_key(a, ids, SETTINGS, model_name="tiny")
    assert key == noise_floor_key(a, ids, SETTINGS, model_name="tiny")
    assert key != noise_floor_key(b, ids, SETTINGS, model_name="tiny")  # the same name, other weights
    assert key != noise_floor_key(a, ids[:-1], SETTINGS, model_name="tiny")
    assert key != noise_floor_key(a, ids, PerplexitySettings(window=32, max_windows=6), model_name="tiny")
    assert key != noise_floor_key(a, ids, SETTINGS, model_name="tiny", weights="ab" * 32)


@pytest.mark.parametrize("damage", ["{ not json", '{"key": 1}', "GARBAGE"], ids=["truncated", "no-fields", "text"])
def test_a_damaged_cache_file_is_rebuilt(ids, cache, capsys, damage):
    model = make_model("llama")
    first = noise_floor(RowEvaluator(model, ids, SETTINGS, progress=False))
    (path,) = (cache / "noise_floor").glob("*.json")
    path.write_text(damage)
    key = noise_floor_key(model, ids, SETTINGS)
    ev = RowEvaluator(model, ids, SETTINGS, progress=False)
    scored = _counting(ev)
    rebuilt = noise_floor(ev)
    assert "damaged" in capsys.readouterr().err and scored == [NOISE_FLOOR]
    assert not rebuilt.cached and rebuilt.kl_vs_ref == first.kl_vs_ref
    assert cached_noise_floor(key).cached and list((cache / "noise_floor").glob(".damaged-*"))


def test_a_cache_file_with_wrong_numbers_is_rebuilt(ids, cache, capsys):
    model = make_model("llama")
    noise_floor(RowEvaluator(model, ids, SETTINGS, progress=False))
    (path,) = (cache / "noise_floor").glob("*.json")
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(stored | {"kl_vs_ref": "0.1"}))
    assert cached_noise_floor(noise_floor_key(model, ids, SETTINGS)) is None
    assert "damaged" in capsys.readouterr().err


def test_a_bfloat16_model_has_none(ids, cache):
    model = make_model("llama").to(torch.bfloat16)
    floor = noise_floor(RowEvaluator(model, ids, SETTINGS, progress=False))
    assert floor.skipped == "n/a: model loaded in bfloat16" and floor.line() == floor.skipped
    assert floor.kl_vs_ref is None and not (cache / "noise_floor").exists()


def test_the_bf16_copy_leaves_the_float_model_alone():
    model = make_model("gpt2")  # ties its head to its embedding
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = bf16_copy(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert copy.lm_head.weight is copy.transformer.wte.weight  # still tied
    assert {p.data_ptr() for p in copy.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())


# ---------------------------------------------------------------- outliers eval


def _eval(model_dir, text_file, out, *extra):
    argv = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32"]
    return main([*argv, "--max-windows", "3", *extra, "--json", str(out), "--quiet"])


def test_eval_prints_the_noise_floor_and_caches_it(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(model_dir, text_file, out, "--method", "llm.int8", "--threshold", "0.5") == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert "noise floor      KL " in printed and "(bf16 vs fp32, same windows;" in printed
    assert "KLD p99" in printed and "Δp RMS" in printed and "KLD median" in printed
    floor = r["noise_floor"]
    assert floor["cached"] is False and floor["n_windows"] == 3 and 0 < floor["top1_agreement"] <= 1
    assert set(r["kld_percentiles"]) == {"50", "90", "95", "99", "99.9", "max"}
    assert set(r["delta_p_percentiles"]) == {"1", "5", "10", "50", "90", "95", "99", "min", "max"}
    assert r["delta_p_rms"] > 0 and r["delta_p_rms_ci95"] and r["kld_percentiles_ci95"]["99"]
    # the table layout: the same noise floor, from the cache, one line below the table
    assert _eval(model_dir, text_file, out, "--method", "fp32,llm.int8", "--threshold", "0.5") == 0
    printed = capsys.readouterr().out
    assert "| KLD p99 |" in printed and "| Δp RMS |" in printed and "bf16 noise floor: KL" in printed
    assert all(rec["noise_floor"]["cached"] for rec in json.loads(out.read_text()))


def test_eval_no_noise_floor_skips_it(model_dir, text_file, tmp_path, capsys, cache, monkeypatch):
    import outliers.eval.noise_floor as nf

    monkeypatch.setattr(nf, "noise_floor", lambda *a, **k: pytest.fail("no noise floor was asked for"))
    out = tmp_path / "r.json"
    assert _eval(model_dir, text_file, out, "--method", "llm.int8", "--no-noise-floor") == 0
    assert "noise floor" not in capsys.readouterr().out and json.loads(out.read_text())["noise_floor"] is None
    assert _eval(model_dir, text_file, out) == 0  # nothing compared with the float model: nothing to set beside
    assert "noise floor" not in capsys.readouterr().out and json.loads(out.read_text())["noise_floor"] is None
    assert not (cache / "noise_floor").exists()


def test_eval_of_a_bfloat16_model_says_why_there_is_none(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(model_dir, text_file, out, "--method", "llm.int8", "--dtype", "bfloat16") == 0
    assert "noise floor      n/a: model loaded in bfloat16" in capsys.readouterr().out
    assert json.loads(out.read_text())["noise_floor"]["skipped"] == "n/a: model loaded in bfloat16"
