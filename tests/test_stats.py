import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import make_model
from outliers import CorpusError, InvalidArgumentError, ModelFileError
from outliers.analysis.criteria import Criteria, massive_activations, outlier_features, per_dim, summary
from outliers.analysis.hooks import capture
from outliers.analysis.points import resolve_points
from outliers.analysis.scan import scan
from outliers.analysis.stats import OutlierStats, _point_stats_torch
from outliers.analysis.cpu_kernels import point_stats

PLANTED = (3, 17)
NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"), "gpt2": ("ln_1", "ln_2"),
         "opt": ("self_attn_layer_norm", "final_layer_norm")}


def planted_model(arch, dims=PLANTED, gain=40.0):
    """A tiny model whose pre-attention and pre-FFN norms scale ``dims`` by ``gain`` in every block.

    Normalized values are ~N(0, 1) and, over 32 dims, never reach 6 in magnitude;
    scaled by 40 the planted dims reach 6 at most positions, in every block.
    """
    model = make_model(arch)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in NORMS[arch]:
                module.weight[list(dims)] = gain
    return model


def ids(n_seq=6, seq=24, seed=0):
    return torch.randint(0, 384, (n_seq, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer_unit", ["block", "point"])
def test_planted_dims_are_found_exactly(arch, layer_unit):
    model = planted_model(arch)
    with torch.inference_mode(), capture(model, "attn,ffn") as st:
        model(input_ids=ids())
    found = outlier_features(st, Criteria(layer_unit=layer_unit))
    assert sorted(found.dim.tolist()) == list(PLANTED)
    assert (found.pct_layers == 100).all() and (found.pct_positions > 50).all()
    assert outlier_features(st, Criteria(space="heads")).empty or arch == "opt"  # heads: another space
    row = summary(st)
    assert row["outlier_dims"] == 2 and row["tokens"] == 6 * 24


def test_unplanted_model_has_no_outlier_features(arch):
    model = make_model(arch)
    with torch.inference_mode(), capture(model, "attn,ffn") as st:
        model(input_ids=ids())
    assert outlier_features(st).empty


def test_no_hook_outlives_capture_even_after_errors():
    model = planted_model("gpt2")
    count = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    with pytest.raises(RuntimeError, match="stop"):
        with capture(model, "attn,ffn,residual"):
            with capture(model, "ffn"):
                assert count() > 0
                raise RuntimeError("stop")
    assert count() == 0
    with pytest.raises(Exception):
        with torch.inference_mode(), capture(model, "attn"):
            model(input_ids=torch.full((1, 4), 10_000))  # token id out of range: the forward fails
    assert count() == 0


def test_memory_does_not_grow_with_tokens():
    model = planted_model("llama")
    sizes = []
    for n_batches in (2, 20):
        with torch.inference_mode(), capture(model, "attn,ffn,residual") as st:
            for b in range(n_batches):
                model(input_ids=ids(seed=b))
        sizes.append(st.nbytes())
        assert st.tokens["L00.attn_in"] == n_batches * 6 * 24
    assert sizes[0] == sizes[1]


def test_padding_is_not_counted():
    model = planted_model("llama")
    x = ids(2, 24)
    mask = torch.ones_like(x)
    mask[1, 16:] = 0
    with torch.inference_mode(), capture(model, "attn,ffn") as padded:
        model(input_ids=x, attention_mask=mask)
    with torch.inference_mode(), capture(model, "attn,ffn") as plain:
        model(input_ids=x[:1])
        model(input_ids=x[1:, :16])
    assert padded.tokens["L00.attn_in"] == 24 + 16
    for f in ("count", "pos", "rel_count"):
        assert torch.equal(padded.get("L01.ffn_in", f), plain.get("L01.ffn_in", f))
    assert torch.equal(padded.tensors["hidden/union"], plain.tensors["hidden/union"])


def test_two_partial_scans_merge_into_one(tmp_path):
    model = planted_model("opt")
    with torch.inference_mode(), capture(model, "attn,ffn") as whole:
        model(input_ids=ids(seed=1))
        model(input_ids=ids(seed=2))
    parts = []
    for seed in (1, 2):
        with torch.inference_mode(), capture(model, "attn,ffn") as part:
            model(input_ids=ids(seed=seed))
        parts.append(part)
    merged = parts[0].merge(parts[1])
    for k, v in whole.tensors.items():
        if not k.startswith("top_"):
            torch.testing.assert_close(merged.tensors[k], v, msg=k)
    torch.testing.assert_close(merged.tensors["top_abs"], whole.tensors["top_abs"])
    assert merged.tokens == whole.tokens
    merged.meta["model"] = "tiny-opt"
    back = OutlierStats.load(merged.save(tmp_path / "scan"))
    assert back.meta["model"] == "tiny-opt" and back.points == merged.points
    assert all(torch.equal(back.tensors[k], merged.tensors[k]) for k in merged.tensors)
    with pytest.raises(ModelFileError, match="no readable outlier statistics"):
        OutlierStats.load(tmp_path / "nothing")


@given(rows=st.integers(1, 40), dims=st.integers(1, 50), seed=st.integers(0, 2**16),
       t=st.sampled_from([0.5, 2.0, 6.0]), with_nan=st.booleans())
@settings(max_examples=60, deadline=None)
def test_fused_cpu_stats_equal_the_torch_path(rows, dims, seed, t, with_nan):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dims, generator=g) * 3
    if with_nan:
        x[rows // 2, dims // 2] = float("nan")
        x[0, 0] = float("inf")
    u1, r1 = torch.zeros(rows, dims, dtype=torch.uint8), torch.zeros(rows, dims, dtype=torch.uint8)
    u2, r2 = u1.clone(), r1.clone()
    fast = point_stats(x, t, 2.0, 2.0, 256, u1, r1)
    ref = _point_stats_torch(x, t, 2.0, u2, r2)
    assert torch.equal(u1, u2) and torch.equal(r1, r2)
    for k in ("absmax", "count", "pos", "rel_count", "hist", "nonfinite", "row_max"):
        assert torch.equal(fast[k], ref[k].to(fast[k].dtype)), k
    for k in ("sum", "sumsq", "sum_out"):
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-9, atol=1e-9)


def test_nonfinite_values_are_counted_and_scan_goes_on():
    model = planted_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] = float("nan")
    with torch.inference_mode(), capture(model, "attn") as st:
        model(input_ids=ids())
    assert st.nonfinite["L01.attn_in"] == 6 * 24 and st.nonfinite["L00.attn_in"] == 0


def test_massive_activations_on_the_residual_stream():
    model = make_model("llama")
    with torch.no_grad():  # residual dim 9 = 300 at every token; the rest ~0.02: 15,000x the median
        model.model.embed_tokens.weight[:, 9] = 300.0
    with torch.inference_mode(), capture(model, "residual") as st:
        model(input_ids=ids())
    df = massive_activations(st)
    assert set(df.dim) == {9} and set(df.layer) == {0, 1} and (df["count"] == 6 * 24).all()


def test_bad_arguments():
    model = make_model("llama")
    with pytest.raises(InvalidArgumentError, match="threshold must be > 0"):
        with capture(model, "attn", threshold=0):
            pass
    with pytest.raises(InvalidArgumentError, match="unknown capture point 'mlp'"):
        resolve_points(model, "attn,mlp")
    with pytest.raises(InvalidArgumentError, match="no capture points asked for"):
        resolve_points(model, [])
    with pytest.raises(InvalidArgumentError, match="layer_unit must be one of"):
        Criteria(layer_unit="stage")
    with pytest.raises(InvalidArgumentError, match="no capture points in space 'residual'"):
        with torch.inference_mode(), capture(model, "attn") as st:
            model(input_ids=ids())
        per_dim(st, Criteria(space="residual"))


def test_unknown_architecture_lists_its_linear_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"wq": torch.nn.Linear(4, 4)}) for _ in range(2)])

    with pytest.raises(InvalidArgumentError, match=r"no capture-point patterns for architecture 'Tiny'.*blocks\.\*\.wq"):
        resolve_points(Tiny(), "attn")
    pts = resolve_points(Tiny(), ("attn_in",), patterns={"attn_in": r"blocks\.(\d+)\.wq"})
    assert [p.name for p in pts] == ["L00.attn_in", "L01.attn_in"]


def test_scan_of_a_short_corpus_scans_what_there_is():
    model = planted_model("llama")
    corpus_ids = torch.randint(0, 384, (100,), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="asked for 1000 tokens but the corpus holds 100: scanned 96"):
        st = scan(model, corpus_ids, max_tokens=1000, window=32, progress=False)
    assert st.meta["tokens_scanned"] == 96 and st.tokens["L00.attn_in"] == 96
    with pytest.raises(CorpusError, match="fewer than one window"):
        scan(model, corpus_ids[:10], window=32, progress=False)


def test_scan_with_a_bos_per_window_prepends_it_once():
    model = make_model("llama")
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        ids = torch.cat([torch.tensor([0]), torch.arange(1, 200)])  # a BOS (0) at the corpus start
        st = scan(model, ids, max_tokens=93, window=32, bos_token_id=0, progress=False)
    finally:
        handle.remove()
    batch = torch.cat(seen)
    assert batch.shape == (3, 32) and (batch[:, 0] == 0).all()  # 93 // 31 windows of BOS + 31 tokens
    assert torch.equal(batch[:, 1:].reshape(-1), torch.arange(1, 94))  # the corpus BOS is not doubled
    assert st.meta["bos"] == "window"
