"""LLM.int8() against bitsandbytes 0.50 on CPU, and the fused kernels against the reference."""

import pytest
import torch
from helpers import planted
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers import InvalidArgumentError
from outliers.quant.cpu_kernels import dequantize_inplace, dequantize_into, quantize_rows
from outliers.quant.int8 import int8_mm_dequant, int8_vectorwise_quant, llm_int8_matmul, outlier_columns
from outliers.quant.quantizers import int8_matmul

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference peer (pip install '.[dev]')")
import bitsandbytes.functional as BF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0], ids=lambda t: f"threshold={t}")
def test_vectorwise_quant_equals_bitsandbytes(dtype, threshold):
    x = planted().to(dtype)
    ours = int8_vectorwise_quant(x, threshold)
    ref = BF.int8_vectorwise_quant(x.clone(), threshold=threshold)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    if threshold == 0:
        assert ours[2] is None and ref[2] is None
    else:
        assert torch.equal(ours[2], ref[2])


def test_planted_outlier_columns_are_found():
    x = planted(outlier_cols=(3, 250, 498))
    assert outlier_columns(x, 6.0).tolist() == [3, 250, 498]
    assert outlier_columns(x, 0).numel() == 0


def test_zero_and_all_outlier_columns():
    x = planted()
    x[:, 10] = 0.0
    x[:, 20] = 7.0  # every element an outlier
    codes, stats, cols = int8_vectorwise_quant(x, 6.0)
    ref = BF.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert 20 in cols.tolist() and (codes[:, 20] == 0).all() and (codes[:, 10] == 0).all()
    assert torch.equal(codes, ref[0]) and torch.equal(stats, ref[1])


def test_input_is_not_mutated():
    x = planted()
    before = x.clone()
    int8_vectorwise_quant(x, 6.0)
    llm_int8_matmul(x, *int8_vectorwise_quant(torch.randn(5, 499), 0)[:2], threshold=6.0)
    assert torch.equal(x, before)


@given(
    rows=st.integers(1, 33),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.0, 1.5, 6.0]),
)
@settings(max_examples=80, deadline=None)
def test_fused_cpu_quant_is_bit_identical_to_reference(rows, cols, seed, threshold):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    codes, stats, oc = quantize_rows(x, threshold)
    ref = int8_vectorwise_quant(x, threshold)
    assert torch.equal(codes, ref[0]) and torch.equal(stats, ref[1])
    assert torch.equal(oc, ref[2] if ref[2] is not None else torch.empty(0, dtype=torch.long))


def test_fused_quant_propagates_nan_into_row_stats():
    x = torch.randn(4, 9)
    x[2, 5] = float("nan")
    _, stats, _ = quantize_rows(x, 6.0)
    assert torch.isnan(stats[2]) and torch.isfinite(stats[[0, 1, 3]]).all()
    assert torch.isnan(int8_vectorwise_quant(x, 6.0)[1][2])


def test_fused_dequant_matches_reference():
    g = torch.Generator().manual_seed(3)
    c = torch.randint(-50000, 50000, (33, 23), dtype=torch.int32, generator=g)
    rs, cs, bias = torch.rand(33, generator=g), torch.rand(23, generator=g), torch.randn(23, generator=g)
    for b in (bias, None):
        torch.testing.assert_close(dequantize_into(c, rs, cs, b), int8_mm_dequant(c, rs, cs, b), rtol=1e-6, atol=0)


def test_inplace_dequant_is_bit_identical_to_out_of_place():
    g = torch.Generator().manual_seed(5)
    c = torch.randint(-(2**24), 2**24, (64, 1536), dtype=torch.int32, generator=g)
    rs, cs, bias = torch.rand(64, generator=g) * 9, torch.rand(1536, generator=g), torch.randn(1536, generator=g)
    for b in (bias, None):
        want = dequantize_into(c, rs, cs, b)
        work = c.clone()
        got = dequantize_inplace(work, rs, cs, b)
        assert got.data_ptr() == work.data_ptr() and got.dtype == torch.float32
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="contiguous int32"):
        dequantize_inplace(c.t(), rs, cs, None)


def test_mm_dequant_equals_bitsandbytes():
    g = torch.Generator().manual_seed(4)
    c = torch.randint(-(2**20), 2**20, (17, 9), dtype=torch.int32, generator=g)
    rs, cs = torch.rand(17, generator=g) * 5, torch.rand(9, generator=g) * 5
    ref = torch.ops.bitsandbytes.int8_mm_dequant(c, rs, cs, dtype=torch.float32)  # the public one returns fp16
    # bitsandbytes multiplies by 6.200124e-05 where 1/127² is 6.2000124e-05: 1.8e-5 relative apart
    torch.testing.assert_close(int8_mm_dequant(c, rs, cs), ref, rtol=3e-5, atol=0)


def test_int8_matmul_equals_bitsandbytes():
    a = int8_vectorwise_quant(planted(), 6.0)[0]
    b = int8_vectorwise_quant(torch.randn(31, 499), 0)[0]
    assert torch.equal(int8_matmul(a, b), BF.int8_linear_matmul(a, b))


def test_negative_threshold():
    with pytest.raises(InvalidArgumentError, match="threshold must be >= 0"):
        int8_vectorwise_quant(torch.randn(3, 4), -1.0)
    with pytest.raises(InvalidArgumentError, match="threshold must be >= 0"):
        outlier_columns(torch.randn(3, 4), float("nan"))


def test_inplace_dequant_adds_the_outlier_product_in_the_same_pass():
    g = torch.Generator().manual_seed(6)
    c = torch.randint(-(2**20), 2**20, (48, 96), dtype=torch.int32, generator=g)
    rs, cs, bias = torch.rand(48, generator=g) * 9, torch.rand(96, generator=g), torch.randn(96, generator=g)
    for k in (1, 2, 3, 5):
        xo, wo = torch.randn(48, k, generator=g) * 40, torch.randn(k, 96, generator=g) * 0.1
        for b in (bias, None):
            want = dequantize_into(c, rs, cs, b).addmm_(xo, wo)  # the two-pass arithmetic it replaces
            got = dequantize_inplace(c.clone(), rs, cs, b, (xo, wo))
            if torch.backends.mkl.is_available():  # summed as MKL's sgemm sums a few columns
                assert torch.equal(got, want), (k, int((got != want).sum()))
            else:
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(
        dequantize_inplace(c.clone(), rs, cs, bias, (xo[:, :0], wo[:0])), dequantize_into(c, rs, cs, bias)
    )
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_inplace(c.clone(), rs, cs, bias, (xo, wo[:, :5]))


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(1, 2, 96), (3, 3, 96), (16, 3, 96), (300, 64, 96), (300, 65, 96), (300, 400, 96), (40, 5, 9000)],
)
def test_int8_linear_cpu_path_equals_dequantize_then_addmm(rows, k, n):
    """Few outlier columns on enough rows and outputs that fit in cache: their product inside the
    dequantization pass; otherwise addmm_ after it. Both the arithmetic of dequantize-then-addmm_ (with
    MKL: bit for bit)."""
    from outliers.quant.linear import FUSED_COLUMNS, Int8Linear
    from outliers.quant.quantizers import int8_matmul

    g = torch.Generator().manual_seed(rows + k)
    lin = torch.nn.Linear(512, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, 512, generator=g) * 0.05)
    q = Int8Linear.from_linear(lin, "llm.int8", threshold=6.0)
    x = torch.randn(rows, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:k]] *= 40  # outlier columns (|x| >= 6 somewhere in each)
    codes, stats, cols = quantize_rows(x, 6.0)
    assert cols.numel() == k and (k <= FUSED_COLUMNS) == (k <= 64)
    want = dequantize_into(int8_matmul(codes, q.weight_q), stats, q.weight_scale, q.bias.float())
    want.addmm_(x[:, cols], q._dequantized_cols(cols).t())
    got = q(x)
    if torch.backends.mkl.is_available():
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 80),
    seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.0, 0.5, 1.5, 6.0]),
    specials=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 6.0, -6.0]), max_size=4),
)
@settings(max_examples=120, deadline=None)
def test_quantize_decompose_is_the_reference_bit_for_bit(rows, cols, seed, threshold, specials):
    """The integer-max kernel against int8_vectorwise_quant, with NaN, inf, -0 and values at the threshold."""
    from outliers.quant.cpu_kernels import quantize_decompose

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    where = torch.randint(0, rows * cols, (len(specials),), generator=g)
    x.view(-1)[where] = torch.tensor(specials, dtype=torch.float32)
    x_float = x + 0.25  # the unrounded input the outlier columns are gathered from
    codes, stats, cols_, x_cols = quantize_decompose(x, threshold, x_float)
    ref_codes, ref_stats, ref_cols = int8_vectorwise_quant(x, threshold)
    ref_cols = torch.empty(0, dtype=torch.long) if ref_cols is None else ref_cols
    exact = dict(rtol=0, atol=0, equal_nan=True)  # NaN where the reference has NaN, else bit for bit
    torch.testing.assert_close(stats, ref_stats, **exact)
    assert torch.equal(cols_, ref_cols)
    torch.testing.assert_close(x_cols, x_float[:, ref_cols], **exact)
    finite = torch.isfinite(ref_stats)  # a NaN row's codes are undefined in both
    assert torch.equal(codes[finite], ref_codes[finite])
