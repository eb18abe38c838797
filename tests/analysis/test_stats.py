import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PLANTED, hook_count, make_model, planted_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from outliers import CorpusError, InvalidArgumentError, ModelFileError
from outliers.analysis.cpu_kernels import point_stats
from outliers.analysis.criteria import Criteria, massive_activations, outlier_features, per_dim, summary, top_values
from outliers.analysis.hooks import capture
from outliers.analysis.points import CapturePoint, resolve_points
from outliers.analysis.scan import scan
from outliers.analysis.stats import OutlierStats, SpaceStat, Stat, Top
from outliers.analysis.torch_stats import point_stats_torch

V1 = Path(__file__).parents[1] / "fixtures" / "stats_v1"  # saved by the code before the names were typed


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
    assert outlier_features(st, Criteria(space="heads")).empty  # heads: another space, nothing planted there
    row = summary(st)
    assert row["outlier_dims"] == 2 and row["tokens"] == 6 * 24


def test_unplanted_model_has_no_outlier_features(arch):
    model = make_model(arch)
    with torch.inference_mode(), capture(model, "attn,ffn") as st:
        model(input_ids=ids())
    assert outlier_features(st).empty


def test_no_hook_outlives_capture_even_after_errors():
    model = planted_model("gpt2")
    with pytest.raises(RuntimeError, match="stop"):
        with capture(model, "attn,ffn,residual"):
            with capture(model, "ffn"):
                assert hook_count(model) > 0
                raise RuntimeError("stop")
    assert hook_count(model) == 0
    with pytest.raises(IndexError):
        with torch.inference_mode(), capture(model, "attn"):
            model(input_ids=torch.full((1, 4), 10_000))  # token id out of range: the forward fails
    assert hook_count(model) == 0


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
    for f in (Stat.COUNT, Stat.POS, Stat.REL_COUNT):
        assert torch.equal(padded.get("L01.ffn_in", f), plain.get("L01.ffn_in", f))
    assert torch.equal(padded.get_space("hidden", SpaceStat.UNION), plain.get_space("hidden", SpaceStat.UNION))


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
        if k not in set(Top):
            torch.testing.assert_close(merged.tensors[k], v, msg=k)
    torch.testing.assert_close(merged.get_top(Top.ABS), whole.get_top(Top.ABS))
    assert merged.tokens == whole.tokens
    merged.meta["model"] = "tiny-opt"
    back = OutlierStats.load(merged.save(tmp_path / "scan"))
    assert back.meta["model"] == "tiny-opt" and back.points == merged.points
    assert all(torch.equal(back.tensors[k], merged.tensors[k]) for k in merged.tensors)
    with pytest.raises(ModelFileError, match="no readable outlier statistics"):
        OutlierStats.load(tmp_path / "nothing")


@given(
    rows=st.integers(1, 40),
    dims=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    t=st.sampled_from([0.5, 2.0, 6.0]),
    with_nan=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_fused_cpu_stats_equal_the_torch_path(rows, dims, seed, t, with_nan):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dims, generator=g) * 3
    if with_nan:
        x[rows // 2, dims // 2] = float("nan")
        x[0, 0] = float("inf")
    u1, r1 = torch.zeros(rows, dims, dtype=torch.uint8), torch.zeros(rows, dims, dtype=torch.uint8)
    u2, r2 = u1.clone(), r1.clone()
    fast = point_stats(x, t, 2.0, 2.0, 256, u1, r1, moments=True)
    ref = point_stats_torch(x, t, 2.0, u2, r2, moments=True)
    assert torch.equal(u1, u2) and torch.equal(r1, r2)
    for a, b in (
        (fast.absmax, ref.absmax),
        (fast.count, ref.count),
        (fast.pos, ref.pos),
        (fast.rel_count, ref.rel_count),
        (fast.hist, ref.hist),
        (fast.nonfinite, ref.nonfinite),
        (fast.row_max, ref.row_max),
    ):
        assert torch.equal(a, b.to(a.dtype))
    for a, b in (
        (fast.sum, ref.sum),
        (fast.sumsq, ref.sumsq),
        (fast.sum_out, ref.sum_out),
        (fast.row_moments, ref.row_moments),
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [512, 1501])
def test_fused_cpu_stats_split_over_threads_equal_the_torch_path(rows):
    """From PARALLEL_ROWS rows the kernel splits rows over threads and merges per-chunk partials."""
    from outliers.analysis.cpu_kernels import PARALLEL_ROWS

    assert rows >= PARALLEL_ROWS
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 67, generator=g) * 3
    x[rows - 1, 3], x[7, 60] = float("nan"), float("-inf")  # one in each chunk
    u1, r1 = torch.zeros(rows, 67, dtype=torch.uint8), torch.zeros(rows, 67, dtype=torch.uint8)
    u2, r2 = u1.clone(), r1.clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = point_stats(x, 6.0, 2.0, 2.0, 256, u1, r1, moments=True)
    finally:
        torch.set_num_threads(threads)
    ref = point_stats_torch(x, 6.0, 2.0, u2, r2, moments=True)
    assert torch.equal(u1, u2) and torch.equal(r1, r2)
    for f in ("absmax", "count", "pos", "rel_count", "hist", "nonfinite", "row_max", "row_arg"):
        assert torch.equal(getattr(fast, f), getattr(ref, f).to(getattr(fast, f).dtype)), f
    for f in ("sum", "sumsq", "sum_out", "row_moments"):
        torch.testing.assert_close(getattr(fast, f), getattr(ref, f), rtol=1e-9, atol=1e-9)


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


def test_a_planted_down_projection_input_is_found_in_its_own_space():
    model = make_model("llama")
    with torch.no_grad():  # block 1's MLP activation dim 5 is 1000x the rest
        model.model.layers[1].mlp.up_proj.weight[5] *= 1000.0
    with torch.inference_mode(), capture(model, "down_in") as st:
        model(input_ids=ids())
    assert st.spaces == {"intermediate": model.config.intermediate_size}
    maxes = {p.layer: st.get(p.name, Stat.ABSMAX) for p in st.points}
    assert int(maxes[1].argmax()) == 5 and float(maxes[1].max()) > 100 * float(maxes[0].max())
    found = outlier_features(st, Criteria(space="intermediate", layers=0.5))
    assert found.dim.tolist() == [5]


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

    with pytest.raises(
        InvalidArgumentError, match=r"no capture-point patterns for architecture 'Tiny'.*blocks\.\*\.wq"
    ):
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


def v1_stats() -> OutlierStats:
    """The scan that tests/data/stats_v1 holds, as saved by the code before typed statistics.

    Every value is a small multiple of 1/4, so every sum is exact in any order:
    the numbers do not depend on how many threads the CPU kernel splits rows over.
    """
    pts = [
        CapturePoint("L00.attn_in", "blocks.0.q", 0, "attn_in", "hidden", 8),
        CapturePoint("L00.attn_out", "blocks.0.o", 0, "attn_out", "heads", 6),
        CapturePoint("L00.residual", "blocks.0", 0, "residual", "residual", 8),
        CapturePoint("L01.attn_in", "blocks.1.q", 1, "attn_in", "hidden", 8),
    ]
    st = OutlierStats(pts, threshold=6.0, relative_k=2.0, top_k=4, meta={"model": "fixture"}, moments=False)
    g = torch.Generator().manual_seed(0)
    rows = 5
    for b in range(2):
        union: dict = {}
        seq, pos = torch.full((rows,), b), torch.arange(rows)
        tok = torch.randint(0, 100, (rows,), generator=g)
        for i, p in enumerate(pts):
            if p.kind == "residual":
                x = torch.randint(-1, 2, (rows, p.dims), generator=g).float() / 4
                x[:, 5] = 300 + torch.arange(rows) + 10 * b
            else:
                x = torch.randint(-20, 21, (rows, p.dims), generator=g).float() / 2
                x[torch.arange(rows), torch.arange(rows) * 3 % p.dims] = 10.25 + 0.5 * (
                    torch.arange(rows) + rows * (i + 4 * b)
                )
            if i == 3 and b == 1:
                x[0, 0], x[1, 2] = float("nan"), float("inf")
            st.update(p, x, union, seq, pos, tok, i)
        st.flush_union(union)
    return st


def test_a_file_saved_before_typed_statistics_loads_bit_identically(tmp_path):
    old, new = OutlierStats.load(V1), v1_stats()
    assert list(old.tensors) == list(new.tensors)
    for k, v in new.tensors.items():
        assert old.tensors[k].dtype == v.dtype and torch.equal(old.tensors[k], v), k
    assert (old.points, old.tokens, old.nonfinite, old.meta) == (new.points, new.tokens, new.nonfinite, new.meta)
    assert old.get("L00.residual", Stat.MASSIVE)[5] == 10 and old.nonfinite["L01.attn_in"] == 2
    assert old.get_top(Top.ABS).tolist() == [314, 313, 312, 311]
    assert len(per_dim(old, Criteria(space="heads"))) == 6 and len(top_values(old)) == 4
    assert massive_activations(old).dim.tolist() == [5]
    again = old.save(tmp_path / "again")  # written back exactly as the old code wrote it
    assert json.loads((again / "stats.json").read_text()) == json.loads((V1 / "stats.json").read_text())
    before, after = load_file(V1 / "stats.safetensors"), load_file(again / "stats.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with safe_open(again / "stats.safetensors", "pt") as f:
        assert f.metadata() == {"format": "outliers.stats/1"}


def test_load_says_what_is_wrong_with_a_file(tmp_path):
    other = Path(shutil.copytree(V1, tmp_path / "v2"))
    info = json.loads((other / "stats.json").read_text())
    (other / "stats.json").write_text(json.dumps({**info, "format": "outliers.stats/9"}))
    with pytest.raises(ModelFileError, match="is 'outliers.stats/9', not 'outliers.stats/2' or 'outliers.stats/1'"):
        OutlierStats.load(other)
    odd = Path(shutil.copytree(V1, tmp_path / "odd"))
    tensors = load_file(odd / "stats.safetensors")
    tensors["L00.attn_in/absmx"] = tensors.pop("L00.attn_in/absmax")
    save_file(tensors, odd / "stats.safetensors", metadata={"format": "outliers.stats/1"})
    with pytest.raises(ModelFileError, match=r"lacks \['L00.attn_in/absmax'\] and holds unknown \['L00.attn_in/absmx"):
        OutlierStats.load(odd)


def test_statistic_names_are_typed():
    st = v1_stats()
    assert st.get("L00.attn_in", Stat.ABSMAX) is st.tensors["L00.attn_in/absmax"]
    assert st.get_space("heads", SpaceStat.HIST) is st.tensors["heads/hist"]
    assert st.get_top(Top.SEQ) is st.tensors["top_seq"]
    assert st.get("L00.attn_in", "count") is st.get("L00.attn_in", Stat.COUNT)  # untyped callers still work
    with pytest.raises(ValueError, match="'absmx' is not a valid Stat"):
        st.get("L00.attn_in", "absmx")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        _ = Stat.ABSMX  # type: ignore[attr-defined]
    assert {s: s.dtype for s in Stat if s.dtype != torch.int64} == {
        Stat.ABSMAX: torch.float32,
        Stat.SUM_OUT: torch.float64,
        Stat.SUM: torch.float64,
        Stat.SUMSQ: torch.float64,
    }


@given(rows=st.integers(1, 40), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_massive_counts_kernel_equals_the_torch_expression(rows, seed):
    from outliers.analysis.cpu_kernels import massive_counts

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 33, generator=g) * 60
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 100.0])
    x[rows // 2, 5] = -5000.0
    x[-1, 6] = 100.00001
    row_max = x.abs().nan_to_num(0.0, 0.0, 0.0).amax(1)
    med = torch.tensor(0.08)
    cand = torch.nonzero(row_max > 100).view(-1)
    a = x[cand].abs().nan_to_num(0.0, 0.0, 0.0)
    want = ((a > 100) & (a > 1000 * med)).sum(0)
    got = torch.zeros(33, dtype=torch.int64)
    massive_counts(x, row_max, 100.0, 1000 * med, got)
    assert torch.equal(got, want)
