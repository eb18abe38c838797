"""Super weights (outliers.analysis.superweights, superweight_effects): planted weights on tiny in-process models,
the model left bit-identical, the control, the CLI and the study measure."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import hook_count, make_model
from superweight_support import BLOCK, COL, ROW, W, ids, planted, same, snapshot
from torch import nn

from outliers import InvalidArgumentError
from outliers.analysis.superweight_effects import control_coords, super_weight_effects
from outliers.analysis.superweights import down_projections, super_weights, zeroed
from outliers.arch.linear import weight_of
from outliers.cli import main


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planted_super_weight_is_found_at_its_coordinates(arch):
    model = planted(arch)
    snap = snapshot(model)
    res = super_weights(model, ids(), window=W, max_windows=2)
    assert [w.coord for w in res.weights] == [(BLOCK, ROW, COL)]
    sw = res.weights[0]
    assert sw.value == 50.0 and sw.dim == ROW and sw.massive and sw.massive_dim == ROW
    assert abs(sw.activation) == pytest.approx(float(res.spikes.out_max[BLOCK]))
    assert res.spikes.ratio[BLOCK] >= 50 and (res.spikes.drop(index=BLOCK).ratio < 50).all()
    assert res.stop.startswith("no block's output max") and same(model, snap)
    d = res.to_dict()
    assert {"block", "row", "col", "value"} <= set(d["super_weights"][0])
    assert len(d["spikes"]) == 4 and res.n_windows == 2


def test_none_found_on_an_unplanted_model():
    res = super_weights(make_model("llama"), ids(), window=W, max_windows=2)
    assert res.weights == () and res.stop.startswith("no block's output max")
    assert res.spikes.columns.tolist()[:5] == ["block", "in_max", "in_channel", "out_max", "out_channel"]
    assert res.spikes.block.tolist() == [0, 1] and (res.spikes.ratio < 50).all()


def test_repeats_stop_and_max_found():
    model = planted()
    with torch.no_grad():  # another weight reads COL: with W[ROW, COL] zeroed, row ROW - 1 still spikes
        weight_of(down_projections(model)[BLOCK][1])[ROW - 1, COL] = 40.0
    res = super_weights(model, ids(), window=W, max_windows=2, max_found=4)
    assert [w.coord for w in res.weights] == [(BLOCK, ROW, COL), (BLOCK, ROW - 1, COL)]
    one = super_weights(model, ids(), window=W, max_windows=2, max_found=1)
    assert len(one.weights) == 1 and one.stop.startswith("max_found")


def test_effects_zeroed_restored_and_the_model_is_unchanged():
    model = planted()
    snap = snapshot(model)
    found = super_weights(model, ids(), window=W, max_windows=2)
    eff = super_weight_effects(model, ids(), found.weights, window=W, max_windows=4, control_k=10, progress=False)
    assert same(model, snap) and eff.zeroed is not None and eff.restored is not None
    assert eff.zeroed.ppl != eff.original.ppl and eff.original.delta_ppl_pct == pytest.approx(0, abs=1e-9)
    d = eff.to_dict()
    for key in ("ppl", "ppl_zeroed", "ppl_restored", "ppl_control", "delta_ppl_pct_zeroed_ci95", "ppl_control_ci95"):
        assert d[key] is not None, key
    assert d["control_k"] == 10 and eff.restored_positions > 0
    # restoring every position of the row (fraction -> 0) gives the original model back
    full = super_weight_effects(
        model, ids(), found.weights, window=W, max_windows=4, control_k=0, restore_fraction=1e-30, progress=False
    )
    assert full.restored is not None and full.restored.ppl == pytest.approx(full.original.ppl, rel=1e-5)
    assert full.restored_positions == 4 * W and same(model, snap)
    none = super_weight_effects(model, ids(), [], window=W, max_windows=2, control_k=5, progress=False)
    assert none.zeroed is None and none.to_dict()["ppl_zeroed"] is None and none.control.ppl > 0


def test_model_restored_when_the_forward_raises():
    model = planted()
    snap, hooks = snapshot(model), hook_count(model)
    calls = {"n": 0, "ok": 1}  # forwards that pass before it raises

    def boom(module, args, out):
        calls["n"] += 1
        if calls["n"] > calls["ok"]:
            raise RuntimeError("boom")

    handle = model.model.layers[3].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        super_weights(model, ids(), window=W, max_windows=1)
    assert same(model, snap) and hook_count(model) == hooks + 1
    weights = super_weights(planted(), ids(), window=W, max_windows=1).weights
    assert [w.coord for w in weights] == [(BLOCK, ROW, COL)]
    for ok in (2, 3):  # the original model runs twice (scored and reference); then zeroed, then restored
        calls.update(n=0, ok=ok)
        with pytest.raises(RuntimeError, match="boom"):
            super_weight_effects(model, ids(), weights, window=W, max_windows=1, control_k=3, progress=False)
        assert same(model, snap) and hook_count(model) == hooks + 1
    handle.remove()
    assert same(model, snap) and hook_count(model) == hooks


def test_control_zeroes_exactly_k_other_weights():
    model = planted()
    snap = snapshot(model)
    k = 25
    coords = control_coords(model, [(BLOCK, ROW, COL)], k)
    assert len(set(coords)) == k and (BLOCK, ROW, COL) not in coords
    downs = dict(down_projections(model))
    mags = sorted((abs(float(weight_of(downs[b])[r, c])) for b, r, c in coords), reverse=True)
    rest = torch.cat([weight_of(m).abs().flatten() for _, m in downs.items()])
    assert mags[-1] >= float(rest.sort(descending=True).values[k + 1])  # the k largest, the super weight aside
    before = torch.cat([weight_of(m).flatten().clone() for m in downs.values()])
    with zeroed(model, coords):
        after = torch.cat([weight_of(m).flatten().clone() for m in downs.values()])
        assert int((before != after).sum()) == k and float(weight_of(downs[BLOCK])[ROW, COL]) == 50.0
    assert same(model, snap)
    with pytest.raises(InvalidArgumentError, match="control_k must be in"):
        control_coords(model, [], 10**9)


def test_bad_arguments_and_families_without_a_down_projection():
    model = make_model("llama")
    for kw, message in (({"jump": 1.0}, "jump must be > 1"), ({"window": 1}, "window must be >= 2")):
        with pytest.raises(InvalidArgumentError, match=message):
            super_weights(model, ids(), **kw)

    class Odd(nn.Module):
        config = SimpleNamespace(model_type="no-such-family")

    with pytest.raises(InvalidArgumentError, match="names no MLP down projection"):
        super_weights(Odd(), ids(), window=W)


def test_cli_json(model_dir, text_file, tmp_path, capsys):
    path = tmp_path / "sw.json"
    args = ["superweights", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", str(W)]
    assert main([*args, "--max-windows", "2", "--control-k", "5", "--json", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "none found" in printed and "out_channel" in printed and "largest_down_5" in printed
    d = json.loads(path.read_text())
    keys = {"super_weights", "ppl", "ppl_zeroed", "ppl_restored", "ppl_control", "control_k", "spikes", "ppl_ci95"}
    assert keys <= set(d) and d["super_weights"] == [] and d["ppl_zeroed"] is None and d["control_k"] == 5
    assert d["ppl_control"] > 0 and len(d["delta_ppl_pct_control_ci95"]) == 2 and len(d["spikes"]) == 2
    # nothing to match and no massive dim without a candidate: those two controls say so, the others run
    matched, paper, outside, largest = d["controls"]
    assert matched["ppl"] is None and matched["note"] == "no candidate to match" and outside["ppl"] is None
    assert paper["n_weights"] == 2 * 7 and paper["ppl"] > 0 and largest["ppl"] == d["ppl_control"]
    assert d["n_super_weights"] == 0 and d["n_perplexity_runs"] == 3
    assert main(["superweights", "--model", "no-such-model", "--json", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err  # refused before loading


def test_study_measure(model_dir, text_file, tmp_path):
    from studies.config import as_tables, parse_config
    from studies.report import write_report
    from studies.runner import run_study
    from studies.store import Store

    study = {"name": "sw", "models": [str(model_dir("gpt2"))], "corpora": [str(text_file)], "window": W}
    plain = parse_config({"study": study})
    assert not any(k.startswith("superweight") for k in as_tables(plain)["study"])  # other study.json unchanged
    with pytest.raises(InvalidArgumentError, match="superweight_windows must be"):
        parse_config({"study": {**study, "superweight_windows": 0}})
    with pytest.raises(InvalidArgumentError, match="superweight_seeds must be"):
        parse_config({"study": {**study, "superweight_seeds": 0}})
    cfg = parse_config(
        {"study": {**study, "measure": ["superweights"], "superweight_windows": 2, "superweight_control_k": 4}}
    )
    out = tmp_path / "out"
    counts = run_study(cfg, out, progress=False)
    row = Store(out).frame().iloc[0]
    assert counts["done"] == 1, row.error
    res = row.result
    assert row.kind == "superweights" and row.n_tokens == 2 * (W - 1) and res["n_windows"] == 2
    assert res["control_k"] == 4 and res["ppl"] > 0 and res["ratio_control"] > 0
    assert res["n_super_weights"] == 0 and res["first"] is None and res["ratio_zeroed"] is None
    assert res["n_candidates"] == 0 and res["verdicts"] == [] and res["seeds"] == 10 and res["min_effect"] == 100
    assert [c["name"] for c in res["controls"]] == ["matched", "paper", "outside_massive", "largest_down_4"]
    assert res["ratio_matched"] is None and res["ratio_outside_massive"] is None and res["ratio_paper"] > 0
    text = write_report(out).read_text()
    assert "## Super weights" in text and (out / "superweights.csv").exists()
    assert "The matched control is the fair one" in text
    assert "| none |" in (out / "superweights.md").read_text()


@pytest.mark.parametrize("k", [1, 7, 60, 400])
def test_control_coords_stream_equals_one_sort_of_everything_ties_included(k):
    # weights on a coarse grid, as a 4-bit GGUF leaves them: many equal magnitudes at every boundary
    model = make_model("llama")
    with torch.no_grad():
        for _, m in down_projections(model):
            w = weight_of(m)
            w.copy_(torch.round(w * 40) / 40)
    downs = down_projections(model)
    excl = [(downs[0][0], 0, 0), (downs[-1][0], 1, 2)]
    flat = torch.cat([weight_of(m).abs().flatten() for _, m in downs])
    starts = [0]
    for _, m in downs:
        starts.append(starts[-1] + weight_of(m).numel())
    for b, r, c in excl:
        i = [bb for bb, _ in downs].index(b)
        flat[starts[i] + r * weight_of(downs[i][1]).shape[1] + c] = -1.0
    want = []
    for j in torch.sort(flat, descending=True, stable=True).indices[:k].tolist():
        i = max(n for n in range(len(downs)) if starts[n] <= j)
        want.append((downs[i][0], *divmod(j - starts[i], weight_of(downs[i][1]).shape[1])))
    assert control_coords(model, excl, k) == want
