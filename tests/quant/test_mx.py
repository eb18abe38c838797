"""Microscaling and NVFP4 (outliers.quant.mx): each element type's rounding bit for bit against ml_dtypes over every
code, the E8M0 FLOOR rule and NVFP4's two-level scale on hand-made blocks, torchao's reference quantizers tensor
for tensor where torchao is installed, the layer and the methods."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from outliers.quant.linear import NonFiniteInputError
from outliers.quant.methods import METHODS, Format, Granularity, Method, Scheme
from outliers.quant.model import load_quantized, quantize_linear, quantized_copy, save_quantized
from outliers.quant.mx import (
    ELEMENTS,
    MXLinear,
    code_values,
    decode,
    encode,
    fake_quantize,
    mx_dequantize,
    mx_quantize,
    nvfp4_dequantize,
    nvfp4_quantize,
    reference_round,
    round_element,
)

FLOATS = ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"]
MX_METHODS = [n for n, m in METHODS.items() if isinstance(quantize_linear(nn.Linear(32, 2), n), MXLinear)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def probes(element: str) -> torch.Tensor:
    """Every finite code, each midpoint between neighbours (the ties) and one float32 step either side of it,
    subnormals and random values over the range and far beyond it (±inf and huge values saturate)."""
    v = code_values(element)
    v = torch.unique(v[torch.isfinite(v)])
    mids = (v[1:] + v[:-1]) / 2
    up, down = torch.full_like(mids, math.inf), torch.full_like(mids, -math.inf)
    g = torch.Generator().manual_seed(0)
    top = ELEMENTS[element].max
    wide = torch.exp(torch.randn(20000, generator=g) * 6) * torch.randn(20000, generator=g).sign()
    extreme = torch.tensor([math.inf, -math.inf, 3e38, -3e38, 1e-40, -1e-40, 0.0, -0.0])
    near = torch.randn(20000, generator=g) * top / 3
    return torch.cat([v, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), near, wide, extreme])


@pytest.mark.parametrize("element", FLOATS)
def test_every_code_and_every_tie_match_ml_dtypes(element):
    import ml_dtypes

    el = ELEMENTS[element]
    dtype = getattr(ml_dtypes, el.ml_dtype)
    table = np.arange(2**el.bits, dtype=np.uint8).view(dtype).astype(np.float32)
    assert np.array_equal(code_values(element).numpy(), table, equal_nan=True)  # every code's value
    assert float(np.nanmax(table[np.isfinite(table)])) == el.max
    x = probes(element)
    assert torch.equal(bits(round_element(x, element)), bits(reference_round(x, element)))
    q = round_element(x, element)
    assert torch.equal(bits(decode(encode(q, element), element)), bits(q))  # codes round-trip, -0 included


@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=64), st.sampled_from(FLOATS))
@settings(max_examples=60, deadline=None)
def test_rounding_is_nearest_and_idempotent(values, element):
    x = torch.tensor(values, dtype=torch.float32)
    q = round_element(x, element)
    assert torch.equal(round_element(q, element), q)
    grid = torch.unique(code_values(element)[torch.isfinite(code_values(element))])
    nearest = (x.clamp(-ELEMENTS[element].max, ELEMENTS[element].max)[:, None] - grid).abs().min(1).values
    assert torch.equal((x.clamp(-ELEMENTS[element].max, ELEMENTS[element].max) - q).abs(), nearest)


def test_the_int8_element_is_microxcaling_s():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 64.0, 127.0, 127.5, 200.0, -300.0]) / 64
    assert (round_element(x, "int8") * 64).tolist() == [0, 2, 2, -0, 64, 127, 127, 127, -127]  # ties to even
    assert ELEMENTS["int8"].max == 127 / 64 and code_values("int8")[1].item() == 2**-6


@pytest.mark.parametrize("element", ["e2m3", "e3m2", "e2m1", "int8"])
def test_nan_raises_where_the_type_has_none(element):
    with pytest.raises(NonFiniteInputError, match="has no NaN"):
        round_element(torch.tensor([1.0, math.nan]), element)


def test_fp8_keeps_nan_and_a_block_scale_refuses_it():
    assert torch.isnan(round_element(torch.tensor([math.nan]), "e4m3")).all()
    assert torch.isnan(round_element(torch.tensor([math.nan]), "e5m2")).all()
    for fn in (lambda x: mx_quantize(x, "e4m3"), nvfp4_quantize):
        with pytest.raises(NonFiniteInputError, match="1 NaN/inf value"):
            fn(torch.tensor([[1.0, math.inf, 2.0]]))


# ---------------------------------------------------------------- E8M0 scales, the FLOOR rule


def block(*head: float, n: int = 32) -> torch.Tensor:
    x = torch.zeros(1, n)
    x[0, : len(head)] = torch.tensor(head)
    return x


def test_the_floor_rule_on_hand_made_blocks():
    # max exactly a power of two: it lands on 2^emax (E4M3: 4 -> 256, s = 2 - 8)
    q, s = mx_quantize(block(4.0, 1.0, -0.5), "e4m3")
    assert s.item() == -6 and q[0, :3].tolist() == [256.0, 64.0, -32.0]
    # just below a power of two: floor(log2) is one less, the max lands just below 2^(emax+1) and saturates
    below = float(np.nextafter(np.float32(4.0), np.float32(0)))  # 3.9999998, a float32
    q, s = mx_quantize(block(below), "e4m3")
    assert s.item() == -7 and q[0, 0].item() == 448.0  # 511.99997 would round to 512: saturated, not NaN
    q, s = mx_quantize(block(7.5, 3.0), "e2m1")  # E2M1: scaled max in [4, 8), above 6 saturates
    assert s.item() == 0 and q[0, :2].tolist() == [6.0, 3.0]
    q, s = mx_quantize(block(1.999), "int8")  # INT8: 1.999 * 64 = 127.9 -> 128 -> saturated to 127
    assert s.item() == 0 and q[0, 0].item() == 127 / 64
    # all zeros: 2^-127, elements and values 0
    q, s = mx_quantize(torch.zeros(2, 32), "e4m3")
    assert s.tolist() == [[-127], [-127]] and not q.any() and not mx_dequantize(q, s).any()
    # E8M0's range: a subnormal max clamps to -127, float32's largest to 127 (INT8's emax is 0)
    assert mx_quantize(block(1e-40), "e4m3")[1].item() == -127
    assert mx_quantize(block(3e38), "int8")[1].item() == 127
    # one scale per block of 32 along the last dimension; a last block of 8 takes its own
    x = torch.cat([block(1.0), block(1024.0, n=8)], dim=1)
    q, s = mx_quantize(x, "e4m3")
    assert q.shape == (1, 40) and s.tolist() == [[0 - 8, 10 - 8]]
    assert mx_dequantize(q, s)[0, [0, 32]].tolist() == [1.0, 1024.0]


@given(st.integers(-60, 60), st.sampled_from(["e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "int8"]))
@settings(max_examples=40, deadline=None)
def test_a_power_of_two_moves_the_scale_not_the_elements(k, element):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(k + 100))
    q, s = mx_quantize(x, element)
    q2, s2 = mx_quantize(x * 2.0**k, element)
    assert torch.equal(q, q2) and torch.equal(s2, s + k)


def test_nvfp4_two_level_scale_by_hand():
    x = torch.zeros(1, 48)
    x[0, 0], x[0, 1] = 2688.0, 1000.0  # block 0: the tensor's max, 448 * 6: t = 1, b = 448
    x[0, 16], x[0, 17] = 1.8, 0.4  # block 1: 1.8 / 6 = 0.3 -> E4M3 0.3125
    x[0, 32] = 1e-6  # block 2: below E4M3's smallest normal, clamped up to 2^-6
    q, b, t = nvfp4_quantize(x)
    assert t.item() == 1.0 and b.tolist() == [[448.0, 0.3125, 2**-6]]
    assert q[0, [0, 1, 16, 17, 32]].tolist() == [6.0, 2.0, 6.0, 1.5, 0.0]  # 1000/448 = 2.23 -> 2; 0.4/0.3125 -> 1.5
    y = nvfp4_dequantize(q, b, t)
    assert y[0, [0, 16, 17]].tolist() == [2688.0, 1.875, 0.46875]
    q2, b2, t2 = nvfp4_quantize(x * 3)  # the per-tensor scale takes the factor; blocks and elements stay
    assert t2.item() == 3.0 and torch.equal(b2, b) and torch.equal(q2, q)
    assert nvfp4_quantize(torch.zeros(2, 16))[2].item() == 1.0


# ---------------------------------------------------------------- torchao, tensor for tensor

TORCHAO = importlib.util.find_spec("torchao") is not None


@pytest.mark.skipif(not TORCHAO, reason="torchao is not installed (not a dependency: see docs/formats.md)")
def test_torchao_s_reference_quantizers_agree():
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize as ao_nvfp4
    from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.exp(2 * torch.randn(64, 1, generator=g))
    x[::5, 7] *= 100  # outliers in some blocks
    dtypes = {
        "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2,
        "e2m3": DTYPE_FP6_E2M3,
        "e3m2": DTYPE_FP6_E3M2,
        "e2m1": torch.float4_e2m1fn_x2,
    }
    for element, dtype in dtypes.items():
        scale, data = to_mx(x, dtype, 32)  # the FLOOR rule is torchao's default
        q, s = mx_quantize(x, element)
        assert torch.equal(scale.view(torch.uint8).to(torch.int32) - 127, s), element
        assert torch.equal(to_dtype(data, scale, dtype, 32, torch.float32), mx_dequantize(q, s)), element
    t = per_tensor_amax_to_scale(x.abs().amax())
    scales, packed = ao_nvfp4(x, 16, t)
    q, b, t_ours = nvfp4_quantize(x)
    assert torch.equal(t, t_ours) and torch.equal(scales.float(), b)
    assert torch.equal(f4_unpacked_to_f32(unpack_uint4(packed)).reshape(q.shape), q)


# ---------------------------------------------------------------- the layer and the methods


def test_the_methods_are_records_of_their_formats():
    names = ["mxfp8", "mxfp8-e5m2", "mxfp6", "mxfp6-e3m2", "mxfp4", "mxint8", "nvfp4", "mxfp4-w", "nvfp4-w"]
    assert MX_METHODS == names
    for n in names:
        m = METHODS[n]
        assert "(emulated)" in m.label and not m.in_all and m.settings == ("round_to",)
        assert m.group_size == (16 if m.format is Format.NVFP4 else 32) and m.weights is Granularity.GROUP
        assert (m.activations is None) == n.endswith("-w")
    with pytest.raises(ValueError, match="nvfp4 has blocks of 16, got 32"):
        Method("x", "x", Scheme.ABSMAX, Granularity.GROUP, Granularity.GROUP, format=Format.NVFP4, group_size=32)


@pytest.mark.parametrize("method", MX_METHODS)
def test_the_layer_is_the_functions(method):
    torch.manual_seed(0)
    lin = nn.Linear(72, 24)  # 72 inputs: a last block shorter than the others
    q = quantize_linear(lin, method)
    fmt = METHODS[method].format
    w = fake_quantize(lin.weight.detach(), fmt)
    assert torch.equal(q.dequantized_weight(), w)
    x = torch.randn(5, 3, 72)
    x2 = x.reshape(15, 72)  # the layer quantizes X as (tokens, features): NVFP4's tensor scale over all of them
    xq = x2 if method.endswith("-w") else fake_quantize(x2, fmt)
    assert torch.equal(q(x), nn.functional.linear(xq, w, lin.bias.detach()).reshape(5, 3, 24))
    if not method.endswith("-w"):
        with pytest.raises(NonFiniteInputError, match=f"the input of MXLinear \\({method}\\)"):
            q(torch.full((2, 72), math.nan))


def test_the_codes_are_stored_in_their_bits():
    lin = nn.Linear(64, 8, bias=False)
    nbytes = {n: sum(b.numel() * b.element_size() for b in quantize_linear(lin, n).buffers()) for n in MX_METHODS}
    elements, scales = 8 * 64, 8 * 2
    assert nbytes["mxfp8"] == nbytes["mxint8"] == nbytes["mxfp6"] == elements + scales  # FP6: a code per byte
    assert nbytes["mxfp4"] == elements // 2 + scales
    assert nbytes["nvfp4"] == elements // 2 + 2 * scales + 4  # E4M3 scales per 16, a float32 per tensor


def test_save_and_load_give_the_same_model(tmp_path):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    model = make_model("llama")
    for method in ("mxfp8", "mxfp6", "mxint8", "nvfp4", "mxfp4-w"):
        q, _ = quantized_copy(model, method)
        path = save_quantized(q, tmp_path / f"{method}.safetensors")
        loaded = load_quantized(make_model("llama", seed=1), path, method)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, q(ids).logits), method


def test_each_format_scores_a_tiny_llama_in_order():
    from outliers.eval.rows import evaluate_rows, parse_rows
    from outliers.eval.windows import PerplexitySettings

    ids = torch.randint(0, 384, (400,), generator=torch.Generator().manual_seed(0))
    rows = parse_rows("formats") + parse_rows("mxfp8-e5m2,mxfp6-e3m2")[1:]
    done = evaluate_rows(make_model("llama"), ids, PerplexitySettings(window=64, max_windows=4), rows, progress=False)
    kl = {d.row.method: d.result.kl_vs_ref for d in done}
    assert all(math.isfinite(d.result.ppl) for d in done) and kl.pop("fp32") is None
    assert all(v > 0 for v in kl.values())
    # the element's precision orders the error (loosely: a factor of 2 apart at least)
    assert 2 * kl["mxint8"] < kl["mxfp8"] and 2 * kl["mxfp8"] < kl["mxfp4"] and 2 * kl["mxfp6"] < kl["mxfp4"]
    assert kl["mxfp4-w"] < kl["mxfp4"] and kl["nvfp4-w"] < kl["nvfp4"]  # X left in float
    assert kl["mxfp8"] < kl["mxfp8-e5m2"] and kl["mxfp6"] < kl["mxfp6-e3m2"]  # a mantissa bit more
