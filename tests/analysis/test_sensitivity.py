import json

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from outliers import InvalidArgumentError
from outliers.analysis.sensitivity import (
    quantization_units,
    sensitivity,
    spearman,
    spearman_halves,
    spearman_interval,
)
from outliers.cli import main
from outliers.eval.windows import PerplexitySettings
from outliers.quant.model import quantized_copy

SETTINGS = PerplexitySettings(window=32, max_windows=8, batch_size=4)


def ids(n=2000, seed=0):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


def planted(layers=4, block=2, gain=1000.0):
    """A Llama whose block ``block`` has one MLP activation ``gain`` x the rest, the down projection's column
    divided by as much: the float model computes the same function, but a per-tensor int8 scale of that
    block's down_proj input leaves every other activation at zero."""
    model = make_model("llama", layers=layers)
    mlp = model.model.layers[block].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= gain
        mlp.down_proj.weight[:, 5] /= gain
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma", "gpt_neox"])
def test_the_replayed_sweep_is_bit_identical_to_the_naive_one(arch):
    model = make_model(arch, layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(progress=False, predictors=False, mixed=False)
    fast = sensitivity(model, ids(), SETTINGS, "absmax", **kw)
    slow = sensitivity(model, ids(), SETTINGS, "absmax", replay=False, **kw)
    assert np.array_equal(fast.window_kl, slow.window_kl) and np.array_equal(fast.window_nll, slow.window_nll)
    assert fast.ranking == slow.ranking and fast.seconds["forwards"] == slow.seconds["forwards"]
    assert hook_count(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_replay_is_exact_after_a_transform_and_a_low_bit_method_keeps_units_at_8_bits():
    from outliers.quant.transform_spec import Transform

    model = make_model("llama", layers=3)
    kw = dict(transform=Transform(rotate="hadamard"), progress=False, predictors=False)
    fast = sensitivity(model, ids(), SETTINGS, "absmax", random_draws=1, **kw)
    slow = sensitivity(model, ids(), SETTINGS, "absmax", replay=False, mixed=False, **kw)
    assert np.array_equal(fast.window_kl, slow.window_kl) and fast.transform == "hadamard"
    low = sensitivity(model, ids(), SETTINGS, "w4a16-g128", progress=False, predictors=False, random_draws=0)
    assert low.mixed["keep"] == "absmax-vector"


def test_a_unit_alone_scores_as_perplexity_scores_that_model():
    from outliers.eval.perplexity import perplexity
    from outliers.quant.model import _set_module

    model = make_model("llama", layers=3)
    r = sensitivity(model, ids(), SETTINGS, "absmax", progress=False, predictors=False, mixed=False)
    u = next(u for u in r.units if u.unit == "block 1")
    q, _ = quantized_copy(model, "absmax")
    mixed, _ = quantized_copy(model, "absmax", skip=("lm_head",))
    float_modules = dict(model.named_modules())
    for name, _ in list(mixed.named_modules()):  # back to float outside block 1
        if name in float_modules and name.endswith("_proj") and ".layers.1." not in name:
            _set_module(mixed, name, float_modules[name])
    p = perplexity(mixed, ids(), SETTINGS, reference=model, progress=False)
    assert p.kl_vs_ref == pytest.approx(u.kl_vs_ref, rel=1e-5)
    assert p.delta_ppl_pct == pytest.approx(u.delta_ppl_pct, rel=1e-4, abs=1e-6)


def test_a_planted_sensitive_block_ranks_first_and_keeping_it_helps_most():
    model = planted()
    r = sensitivity(model, ids(), SETTINGS, "absmax", progress=False, random_draws=4, ks=(0, 1))
    assert r.ranking[0] == "block 2"
    top = next(u for u in r.units if u.unit == "block 2")
    assert top.kl_vs_ref_ci95[0] > max(u.kl_vs_ref_ci95[1] for u in r.units if u.unit != "block 2")
    assert top.kl_share > 0.5 and top.rank == 1
    k0, k1 = r.mixed["points"]
    assert k1["kept"] == ["block 2"] and k1["ranked_kl"] < 0.5 * k0["ranked_kl"]
    assert k1["random_minus_ranked"] > 0
    # the input's crest factor sees the planted activation: the block with it is the top by that predictor
    assert max(r.units, key=lambda u: u.predictors["input_crest"]).unit == "block 2"
    d = json.loads(json.dumps(r.to_dict()))
    assert {"unit", "block", "kl_vs_ref", "kl_vs_ref_ci95", "delta_ppl_pct", "delta_ppl_pct_ci95"} <= set(d["units"][0])
    assert d["ranking"][0] == "block 2" and "spearman_halves" in d and "spearman_halves_ci95" in d


def test_units_group_the_quantized_linears():
    model = make_model("llama", layers=2)
    _, report = quantized_copy(model, "absmax")
    blocks = quantization_units(model, report.replaced, "block")
    linears = quantization_units(model, report.replaced, "linear")
    kinds = quantization_units(model, report.replaced, "kind")
    assert [u.name for u in blocks] == ["block 0", "block 1"] and len(linears) == 14
    assert {u.name for u in kinds} >= {"mlp.down_proj", "self_attn.q_proj"} and len(kinds) == 7
    assert all(u.block == 0 and len(u.modules) == 2 for u in kinds)
    with pytest.raises(InvalidArgumentError, match="unknown unit"):
        quantization_units(model, report.replaced, "head")


def test_an_exact_predictor_has_rho_one_and_a_reversed_one_minus_one():
    kl = np.array([0.3, 0.01, 0.2, 0.05, 0.9, 0.4])
    rho, ci = spearman_interval(np.log(kl), kl)
    assert rho == pytest.approx(1.0) and ci == pytest.approx((1.0, 1.0))
    assert spearman_interval(-kl, kl)[0] == pytest.approx(-1.0)
    assert spearman_interval(kl[:2], kl[:2]) == (None, None)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 30).astype(float), rng.normal(size=30)
    assert float(spearman(a, b)) == pytest.approx(spearmanr(a, b).statistic)


def test_halves_agree_when_the_units_differ_more_than_the_windows():
    rng = np.random.default_rng(1)
    level = np.array([1.0, 2.0, 4.0, 8.0, 16.0])[:, None]
    window_kl = level * rng.uniform(0.9, 1.1, size=(5, 12)) * 100
    rho, ci = spearman_halves(window_kl, np.full(12, 100))
    assert rho == pytest.approx(1.0) and ci[0] > 0.5
    noise = rng.uniform(0, 1, size=(5, 12))
    rho, ci = spearman_halves(noise, np.full(12, 100))
    assert ci[0] < 0.5  # pure noise: no stable ranking
    assert spearman_halves(window_kl[:, :3], np.full(3, 100)) == (None, None)


def test_bad_arguments():
    model = make_model("llama", layers=2)
    with pytest.raises(InvalidArgumentError):
        sensitivity(model, ids(), SETTINGS, "no-such-method", progress=False)
    with pytest.raises(InvalidArgumentError, match="unit"):
        sensitivity(model, ids(), SETTINGS, "absmax", unit="head", progress=False)


def test_cli_prints_the_ranking_and_writes_json(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s.json"
    args = ["sensitivity", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32"]
    args += ["--max-windows", "6", "--method", "absmax", "--random", "2", "--quiet", "--json", str(out)]
    args += ["--out", str(tmp_path / "fig"), "--predictor-windows", "1", "--unit", "linear"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "most sensitive linears" in printed and "stability" in printed and "mixed precision" in printed
    d = json.loads(out.read_text())
    assert len(d["units"]) == 14 and d["ranking"] and d["mixed"]["points"]
    assert (tmp_path / "fig" / "sensitivity.png").stat().st_size > 1000
    assert main(["sensitivity", "--ks", "a,b"]) == 2
