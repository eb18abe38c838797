"""FP8 E4M3 W8A8 and W4A16 RTN g128 (outliers.quant.emulated): rounding against slow references built
from the formats' definitions, the layers, and the methods on tiny models."""

from __future__ import annotations

import bisect
import math

import pytest
import torch
from helpers import make_model, planted
from torch import nn

from outliers import InvalidArgumentError
from outliers.quant.emulated import (
    E4M3_MAX,
    FP8Linear,
    W4A16Linear,
    dequantize_fp8,
    dequantize_rtn,
    fp8_matmul_dequant,
    pack_int4,
    quantize_fp8,
    quantize_rtn,
    round_to_e4m3,
    unpack_int4,
)
from outliers.quant.linear import Int8Linear, NonFiniteInputError
from outliers.quant.model import load_quantized, quantize_linear, quantize_model, quantized_copy, save_quantized

NEW = ("fp8-tensor", "fp8-token", "w4a16-g128")
F8 = torch.float8_e4m3fn

# ---------------------------------------------------------------- E4M3, slow reference


def e4m3_value(code: int) -> float:
    """The value of one E4M3 (``fn``) code from the format's definition: s.eeee.mmm, bias 7, NaN at .1111.111."""
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    mag = 2.0**-6 * m / 8 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8)  # subnormal : normal
    return -mag if s else mag


GRID = sorted((e4m3_value(c), c) for c in range(128) if not math.isnan(e4m3_value(c)))  # +0 .. 448
VALUES = [v for v, _ in GRID]


def round_e4m3_slow(x: float) -> float:
    """Clamp to ±448, then the nearest E4M3 value, ties to the even code (mantissa LSB 0)."""
    a = min(abs(x), E4M3_MAX)
    i = bisect.bisect_left(VALUES, a)
    if VALUES[i] == a:
        r = a
    else:
        (lo, lo_code), (hi, _) = GRID[i - 1], GRID[i]
        if a - lo != hi - a:
            r = lo if a - lo < hi - a else hi
        else:
            r = lo if lo_code % 2 == 0 else hi
    return -r if x < 0 else r


def test_the_e4m3_grid_is_torchs_float8_e4m3fn():
    codes = torch.arange(256, dtype=torch.uint8).view(F8).float()
    want = torch.tensor([e4m3_value(c) for c in range(256)])
    assert torch.equal(codes.isnan(), want.isnan()) and int(want.isnan().sum()) == 2
    finite = ~want.isnan()
    assert torch.equal(codes[finite], want[finite])
    assert VALUES[-1] == E4M3_MAX == codes[finite].max() and VALUES[1] == 2.0**-9  # the smallest subnormal


def _hard_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    v = torch.tensor(VALUES[1:])
    mids = (v[:-1] + v[1:]) / 2  # every tie, exact in float32: subnormal ties, 440 = (416 + 448) / 2 ...
    near = mids + torch.tensor([-1.0, 1.0]).repeat(len(mids) // 2 + 1)[: len(mids)] * mids * 2**-20
    wide = torch.exp2(torch.empty(3000).uniform_(-14, 11, generator=g))  # 6e-5 .. 2048: sub, normal, above 448
    top = torch.tensor([447.0, 447.99, 448.0, 448.01, 456.0, 463.99, 464.0, 480.0, 1e6, 3e38, 2.0**-10, 2.0**-11])
    pos = torch.cat([torch.zeros(1), v, mids, near, wide, top])
    return torch.cat([pos, -pos])


def test_round_to_e4m3_is_round_to_nearest_even_and_saturates():
    x = _hard_inputs()
    got = round_to_e4m3(x)
    assert got.dtype == F8
    want = torch.tensor([round_e4m3_slow(float(a)) for a in x])
    assert torch.equal(got.float(), want)
    assert not got.float().isnan().any()  # above 448 clamps: nothing becomes NaN
    assert round_to_e4m3(torch.tensor([440.0, 1.0625, 2.0**-10 * 3])).float().tolist() == [448.0, 1.0, 2.0**-8]


@pytest.mark.parametrize("dim", [None, -1], ids=["dim=None", "dim=-1"])
def test_quantize_fp8_puts_absmax_on_448(dim):
    x = planted(rows=29) * torch.logspace(-3, 2, 29).unsqueeze(1)  # rows over five decades
    q, absmax = quantize_fp8(x, dim)
    assert q.dtype == F8 and absmax.dtype == torch.float32
    top = q.float().abs().amax() if dim is None else q.float().abs().amax(dim)
    assert torch.all(top == E4M3_MAX)
    scale = E4M3_MAX / (absmax if dim is None else absmax.unsqueeze(dim))
    want = torch.tensor([round_e4m3_slow(float(a)) for a in (x * scale).flatten()]).reshape(x.shape)
    assert torch.equal(q.float(), want)
    xh = dequantize_fp8(q, absmax, dim)
    normal = (x * scale).abs() >= 2.0**-6  # E4M3 normals hold 3 mantissa bits: relative error <= 2^-4
    assert torch.all(((xh - x).abs() <= x.abs() * 2.0**-4)[normal])


def test_quantize_fp8_zero_and_non_finite():
    q, absmax = quantize_fp8(torch.zeros(3, 5), -1)
    assert torch.equal(q.float(), torch.zeros(3, 5)) and torch.equal(absmax, torch.zeros(3))
    _, absmax = quantize_fp8(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), -1)
    assert absmax.isnan()[0] and absmax[1] == 2.0
    lin = FP8Linear.from_linear(nn.Linear(4, 3), "fp8-token", name="blk.q")
    with pytest.raises(NonFiniteInputError, match=r"1 NaN/inf value\(s\) in the input of blk.q \(fp8-token\)"):
        lin(torch.tensor([[1.0, 2.0, float("inf"), 0.0]]))


def test_per_token_scales_spare_the_other_tokens():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    x[5] *= 1e5  # one outlier token: per tensor, the others fall to E4M3's subnormals and zero
    others = torch.arange(16) != 5
    err = {}
    for dim in (None, -1):
        xh = dequantize_fp8(*quantize_fp8(x, dim), dim)
        err[dim] = float((xh - x)[others].norm() / x[others].norm())
    assert err[None] > 0.1 and err[-1] < 0.04
    q_t, _ = quantize_fp8(x, None)
    assert (q_t.float()[others] == 0).float().mean() > 0.1  # crushed to zero, not only coarse


def test_fp8_matmul_equals_the_dequantized_product():
    x, w = planted(rows=29), torch.randn(37, 499, generator=torch.Generator().manual_seed(2))
    b = torch.randn(37)
    for dim in (None, -1):
        qx, sx = quantize_fp8(x, dim)
        qw, sw = quantize_fp8(w, dim)
        want = dequantize_fp8(qx, sx, dim) @ dequantize_fp8(qw, sw, dim).t() + b
        torch.testing.assert_close(fp8_matmul_dequant(qx, sx, qw, sw, b), want, rtol=1e-5, atol=1e-4)


def test_an_outlier_costs_fp8_per_tensor_less_than_int8_absmax():
    """Per tensor, an outlier sets the scale: int8's step grows with it, FP8 keeps 3 mantissa bits.

    Measured on the rows without the outlier. Without one, int8 absmax is the
    more precise (uniform 8-bit codes vs 3 mantissa bits), so the claim is
    only about what the outlier costs.
    """
    torch.manual_seed(0)
    lin = nn.Linear(499, 37)
    clean = torch.arange(29) % 3 != 0  # planted() puts its outliers in every third row

    def err(method: str, cls: type, scale: float) -> float:
        x = planted(rows=29, scale=scale)
        y0, y = lin(x).detach(), cls.from_linear(lin, method)(x).detach()
        return float((y - y0)[clean].norm() / y0[clean].norm())

    fp8_1, int8_1 = err("fp8-tensor", FP8Linear, 1.0), err("absmax", Int8Linear, 1.0)
    fp8_100, int8_100 = err("fp8-tensor", FP8Linear, 100.0), err("absmax", Int8Linear, 100.0)
    assert int8_1 < fp8_1  # no outlier: int8 wins
    assert fp8_100 < 1.2 * fp8_1 and int8_100 > 10 * int8_1  # the outlier: FP8 barely notices, int8 does
    assert fp8_100 < int8_100 / 5


# ---------------------------------------------------------------- int4 RTN


def test_rtn_by_hand():
    w = torch.tensor([[0.0, 1.5, -0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale, zero = quantize_rtn(w, group_size=4)
    s = 3.5 / 15  # range [-0.5, 3.0]; zero = round(0.5 / s) = round(2.14) = 2
    assert q.tolist() == [[2, 8, 0, 15], [7, 7, 7, 7]]  # round(w / s) + 2: 0, 6, -2, 13 (+ 2)
    # an all-zero group takes [-1, 1] (GPTQ): scale 2/15, zero = round(1 / float32(2/15)) = round(7.4999995) = 7
    assert zero.tolist() == [[2], [7]]
    torch.testing.assert_close(scale, torch.tensor([[s], [2 / 15]]))
    what = dequantize_rtn(q, scale, zero, 4)
    torch.testing.assert_close(what, torch.tensor([[0.0, 6 * s, -2 * s, 13 * s], [0.0, 0.0, 0.0, 0.0]]))


def rtn_slow(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ's quantize(find_params(group)) over each group of each row, one at a time."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group_size):
            g = w[r, c0 : c0 + group_size]
            lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
            if lo == hi == 0:
                lo, hi = -1.0, 1.0
            scale = torch.tensor((hi - lo) / 15, dtype=torch.float32)
            zero = torch.round(-torch.tensor(lo) / scale)
            q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
            out[r, c0 : c0 + group_size] = scale * (q - zero)
    return out


@pytest.mark.parametrize("in_f", [128, 300, 37], ids=["in=128", "in=300 (last group 44)", "in=37 (one partial)"])
def test_rtn_groups_and_a_partial_last_group(in_f):
    w = torch.randn(7, in_f, generator=torch.Generator().manual_seed(in_f)) * 0.05
    w[3, 5] = 1.0  # a weight outlier: only its own group's step grows
    q, scale, zero = quantize_rtn(w, 128)
    groups = math.ceil(in_f / 128)
    assert q.shape == w.shape and scale.shape == zero.shape == (7, groups)
    assert int(q.max()) <= 15 and int(zero.max()) <= 15
    what = dequantize_rtn(q, scale, zero, 128)
    torch.testing.assert_close(what, rtn_slow(w, 128), rtol=0, atol=1e-7)
    for r in range(7):
        for c0 in range(0, in_f, 128):
            assert what[r, c0 : c0 + 128].unique().numel() <= 16
    if in_f == 300:  # the last group's statistics are over its own 44 columns
        q_last, s_last, z_last = quantize_rtn(w[:, 256:], 128)
        assert (
            torch.equal(q[:, 256:], q_last) and torch.equal(scale[:, 2:], s_last) and torch.equal(zero[:, 2:], z_last)
        )
    assert (what - w).abs().max() <= scale.max() / 2 + 1e-7


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.shape == (5, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 37), q)


# ---------------------------------------------------------------- layers


def test_the_layers_store_codes_not_floats():
    lin = nn.Linear(300, 37)
    f = FP8Linear.from_linear(lin, "fp8-token")
    w = W4A16Linear.from_linear(lin, "w4a16-g128")
    assert {n: b.dtype for n, b in f.named_buffers()} == {
        "bias": torch.float32,
        "weight_q": F8,
        "weight_absmax": torch.float32,
    }
    assert f.weight_absmax.shape == (37,) and FP8Linear.from_linear(lin, "fp8-tensor").weight_absmax.shape == (1,)
    assert {n: tuple(b.shape) for n, b in w.named_buffers()} == {
        "bias": (37,),
        "weight_packed": (37, 150),
        "weight_scale": (37, 3),
        "weight_zero": (37, 3),
    }
    assert not list(f.parameters()) and not list(w.parameters())
    assert w.codes().unique().numel() <= 16


@pytest.mark.parametrize("method", NEW)
def test_a_layer_computes_its_definition(method):
    lin = nn.Linear(300, 37)
    x = planted(rows=29, cols=300, outlier_cols=(3, 250))
    layer = quantize_linear(lin, method)  # the method's format picks the class
    assert type(layer) is (W4A16Linear if method.startswith("w4") else FP8Linear)
    w_hat = layer.dequantized_weight()
    if method == "w4a16-g128":
        want = x @ w_hat.t() + lin.bias.detach()  # X stays in float
    else:
        dim = None if method == "fp8-tensor" else -1
        want = dequantize_fp8(*quantize_fp8(x, dim), dim) @ w_hat.t() + lin.bias.detach()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    y = layer(x.to(torch.bfloat16).reshape(29, 1, 300))  # leading dims kept, dtype cast back
    assert y.shape == (29, 1, 37) and y.dtype == torch.bfloat16
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()) < 0.1


def test_conv1d_weights_are_read_as_out_by_in():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(37, 300)  # nf=37 outputs, nx=300 inputs; weight stored (in, out)
    nn.init.normal_(conv.weight, std=0.05)
    lin = nn.Linear(300, 37)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    x = torch.randn(5, 300)
    for method in NEW:
        cls = W4A16Linear if method.startswith("w4") else FP8Linear
        assert torch.equal(cls.from_linear(conv, method)(x), cls.from_linear(lin, method)(x))


def test_repr_and_wrong_layer_for_a_method():
    assert "method='fp8-token', x='row', w='channel', bias=True" in repr(
        FP8Linear.from_linear(nn.Linear(8, 4), "fp8-token")
    )
    r = repr(W4A16Linear.from_linear(nn.Linear(8, 4), "w4a16-g128", round_to="float16"))
    assert "method='w4a16-g128', group_size=128, round_to='float16'" in r
    with pytest.raises(InvalidArgumentError, match="Int8Linear runs int8 methods; 'fp8-tensor' is fp8-e4m3"):
        Int8Linear.from_linear(nn.Linear(8, 4), "fp8-tensor")
    with pytest.raises(InvalidArgumentError, match="FP8Linear runs fp8-e4m3 methods; 'llm.int8' is int8"):
        FP8Linear(8, 4, "llm.int8")
    with pytest.raises(InvalidArgumentError, match="round_to must be one of"):
        FP8Linear(8, 4, "fp8-tensor", round_to="float8")
    with pytest.raises(InvalidArgumentError, match="expects inputs with 8 features"):
        FP8Linear.from_linear(nn.Linear(8, 4), "fp8-tensor")(torch.randn(2, 9))


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", NEW)
def test_quantized_copy_is_close_to_float_and_leaves_it_alone(arch, method):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    q, report = quantized_copy(model, method)
    layer = W4A16Linear if method.startswith("w4") else FP8Linear
    assert report.replaced and all(isinstance(q.get_submodule(n), layer) for n in report.replaced)
    assert report.skipped == ["lm_head"] and report.threshold == 0.0
    assert report.saved_fraction > (0.8 if layer is W4A16Linear else 0.7)
    assert [type(m) for m in model.modules()] == kinds  # the float model keeps its layers and weights
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y0, y = model(ids).logits, q(ids).logits
        nll0 = nn.functional.cross_entropy(y0[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        nll = nn.functional.cross_entropy(y[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert ((y - y0).norm() / y0.norm()) < 0.1  # measured 0.015-0.045 on these models
    assert abs(math.exp(nll) / math.exp(nll0) - 1) < 0.02  # perplexity of random ids, within 2 %
    with pytest.raises(InvalidArgumentError, match=f"already quantized .* method '{method}'"):
        quantize_model(q, "llm.int8")


@pytest.mark.parametrize("method", NEW)
def test_save_load_roundtrip_is_bit_identical(method, tmp_path):
    model = make_model("gpt2")
    quantize_model(model, method, round_to="float16" if method == "fp8-token" else None)
    path = save_quantized(model, tmp_path / "q.safetensors")
    fresh = load_quantized(make_model("gpt2", seed=123), path, method=method)
    ids = torch.randint(0, 384, (2, 24))
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    name = "transformer.h.0.mlp.c_fc"
    assert repr(fresh.get_submodule(name)) == repr(model.get_submodule(name))


def test_eval_cli_runs_a_new_method(model_dir, text_file, capsys):
    from outliers.cli import main

    args = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "64"]
    assert main([*args, "--max-windows", "2", "--method", "w4a16-g128", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "w4a16-g128" in out and "vs reference" in out
