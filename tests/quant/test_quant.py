import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers.quant.quantizers import (
    dequantize_absmax,
    dequantize_zeropoint,
    int8_matmul,
    quantize_absmax,
    quantize_zeropoint,
    zeropoint_matmul_dequant,
)


def test_blog_worked_example():
    x = torch.tensor([1.2, -0.5, -4.3, 1.2, -3.1, 0.8, 2.4, 5.4])
    q, absmax = quantize_absmax(x)
    assert q.tolist() == [28, -12, -101, 28, -73, 19, 56, 127]
    assert absmax.item() == pytest.approx(5.4) and 127 / absmax.item() == pytest.approx(23.5, abs=0.05)


@pytest.mark.parametrize("dim", [None, -1], ids=["tensor", "row"])
def test_absmax_roundtrip_error_is_half_a_step(dim):
    torch.manual_seed(0)
    x = torch.randn(9, 499) * 3
    q, s = quantize_absmax(x, dim)
    step = (s if dim is None else s.unsqueeze(1)) / 127
    assert ((dequantize_absmax(q, s, dim) - x).abs() <= step / 2 + 1e-6).all()
    assert q.dtype == torch.int8 and q.abs().max() == 127


@pytest.mark.parametrize("dim", [None, -1], ids=["tensor", "row"])
def test_zeropoint_keeps_zero_exact_and_uses_full_range(dim):
    torch.manual_seed(1)
    x = torch.rand(6, 101) * 5 + 0.5  # all positive: the range is widened to hold 0
    x[:, 3] = 0.0
    q, s, z = quantize_zeropoint(x, dim)
    xhat = dequantize_zeropoint(q, s, z, dim)
    assert (xhat[:, 3] == 0).all()
    assert q.min() == -128 and q.max() == 127
    step = 1 / (s if dim is None else s.unsqueeze(1))
    assert ((xhat - x).abs() <= step / 2 + 1e-5).all()


def test_all_zero_rows_give_zero_not_nan():
    x = torch.zeros(3, 8)
    q, s = quantize_absmax(x, -1)
    assert (q == 0).all() and (dequantize_absmax(q, s, -1) == 0).all()
    q, s, z = quantize_zeropoint(x, -1)
    assert torch.isfinite(dequantize_zeropoint(q, s, z, -1)).all()


@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 30), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_int8_matmul_is_exact(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ref = a.long() @ b.long().t()  # slow, exact reference
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)


def test_int8_matmul_rejects_bad_operands():
    with pytest.raises(ValueError, match="int8 operands"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\(m, k\) and \(n, k\)"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8))


@pytest.mark.parametrize("x_dim, w_dim", [(None, None), (-1, -1), (-1, None)])
def test_zeropoint_matmul_equals_dequantized_float_matmul(x_dim, w_dim):
    torch.manual_seed(2)
    x, w = torch.randn(13, 77) + 0.7, torch.randn(11, 77)
    qx, sx, zx = quantize_zeropoint(x, x_dim)
    qw, sw, zw = quantize_zeropoint(w, w_dim)
    ref = dequantize_zeropoint(qx, sx, zx, x_dim).double() @ dequantize_zeropoint(qw, sw, zw, w_dim).double().t()
    got = zeropoint_matmul_dequant(qx, sx, zx, qw, sw, zw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["llm.int8", "absmax-vector"])
def test_from_linear_weight_codes_are_the_reference_quantizers(method):
    """The CPU float32 path quantizes weights with the fused kernel: codes and scales must be bit-identical."""
    from transformers.pytorch_utils import Conv1D

    from outliers.quant.int8 import int8_vectorwise_quant
    from outliers.quant.linear import Int8Linear

    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(37, 19)
    conv = Conv1D(19, 37)  # GPT-2's layout: weight (in, out), quantized per output channel all the same
    with torch.no_grad():
        lin.weight.copy_(torch.randn(19, 37, generator=g) * 3)
        lin.weight[4, 5] = 40.0
        conv.weight.copy_(lin.weight.T)
    for module in (lin, conv):
        q = Int8Linear.from_linear(module, method)
        codes, stats, _ = int8_vectorwise_quant(lin.weight.detach(), 0.0)
        assert torch.equal(q.weight_q, codes) and torch.equal(q.weight_scale, stats.reshape(-1))
