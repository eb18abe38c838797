"""The outlier lifecycle (outliers.analysis.lifecycle, lifecycle_edits, lifecycle_plots): a chain planted in a tiny
Llama is recovered link by link, and the edits act on it as causes should: clamping the massive dim removes the
planted sink, the control clamp does not, zeroing the super weight removes the activation and restoring it brings
everything back. The model is bit-identical afterwards."""

import math

import pytest
import torch
from helpers import CHAIN, chain_ids, hook_count, make_model, planted_chain

from outliers import InvalidArgumentError
from outliers.analysis.lifecycle import FIELDS, TraceSettings, row_field, trace
from outliers.analysis.lifecycle_edits import EDITS, Clamp, clamped, control_dims, plan_edits

W = 48


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def planted():
    """The planted chain traced once, without a quantized row (the CLI's test scores llm.int8): (model, state
    before, result)."""
    model = planted_chain()
    before = _state(model)
    settings = TraceSettings(window=W, max_windows=6, batch_size=3, rows=())
    res = trace(model, chain_ids(window=W), settings, progress=False)
    return model, before, res


def test_trace_recovers_the_planted_chain(planted):
    model, before, res = planted
    c = res.chain
    assert [(w["block"], w["row"], w["col"]) for w in c["super_weights"]] == [
        (CHAIN["block"], CHAIN["row"], CHAIN["col"])
    ]
    (m,) = c["massive"]
    assert (m["dim"], m["birth_block"], m["super_weights"]) == (CHAIN["row"], CHAIN["block"], [[1, 5, 9]])
    assert c["massive_positions"] == {"0": 6} and c["windows_with_massive_tokens"] == 6  # token 0 of every window
    assert c["massive_tokens"][0]["token_id"] == CHAIN["bos"]
    (d,) = c["down_in"]  # the super weight's input column carries it, and only on the massive token
    assert d["block"] == CHAIN["block"] and d["channel"] == CHAIN["col"] and d["max_abs_other_tokens"] == 0
    assert [(h["layer"], h["head"]) for h in c["sink_heads"]] == [(CHAIN["sink_block"], CHAIN["head"])]
    assert c["sink_heads"][0]["massive_tokens"] > 0.99 and c["n_counted_heads"] == 16
    keys = c["key_layers"][CHAIN["sink_block"]]  # the sink head's key channel peaks on the massive token
    assert keys["top_on_massive_tokens"] and keys["n_outliers_on_massive_tokens"] >= 1
    assert c["kl_share"] == {} and c["massive_token_share"] == pytest.approx(1 / W)
    assert "fed by it" in c["note"] and _same(model, before) and hook_count(model) == 0


def test_edits_act_on_the_chain_as_causes(planted):
    _, _, res = planted
    assert [e["edit"] for e in res.edits] == list(EDITS)
    none, clamp, control = res.edit("none"), res.edit("clamp_massive"), res.edit("clamp_control")
    zero, restore = res.edit("zero_super_weights"), res.edit("restore_super_activation")
    assert none["sink_rate"] == pytest.approx(1 / 16) and none["massive_activation"] > 1e4
    # the clamp removes the activation and the planted sink; the control clamp changes neither
    assert clamp["sink_rate"] == 0 and clamp["sink_rate_delta_ci95"][1] < 0
    assert clamp["massive_activation"] < 1 and clamp["first_token_attention_delta_ci95"][1] < 0
    assert control["sink_rate_delta"] == 0 and control["massive_activation_delta"] == pytest.approx(0, abs=1e-3)
    assert abs(control["first_token_attention_delta"]) < 1e-4 and control["clamped_tokens"] == clamp["clamped_tokens"]
    # zeroing the super weight removes the activation and the sink; restoring it brings both back
    assert zero["massive_activation"] < 1 and zero["sink_rate"] == 0
    assert restore["massive_activation"] == pytest.approx(none["massive_activation"], rel=1e-3)
    assert restore["sink_rate"] == none["sink_rate"]
    for e in res.edits:
        for f in FIELDS:
            assert e[f] is not None and math.isfinite(e[f]), (e["edit"], f)
            if e["edit"] != "none":
                assert e[f"{f}_delta"] == pytest.approx(e[f] - none[f], abs=1e-9)
                lo, hi = e[f"{f}_delta_ci95"]
                assert lo <= hi
    d = res.to_dict()
    assert {"chain", "edits", "cost", "settings", "n_windows", "bos"} <= set(d) and d["cost"]["window_forwards"] > 0
    assert res.table().shape == (5, 1 + len(FIELDS)) and "Outlier lifecycle" in res._repr_html_()
    assert row_field("llm.int8") == "kl_vs_ref_llm_int8" and row_field("absmax-vector") == "kl_vs_ref_absmax_vector"


def test_without_a_super_weight_the_clamps_still_run():
    model = planted_chain(super_weight=False)
    res = trace(
        model, chain_ids(window=W), TraceSettings(window=W, max_windows=4, batch_size=4, rows=()), progress=False
    )
    c = res.chain
    assert c["super_weights"] == [] and c["massive"][0]["dim"] == CHAIN["row"] and c["massive"][0]["birth_block"] == 0
    assert "no super weight" in c["note"] and "not fed by a super weight" in c["note"]
    zero = res.edit("zero_super_weights")
    assert not zero["applicable"] and zero["massive_activation"] is None and "no super weight" in zero["note"]
    assert res.edit("clamp_massive")["sink_rate"] == 0 and res.edit("none")["sink_rate"] > 0
    assert res.edit("clamp_control")["sink_rate_delta"] == 0
    assert res.chain["kl_share"] == {} and row_field("llm.int8") not in res.edit("none")


def test_figure_draws_the_chain(planted):
    from outliers.analysis.lifecycle_plots import chain_figure

    _, _, res = planted
    fig = chain_figure(res)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "W[5, 9]" in texts and "dim 5" in texts and "clamp: sink rate" in texts and "control" in texts
    assert chain_figure(res.to_dict() | {"model": "m"}).axes[0].get_title() == "Outlier lifecycle: m"


def test_clamp_edit_leaves_no_hook_and_control_avoids_massive_dims():
    model = make_model("llama", layers=2)
    x = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        before = model(x).logits
        with clamped(model, [Clamp(0, 3, 3)]) as counts:
            model(x)
        after = model(x).logits
    assert counts["tokens"] == 0 and hook_count(model) == 0 and torch.equal(before, after)  # nothing is massive
    assert 7 not in control_dims(32, [7], 31, seed=1) and len(set(control_dims(32, [7], 31))) == 31
    edits = plan_edits([], [(2, 7)], 32, names=("none", "clamp_control"))
    assert [e.name for e in edits] == ["none", "clamp_control"] and edits[1].clamps[0].source == 7
    assert edits[1].clamps[0].dim != 7
    with pytest.raises(InvalidArgumentError, match="unknown edit"):
        plan_edits([], [], 32, names=("none", "prune"))
    with pytest.raises(InvalidArgumentError, match="model has blocks"), clamped(model, [Clamp(5, 0, 0)]):
        pass


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"window": 2}, "window must be >= 3"),
        ({"epsilon": 1.0}, "epsilon must be in"),
        ({"edits": ("clamp_massive",)}, "must include 'none'"),
        ({"rows": ("fp32",)}, "rows are quantization methods"),
        ({"rows": ("int3",)}, "int3"),
        ({"edits": ("none", "prune")}, "unknown edit"),
    ],
)
def test_bad_settings(kw, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TraceSettings(**kw).check()
