import pytest
import torch
from helpers import hook_count, make_model, planted_model

from outliers import InvalidArgumentError
from outliers.analysis.ablate import ablate_dims, ablation_study, mean_top1_attention, readers
from outliers.analysis.hooks import capture
from outliers.analysis.points import resolve_points
from outliers.analysis.stats import Stat


def eager(model):
    model.config._attn_implementation = "eager"
    return model


def test_readers_cover_every_module_sharing_the_input(arch):
    model = make_model(arch)
    by_kind = {p.kind: readers(model, p) for p in resolve_points(model, "attn,ffn") if p.layer == 0}
    ends = {k: sorted(n.rsplit(".", 1)[-1] for n in v) for k, v in by_kind.items()}
    expected = {
        "llama": {"attn_in": ["k_proj", "q_proj", "v_proj"], "ffn_in": ["gate_proj", "up_proj"]},
        "gpt2": {"attn_in": ["c_attn"], "ffn_in": ["c_fc"]},
        "opt": {"attn_in": ["k_proj", "q_proj", "v_proj"], "ffn_in": ["fc1"]},
    }[arch]
    assert {k: ends[k] for k in expected} == expected


def test_zeroed_dims_reach_every_reader_and_hooks_go_away():
    model = planted_model("llama")
    pts = [p for p in resolve_points(model, "attn_in")]
    seen = {}
    k_proj = model.model.layers[0].self_attn.k_proj
    with torch.inference_mode(), ablate_dims(model, pts, [3, 17]):
        # registered after the ablation hooks, so it runs after them
        h = k_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("k", a[0].clone()))
        model(input_ids=torch.randint(0, 384, (1, 8)))
    h.remove()
    assert (seen["k"][..., [3, 17]] == 0).all() and (seen["k"][..., 4] != 0).any()
    assert hook_count(model) == 0


def test_mean_fill_uses_scan_means():
    model = planted_model("llama")
    x = torch.randint(0, 384, (2, 16))
    with torch.inference_mode(), capture(model, "attn_in") as st:
        model(input_ids=x)
    pts = resolve_points(model, "attn_in")
    means = {p.name: (st.get(p.name, Stat.SUM) / st.tokens[p.name]).float() for p in pts}
    got = {}
    with torch.inference_mode(), ablate_dims(model, pts, [3], mode="mean", means=means):
        h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: got.setdefault("q", a[0]))
        model(input_ids=x)
    h.remove()
    assert torch.allclose(got["q"][..., 3], means["L01.attn_in"][3].expand_as(got["q"][..., 3]))


def test_removing_planted_dims_hurts_more_than_random_dims():
    model = eager(planted_model("llama", gain=60.0))
    ids = torch.randint(0, 384, (4 * 32,), generator=torch.Generator().manual_seed(0))
    df = ablation_study(model, ids, [3, 17], controls=2, window=32, max_windows=4, attention_windows=2, progress=False)
    assert list(df.condition) == ["baseline", "selected", "random #1", "random #2"]
    assert df.delta_ppl_pct[0] == 0
    sel = abs(df.delta_top1_pct[1])
    assert sel > 2 * abs(df.delta_top1_pct[2:]).max()  # planted dims steer attention, random ones hardly
    assert all(set(d).isdisjoint({3, 17}) and len(d) == 2 for d in df.dims[2:])


def test_top1_attention_needs_eager():
    model = make_model("llama")
    model.config._attn_implementation = "sdpa"
    with pytest.raises(InvalidArgumentError, match="eager"):
        mean_top1_attention(model, torch.randint(0, 384, (1, 8)))


def test_bad_ablation_arguments():
    model = make_model("llama")
    pts = resolve_points(model, "attn_in")
    with pytest.raises(InvalidArgumentError, match=r"dims \[32\] out of range for L00.attn_in \(32 dims\)"):
        with ablate_dims(model, pts, [1, 32]):
            pass
    with pytest.raises(InvalidArgumentError, match="mode must be 'zero' or 'mean'"):
        with ablate_dims(model, pts, [1], mode="noise"):
            pass
    with pytest.raises(InvalidArgumentError, match="needs per-point means"):
        with ablate_dims(model, pts, [1], mode="mean"):
            pass
    with pytest.raises(InvalidArgumentError, match="no dims to ablate"):
        ablation_study(model, torch.arange(64), [])
