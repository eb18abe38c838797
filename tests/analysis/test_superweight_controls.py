"""Super-weight controls and verdicts (outliers.analysis.superweight_controls, superweight_verdicts): which weights
each control zeroes, on tiny seeded models with planted weights, and the effect-based verdict end to end."""

import json

import pytest
import torch
from helpers import hook_count, make_model
from superweight_support import BLOCK, COL, ROW, W, ids, planted, same, snapshot

from outliers import InvalidArgumentError
from outliers.analysis.superweight_controls import (
    ControlSettings,
    block_linears,
    down_places,
    massive_places,
    matched_bands,
    matched_draw,
    outside_massive_places,
    paper_places,
    touching,
    zeroed_places,
)
from outliers.analysis.superweight_effects import super_weight_effects
from outliers.analysis.superweight_verdicts import FAIR_WHY, judge
from outliers.analysis.superweights import SuperWeight, down_projections, super_weights
from outliers.arch.linear import weight_of
from outliers.cli import main


def _sw(block=BLOCK, row=ROW, col=COL, value=50.0):
    return SuperWeight(block, row, col, value, 1000.0, 20.0, row, row, True)


def _down(model, block=BLOCK):
    return weight_of(dict(down_projections(model))[block])


def _with_near(model, values, places):
    """Set block BLOCK's down projection: W[ROW, COL] = 50 and ``values`` at ``places``."""
    with torch.no_grad():
        w = _down(model)
        w[ROW, COL] = 50.0
        for v, (r, c) in zip(values, places, strict=True):
            w[r, c] = v
    return model


# six weights within 5 % of 50 (both signs) outside row ROW and column COL, four at 46 (within 10 %), and
# weights of |w| = 50 in the super weight's row and column that a matched draw must never take
NEAR = [(0, 0), (1, 2), (7, 3), (10, 20), (20, 40), (31, 63)]
WIDER = [(2, 1), (3, 4), (11, 12), (30, 50)]
BARRED = [(ROW, 0), (ROW, 30), (4, COL), (30, COL)]


def _matched_model():
    values = [50.0, -49.0, 51.5, -48.0, 52.0, 50.5] + [46.0, -46.0, 46.5, -46.2] + [50.0, -50.0, 50.0, 49.9]
    return _with_near(make_model("llama", layers=4), values, NEAR + WIDER + BARRED)


def test_matched_draws_one_weight_per_super_weight_in_band_outside_its_row_and_column():
    model = _matched_model()
    sw = [_sw()]
    bands, pools = matched_bands(model, sw, ControlSettings(seeds=5))
    assert not bands[0].widened and bands[0].band == 0.05 and bands[0].pool == len(NEAR) == len(pools[0])
    draws = [matched_draw(model, sw, pools, seed) for seed in range(20)]
    assert all(len(d) == 1 and d[0][0] == BLOCK for d in draws)
    assert {tuple(d[0][1:]) for d in draws} <= set(NEAR) and len({d[0] for d in draws}) > 2
    assert draws[:5] == [matched_draw(model, sw, pools, seed) for seed in range(5)]  # deterministic by seed
    # ten seeds: six within 5 % are too few, so the band widens to the narrowest that holds ten: 8 %, the four
    # at 46 (|-46| too) and 46.2 are in, no other weight (all near 0) and none of the barred 50s
    bands, pools = matched_bands(model, sw, ControlSettings(seeds=10))
    assert bands[0].widened and bands[0].band == pytest.approx(0.08) and bands[0].pool == len(NEAR + WIDER)
    w = _down(model)
    for seed in range(30):
        (_, r, c), *_ = matched_draw(model, sw, pools, seed)
        assert r != ROW and c != COL and abs(abs(float(w[r, c])) - 50) <= 0.08 * 50 + 1e-4


def test_matched_draws_distinct_weights_for_two_super_weights_of_one_matrix():
    model = _matched_model()
    sw = [_sw(), _sw(row=ROW - 1, col=COL + 1, value=49.0)]
    with torch.no_grad():
        _down(model)[ROW - 1, COL + 1] = 49.0
    bands, pools = matched_bands(model, sw, ControlSettings(seeds=3))
    for seed in range(10):
        d = matched_draw(model, sw, pools, seed)
        assert len(set(d)) == 2 and all(r not in (ROW, ROW - 1) and c not in (COL, COL + 1) for _, r, c in d)


def test_paper_takes_the_top_of_every_linear_at_least_one_without_the_super_weights():
    model = _matched_model()
    linears = block_linears(model)
    assert len(linears) == 4 * 7  # q, k, v, o, gate, up, down in each of four blocks
    places = paper_places(model, [_sw()], 1e-6)
    assert len(places) == len(linears) and {p[0] for p in places} == {name for _, name, _, _ in linears}
    down = down_places(model, [(BLOCK, ROW, COL)])[0]
    assert down not in places  # the largest of its linear, left out: the next largest is taken instead
    for name, r, c in places:
        w = weight_of(model.get_submodule(name)).abs()
        if name == down[0]:
            w[ROW, COL] = 0
        assert float(w[r, c]) == float(w.max())
    # a fraction that takes two of each MLP linear (2048 weights) and one of the smaller attention linears
    two = paper_places(model, [_sw()], 1 / 1024)
    for _, name, _, m in linears:
        assert sum(p[0] == name for p in two) == (2 if weight_of(m).numel() == 2048 else 1)


def test_outside_massive_leaves_out_the_massive_rows_and_columns():
    model = make_model("llama", layers=4)
    sw = [_sw()]
    big = {  # the largest weights of the model, each in a massive place
        "model.layers.2.self_attn.o_proj": (ROW, 3),  # a residual writer's massive row
        "model.layers.0.mlp.down_proj": (ROW, 7),
        "model.layers.3.self_attn.q_proj": (4, ROW),  # a residual reader's massive column
        "model.layers.1.mlp.up_proj": (COL, 2),  # the super weight's input channel, made by up/gate
        "model.layers.1.mlp.down_proj": (0, COL),  # ... and read by its down projection
    }
    with torch.no_grad():
        for name, (r, c) in big.items():
            weight_of(model.get_submodule(name))[r, c] = 100.0
    massive = massive_places(model, sw)
    assert massive["model.layers.0.self_attn.o_proj"] == ({ROW}, set())
    assert massive["model.layers.0.self_attn.k_proj"] == (set(), {ROW})
    assert massive["model.layers.1.mlp.gate_proj"] == ({COL}, {ROW})
    assert massive["model.layers.1.mlp.down_proj"] == ({ROW}, {COL})
    assert massive["model.layers.2.mlp.down_proj"] == ({ROW}, set())
    k = 28
    places = outside_massive_places(model, sw, k)
    assert len(places) == k and touching(massive, places) == 0
    assert not {(n, r, c) for n, (r, c) in big.items()} & set(places)
    # the k largest of everything eligible, by brute force
    pool = []
    for _, name, _, m in block_linears(model):
        rows, cols = massive[name]
        w = weight_of(m).abs()
        pool += [(float(w[r, c]), name, r, c) for r in range(w.shape[0]) for c in range(w.shape[1])]
        pool = [p for p in pool if not (p[1] == name and (p[2] in rows or p[3] in cols))]
    want = sorted(pool, key=lambda p: -p[0])[:k]
    assert sorted(places) == sorted((n, r, c) for _, n, r, c in want)
    assert touching(massive, [(n, r, c) for n, (r, c) in big.items()]) == len(big)
    assert massive_places(model, []) == {} and len(outside_massive_places(model, [], 5)) == 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zeroed_places_zero_exactly_those_and_restore_them(arch):
    model = make_model(arch)
    snap = snapshot(model)
    places = paper_places(model, [], 1e-6)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    with zeroed_places(model, places):
        for name, r, c in places:
            assert float(weight_of(model.get_submodule(name))[r, c]) == 0
        after = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        assert int((before != after).sum()) == len(places)
    assert same(model, snap)
    with pytest.raises(RuntimeError, match="boom"), zeroed_places(model, places):
        raise RuntimeError("boom")
    assert same(model, snap)


def test_control_settings_refuse_bad_values():
    for kw in ({"seeds": 0}, {"band": 0}, {"band": 1.5}, {"paper_fraction": 0}, {"largest_k": -1}):
        with pytest.raises(InvalidArgumentError):
            ControlSettings(**kw)


def _effective(model):
    """The planted super weight made to matter: on a corpus of one token T (85 %), whose block-1 unit fires, the
    head reads T's logit from ROW alone, so the massive activation predicts T and zeroing it loses that."""
    seen = {}
    handle = dict(down_projections(model))[BLOCK].register_forward_hook(lambda m, a, o: seen.update(o=o[:, -1, ROW]))
    with torch.no_grad():
        model(input_ids=torch.arange(384)[:, None].expand(384, 8))
    handle.remove()
    t = int(seen["o"].abs().argmax())
    g = torch.Generator().manual_seed(1)
    text = torch.full((200,), t)
    noise = torch.rand(200, generator=g) < 0.15
    text[noise] = torch.randint(0, 384, (int(noise.sum()),), generator=g)
    with torch.no_grad():
        model.lm_head.weight[:, ROW] = 0
        model.lm_head.weight[t, ROW] = 3 * float(seen["o"][t].sign())
    return text


def test_verdict_super_weight_for_a_planted_effect_and_spike_without_one():
    settings = ControlSettings(seeds=3, largest_k=10)
    model = planted()
    text = _effective(model)
    snap, hooks = snapshot(model), hook_count(model)
    found = super_weights(model, text, window=W, max_windows=2)
    assert [w.coord for w in found.weights] == [(BLOCK, ROW, COL)]
    eff = super_weight_effects(model, text, found.weights, window=W, max_windows=4, controls=settings, progress=False)
    assert same(model, snap) and hook_count(model) == hooks
    (v,) = eff.verdicts
    assert v.verdict == "super_weight" and v.result is eff.zeroed and v.bar == max(eff.controls[0].seed_deltas)
    d = eff.to_dict()
    assert [c["name"] for c in d["controls"]] == ["matched", "paper", "outside_massive", "largest_down_10"]
    matched = d["controls"][0]
    assert matched["n_weights"] == 1 and len(matched["seeds"]) == 3 and matched["widened"]
    assert matched["bands"][0]["band"] > 0.05 and "band widened from 5 % to" in matched["note"]
    assert matched["spread"]["min"] <= matched["delta_ppl_pct"] <= matched["spread"]["max"]
    assert d["controls"][1]["n_weights"] == 28 and d["controls"][2]["n_weights"] == 28
    for c in d["controls"]:
        assert {"ppl", "delta_ppl_pct", "delta_ppl_pct_ci95"} <= set(c) and c["ppl"] > 0
    assert d["super_weights"][0]["verdict"] == "super_weight" and d["n_super_weights"] == 1
    assert d["super_weights"][0]["delta_ppl_pct"] >= 100 and d["fair_control"] == "matched"
    assert eff.n_runs == 1 + 2 + 3 + 3 and set(eff.seconds) >= {"original", "matched", "paper", "total"}
    html = eff._repr_html_()
    assert "matched (fair)" in html and "super_weight" in html and "cost: 9 perplexity runs" in html
    # a higher bar than the effect makes it a spike, with the reason
    verdict, why = judge(eff.zeroed, v.bar, 1e9)
    assert verdict == "spike" and why.startswith("Δppl +") and "< 1e+09 %" in why
    assert judge(eff.zeroed, eff.zeroed.delta_ppl_pct_ci95[0], 100)[0] == "spike"  # the bar at its lower end

    # two spikes on random text: each zeroed alone moves perplexity by a few %, so both stay spikes
    model = planted()
    with torch.no_grad():
        _down(model)[ROW - 1, COL] = 40.0
    found = super_weights(model, ids(), window=W, max_windows=2)
    assert len(found.weights) == 2
    eff = super_weight_effects(model, ids(), found.weights, window=W, max_windows=4, controls=settings, progress=False)
    assert [v.verdict for v in eff.verdicts] == ["spike", "spike"] and eff.n_runs == 1 + 2 + 2 + 3 + 3
    assert all(v.alone and v.result is not eff.zeroed for v in eff.verdicts)
    assert all(abs(v.result.delta_ppl_pct) < 100 for v in eff.verdicts)
    assert [(b["row"], b["col"]) for b in eff.controls[0].extra["bands"]] == [(ROW, COL), (ROW - 1, COL)]


def test_cli_controls_verdicts_and_spike_only(tokenizer, text_file, tmp_path, capsys):
    folder = tmp_path / "planted"
    planted().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "sw.json"
    args = ["superweights", "--model", str(folder), "--corpus", str(text_file), "--window", str(W), "--quiet"]
    assert main([*args, "--max-windows", "2", "--seeds", "2", "--control-k", "5", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "matched (fair)" in printed and "fair control: matched is the fair control" in printed
    assert "running 8 perplexities" in printed and "cost: 8 perplexity runs" in printed
    d = json.loads(path.read_text())
    assert [c["name"] for c in d["controls"]] == ["matched", "paper", "outside_massive", "largest_down_5"]
    assert len(d["controls"][0]["seeds"]) == 2 and {"min", "max", "sd"} <= set(d["controls"][0]["spread"])
    assert [w["verdict"] for w in d["super_weights"]] == ["spike"] and d["fair_control_why"] == FAIR_WHY
    assert main([*args, "--spike-only", "--json", str(path)]) == 0
    assert "--spike-only: no perplexity" in capsys.readouterr().out
    d = json.loads(path.read_text())
    assert d["super_weights"][0]["verdict"] == "spike" and "ppl" not in d and "controls" not in d
    assert main([*args, "--seeds", "0"]) == 2 and "seeds must be >= 1" in capsys.readouterr().err
