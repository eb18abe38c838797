"""Kurtosis and ∞-norm (Bondarenko et al. 2023): known distributions, exact pooling, planted outliers, v1 files."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import PLANTED, make_model, planted_model
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers import InvalidArgumentError
from outliers.analysis.cpu_kernels import moment_sums_cpu
from outliers.analysis.hooks import capture
from outliers.analysis.moments import layer_table, moments_table, quantizability
from outliers.analysis.plots import kurtosis_by_block
from outliers.analysis.points import CapturePoint
from outliers.analysis.scan import scan
from outliers.analysis.stats import OutlierStats, PointStat
from outliers.analysis.torch_stats import moment_sums, row_moments

POINT = CapturePoint("L00.residual", "blocks.0", 0, "residual", "residual", 64)


def fill(x: torch.Tensor, seq: torch.Tensor | None = None) -> OutlierStats:
    st = OutlierStats([POINT], top_k=0)
    st.update(POINT, x, {}, seq, None, None, 0)
    return st


def pearson(x: np.ndarray, axis=None) -> np.ndarray:
    return scipy.stats.kurtosis(x, axis=axis, fisher=False)


def test_token_kurtosis_of_known_distributions():
    two_point = torch.tensor([[-1.0, 1.0] * 32])  # kurtosis 1 exactly
    grid = (torch.arange(64.0) - 31.5)[
        None
    ]  # evenly spaced (exact in float32): the discrete uniform's (3/5)(3n²-7)/(n²-1)
    one_spike = torch.zeros(1, 64)
    one_spike[0, 5] = 300.0  # one outlier dim among n zeros: n - 2 + 1/(n - 1)
    for x, want in (
        (two_point, 1.0),
        (grid, 0.6 * (3 * 64**2 - 7) / (64**2 - 1)),
        (one_spike, 64 - 2 + 1 / 63),
    ):
        st = fill(x)
        got = st.get_point(POINT.name, PointStat.TOKEN_KURT) / st.get_point(POINT.name, PointStat.KURT_TOKENS)
        assert got == pytest.approx(want, rel=1e-12)
    normal = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    df = moments_table(fill(normal))
    assert df.token_kurtosis[0] == pytest.approx(3 * 63 / 65, rel=0.02)  # E[sample kurtosis] of n normal values


def test_rows_of_equal_values_have_no_kurtosis_and_a_constant_sequence_none_either():
    st = fill(torch.full((3, 64), 2.5), torch.zeros(3, dtype=torch.long))
    assert st.get_point(POINT.name, PointStat.KURT_TOKENS) == 0 and st.get_point(POINT.name, PointStat.SEQS) == 1
    df = moments_table(st)
    assert math.isnan(df.token_kurtosis[0]) and df.seq_kurtosis[0] == 0 and df.inf_norm[0] == 2.5


@pytest.mark.parametrize("sums", [moment_sums, moment_sums_cpu], ids=["torch", "numba"])
@given(rows=st.integers(1, 30), dims=st.integers(2, 40), seqs=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_sequences_pool_their_rows_exactly(sums, rows, dims, seqs, seed):
    """Per-sequence kurtosis and ∞-norm from row moments equal scipy's over the sequence's values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dims, generator=g) * 3 + torch.randn(rows, 1, generator=g) * 5  # rows of other means
    x[0, 0] += 2000.0
    seq = torch.randint(0, seqs, (rows,), generator=g)
    got = sums(row_moments(x, torch.isfinite(x)), x.abs().amax(1), seq)
    xs = x.double().numpy()
    groups = [xs[(seq == s).numpy()] for s in seq.unique()]
    assert got[PointStat.SEQS].item() == len(groups)
    assert got[PointStat.SEQ_KURT].item() == pytest.approx(sum(pearson(v.ravel()) for v in groups), rel=1e-9)
    assert got[PointStat.SEQ_INF].item() == pytest.approx(sum(np.abs(v).max() for v in groups), rel=1e-6)
    tokens = pearson(xs, axis=1)
    assert got[PointStat.TOKEN_KURT].item() == pytest.approx(tokens.sum(), rel=1e-9)
    assert got[PointStat.TOKEN_KURT_MAX].item() == pytest.approx(tokens.max(), rel=1e-9)


def test_values_of_2e4_keep_their_precision():
    """x⁴ of 2.3e4 is 3e17: centring per row in float64 keeps the kurtosis to float64 rounding."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    x[:, 7] = 23_000.0
    st = fill(x, torch.zeros(8, dtype=torch.long))
    want = pearson(x.double().numpy().ravel())
    assert moments_table(st).seq_kurtosis[0] == pytest.approx(want, rel=1e-10)


def test_a_planted_outlier_dim_raises_the_token_kurtosis_where_it_is():
    def token_kurtosis(model):
        with torch.inference_mode(), capture(model, "attn,ffn") as st:
            model(input_ids=torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0)))
        return moments_table(st).set_index("point").token_kurtosis

    plain, planted = token_kurtosis(make_model("llama")), token_kurtosis(planted_model("llama"))
    assert plain.between(2, 4.5).all()  # normalized inputs: about normal
    # two dims 40x the other 30 of 32: n Σd⁴ / (Σd²)² is about 32 * 2 / 2² = 16 where they are equal in size
    assert len(PLANTED) == 2
    assert planted[[p for p in planted.index if "attn_in" in p or "ffn_in" in p]].between(10, 32).all()
    assert planted[[p for p in planted.index if "attn_out" in p]].between(1, 10).all()  # not planted there


def test_the_block_outputs_give_bondarenko_summary_and_scan_can_leave_moments_out():
    model = make_model("llama")
    with torch.no_grad():  # a massive activation in residual dim 9 of every token
        model.model.embed_tokens.weight[:, 9] = 300.0
    corpus = torch.randint(0, 384, (200,), generator=torch.Generator().manual_seed(0))
    st = scan(model, corpus, points="attn,residual", max_tokens=128, window=32, progress=False)
    q = quantizability(st)
    res = moments_table(st).query("kind == 'residual'")
    assert q["layers"] == 2 and q["max_inf_norm"] == pytest.approx(res.inf_norm.max())
    assert q["max_inf_norm"] > 250 and q["avg_kurtosis"] > 20 and (res.sequences == 4).all()
    assert set(q["token_kurtosis"]) == {"attn_in", "attn_out", "residual"}
    assert list(layer_table(st).columns[-2:]) == ["output kurtosis", "output ∞-norm"]
    assert len(kurtosis_by_block(st).axes) == 3
    bare = scan(model, corpus, points="attn", max_tokens=128, window=32, progress=False, moments=False)
    assert bare.format == "outliers.stats/1" and not any("kurt" in k for k in bare.tensors)
    with pytest.raises(InvalidArgumentError, match="taken without moments"):
        quantizability(bare)
    assert (
        quantizability(scan(model, corpus, points="attn", max_tokens=64, window=32, progress=False))["max_inf_norm"]
        is None
    )  # no block outputs scanned: the paper's two numbers are not there


def test_moments_save_load_and_merge(tmp_path):
    model = make_model("opt")
    corpus = torch.randint(0, 384, (300,), generator=torch.Generator().manual_seed(0))
    whole = scan(model, corpus, points="attn,residual", max_tokens=256, window=32, progress=False)
    a = scan(model, corpus[:128], points="attn,residual", max_tokens=128, window=32, progress=False)
    b = scan(model, corpus[128:256], points="attn,residual", max_tokens=128, window=32, progress=False)
    merged, back = a.merge(b), OutlierStats.load(whole.save(tmp_path / "v2"))
    assert back.format == "outliers.stats/2" and back.moments
    for p in whole.points:
        for s in PointStat:
            assert back.get_point(p.name, s) == whole.get_point(p.name, s)
            assert merged.get_point(p.name, s) == pytest.approx(whole.get_point(p.name, s), rel=1e-9), (p.name, s)
    with pytest.raises(InvalidArgumentError, match="same capture points, thresholds and moments"):
        a.merge(scan(model, corpus, points="attn,residual", max_tokens=64, window=32, progress=False, moments=False))


@given(rows=st.integers(0, 40), seqs=st.integers(0, 5), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_numba_moment_sums_equal_torch_ones(rows, seqs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 24, generator=g) * 4
    if rows > 2:
        x[1] = 3.0  # a row of equal values: no kurtosis
    seq = torch.randint(0, seqs, (rows,), generator=g) if seqs else None
    m, row_max = row_moments(x, torch.isfinite(x)), x.abs().amax(1) if rows else torch.zeros(0)
    want, got = moment_sums(m, row_max, seq), moment_sums_cpu(m, row_max, seq)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == torch.float64 and got[k].shape == (1,)
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-12, abs=1e-12), k
