import copy

import pytest
import torch
from helpers import make_model, planted
from torch import nn

from outliers import InvalidArgumentError, ModelFileError
from outliers.quant.linear import Int8Linear, NonFiniteInputError
from outliers.quant.methods import METHODS, Format
from outliers.quant.model import load_quantized, quantize_model, save_quantized

ALL = [n for n, m in METHODS.items() if m.format is Format.INT8]  # Int8Linear's; FP8/int4: test_emulated


def linear(in_f=499, out_f=37, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("method", ALL)
def test_every_method_is_close_to_float(method):
    lin, x = linear(), planted(rows=29)
    y, ref = Int8Linear.from_linear(lin, method)(x), lin(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if METHODS[method].decomposition else 0.1), rel
    assert y.shape == ref.shape and y.dtype == ref.dtype


def test_decomposition_beats_no_decomposition_with_outliers():
    lin, x = linear(), planted(rows=29, scale=40)
    err = {
        m: (Int8Linear.from_linear(lin, m)(x) - lin(x)).norm().item()
        for m in ("absmax-vector", "llm.int8", "absmax-row", "absmax-row+decomp")
    }
    assert err["llm.int8"] < err["absmax-vector"] / 3
    assert err["absmax-row+decomp"] < err["absmax-row"] / 3


def test_threshold_zero_is_plain_vectorwise():
    lin, x = linear(), planted()
    a = Int8Linear.from_linear(lin, "llm.int8", threshold=0.0)(x)
    b = Int8Linear.from_linear(lin, "absmax-vector")(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method, threshold", [("llm.int8", 6.0), ("absmax-vector", 0.0)])
def test_fused_cpu_path_equals_reference_path(method, threshold):
    from outliers.quant.int8 import llm_int8_matmul

    lin, x = linear(), planted(rows=33)
    q = Int8Linear.from_linear(lin, method, threshold=threshold)
    fast = q(x)  # float32 on CPU: the fused kernels
    ref, _ = llm_int8_matmul(x, q.weight_q, q.weight_scale, q.threshold, q.bias)  # pure torch
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


def test_outlier_weights_fp_uses_the_float_columns():
    lin, x = linear(), planted(scale=30)
    q_int8 = Int8Linear.from_linear(lin, "llm.int8", outlier_weights="int8")
    q_fp = Int8Linear.from_linear(lin, "llm.int8", outlier_weights="fp")
    assert q_fp.weight_fp is not None and q_int8.weight_fp is None
    assert (q_fp(x) - lin(x)).norm() < (q_int8(x) - lin(x)).norm()


def test_gpt2_conv1d_is_replaced_with_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(37, 499)  # nf=out, nx=in; weight stored (in, out)
    nn.init.normal_(conv.weight, std=0.05)
    nn.init.normal_(conv.bias)
    x = planted(rows=5)
    q = Int8Linear.from_linear(conv, "llm.int8")
    assert (q.in_features, q.out_features) == (499, 37)
    torch.testing.assert_close(q(x), conv(x), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=lambda t: f"threshold={t}")
def test_equals_bitsandbytes_linear8bitlt(dtype, threshold):
    bnb = pytest.importorskip("bitsandbytes")
    lin = linear(dtype=dtype)
    ref_layer = bnb.nn.Linear8bitLt(499, 37, bias=True, has_fp16_weights=False, threshold=threshold)
    ref_layer.load_state_dict(lin.state_dict())
    # .to() quantizes the weight (from fp16, as bitsandbytes always does). eval() matters: in
    # training mode bitsandbytes on CPU runs MatMul8bitFp, a float matmul on the dequantized
    # weight with no activation quantization at all.
    ref_layer = ref_layer.to("cpu").eval()
    ours = Int8Linear.from_linear(lin.half(), "llm.int8", threshold=threshold)  # same fp16 weight codes
    assert torch.equal(ours.weight_q, ref_layer.weight.CB) and torch.equal(ours.weight_scale, ref_layer.weight.SCB)
    x = planted(rows=23).to(dtype)
    with torch.inference_mode():
        ref = ref_layer(x)
        # bitsandbytes casts X to fp16 before quantizing: give ours the same rounded X
        got = ours(x.half().to(dtype))
    assert got.dtype == ref.dtype == dtype
    # its float part and output are fp16 on CPU, ours fp32: equal within fp16 rounding
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_nan_and_inf_are_errors_naming_the_module():
    q = Int8Linear.from_linear(linear(), "llm.int8", name="model.layers.3.mlp.up_proj")
    for bad in (float("nan"), float("inf")):
        x = planted()
        x[4, 17] = bad
        with pytest.raises(NonFiniteInputError, match="model.layers.3.mlp.up_proj"):
            q(x)
    q0 = Int8Linear.from_linear(linear(), "absmax-vector")
    x = planted()
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="1 NaN/inf"):
        q0(x)


def test_huge_finite_outliers_whose_sum_overflows_are_not_errors():
    # the finiteness check sums the outlier columns first: a sum that overflows must fall back to the mask
    q = Int8Linear.from_linear(linear(), "llm.int8", name="model.layers.0.mlp.down_proj")
    x = planted()
    x[:, 250] = 3e38
    assert torch.isinf(x[:, [3, 250]].sum())
    assert torch.isfinite(q(x)).all()  # no error: the input was finite


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="unknown method 'int4'"):
        Int8Linear.from_linear(linear(), "int4")
    with pytest.raises(InvalidArgumentError, match="threshold must be >= 0"):
        Int8Linear.from_linear(linear(), "llm.int8", threshold=-1)
    with pytest.raises(InvalidArgumentError, match="outlier_weights must be one of"):
        Int8Linear.from_linear(linear(), "llm.int8", outlier_weights="fp16")
    with pytest.raises(InvalidArgumentError, match="expects inputs with 499 features, got shape"):
        Int8Linear.from_linear(linear(), "llm.int8")(torch.randn(3, 498))
    with pytest.raises(InvalidArgumentError, match="expects a floating-point input, got torch.int64"):
        Int8Linear.from_linear(linear(), "llm.int8")(torch.ones(3, 499, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="expected nn.Linear or transformers' Conv1D, got Conv2d"):
        Int8Linear.from_linear(nn.Conv2d(1, 1, 1))


def test_repr_shows_method_and_threshold():
    r = repr(Int8Linear.from_linear(linear(), "llm.int8", threshold=4.0))
    assert "method='llm.int8'" in r and "threshold=4.0" in r
    assert "threshold" not in repr(Int8Linear.from_linear(linear(), "absmax"))


@pytest.mark.parametrize("method", ["llm.int8", "zeropoint-vector", "absmax"])
def test_quantize_model_report_and_outputs(arch, method):
    model = make_model(arch)
    ref = copy.deepcopy(model)
    report = quantize_model(model, method, threshold=1.0)
    assert report.skipped == ["lm_head"] and len(report.replaced) > 0
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in report.replaced)
    assert 0.6 < report.saved_fraction < 0.76  # int8 weights + float32 stats vs float32
    x = torch.randint(0, 384, (2, 24))
    with torch.inference_mode():
        y, y0 = model(x).logits, ref(x).logits
    assert ((y - y0).norm() / y0.norm()) < 0.05
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        quantize_model(model, method)


def test_quantize_model_counts_conv1d_in_gpt2():
    report = quantize_model(make_model("gpt2"), "llm.int8")
    assert sorted({n.split(".")[-1] for n in report.replaced}) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("method", ["llm.int8", "zeropoint-llm.int8", "absmax-row"])
def test_save_load_roundtrip_is_bit_identical(arch, method, tmp_path):
    model = make_model(arch)
    quantize_model(model, method, threshold=1.0, outlier_weights="fp" if method == "llm.int8" else "int8")
    path = save_quantized(model, tmp_path / "q.safetensors")
    fresh = load_quantized(make_model(arch, seed=123), path)  # different float weights: all from file
    x = torch.randint(0, 384, (2, 24))
    with torch.inference_mode():
        assert torch.equal(fresh(x).logits, model(x).logits)
    assert repr(fresh.get_submodule(next(n for n, m in fresh.named_modules() if isinstance(m, Int8Linear)))) == repr(
        model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, Int8Linear)))
    )


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    model = make_model("llama")
    quantize_model(model, "llm.int8")
    path = save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(ModelFileError, match="holds method 'llm.int8', not 'absmax'"):
        load_quantized(make_model("llama"), path, method="absmax")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match="no 'outliers.int8/1' metadata"):
        load_quantized(make_model("llama"), plain)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_quantized(make_model("llama"), tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="in the file"):
        load_quantized(make_model("llama", hidden=48), path)
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        load_quantized(model, path)
    with pytest.raises(InvalidArgumentError, match="no Int8Linear"):
        save_quantized(make_model("llama"), tmp_path / "x.safetensors")


def test_quantize_bert_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    ref = copy.deepcopy(model)
    report = quantize_model(model, "zeropoint-llm.int8", threshold=2.0)
    assert len(report.replaced) == 2 * 6 + 1 and report.skipped == []  # q,k,v,o,in,out per layer + pooler
    x = torch.randint(0, 384, (2, 12))
    with torch.inference_mode():
        y, y0 = model(x).last_hidden_state, ref(x).last_hidden_state
    assert ((y - y0).norm() / y0.norm()) < 0.05


def test_quantized_copy_shares_what_it_does_not_quantize(arch):
    from outliers.quant.linear import Int8Linear
    from outliers.quant.model import quantized_copy

    model = make_model(arch)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    q, report = quantized_copy(model, "llm.int8", 6.0)
    assert report.replaced and report.skipped == ["lm_head"]
    assert q.get_output_embeddings().weight is model.get_output_embeddings().weight
    assert q.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # the float model is untouched
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    float_ids = {id(p) for p in model.parameters()}
    int8_ids = {id(b) for m in q.modules() if isinstance(m, Int8Linear) for b in m.buffers()}
    assert not int8_ids & float_ids


@pytest.mark.parametrize(
    "method, dtype, path",
    [
        ("llm.int8", torch.float32, "cpu-fused"),
        ("absmax-vector", torch.bfloat16, "cpu-fused"),  # a CPU input is computed in float32
        ("absmax", torch.float32, "generic"),
        ("zeropoint-llm.int8", torch.float32, "generic"),
    ],
)
def test_a_layer_chooses_its_compute_path_once(method, dtype, path, monkeypatch):
    """One entry of the PATHS table per (device, dtype), chosen on the first call and kept."""
    from outliers.quant.linear import PATHS

    layer = Int8Linear.from_linear(torch.nn.Linear(32, 8), method, threshold=2.0)
    chosen = []
    real = Int8Linear._choose
    monkeypatch.setattr(Int8Linear, "_choose", lambda self, x: chosen.append(real(self, x)) or chosen[-1])
    x = 3 * torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    first = layer(x.to(dtype))
    assert torch.equal(layer(x.to(dtype)), first) and chosen == [path]
    assert layer._paths == {("cpu", torch.float32): PATHS[path]}


def test_a_layer_reports_its_float_columns_only_while_counted():
    from outliers.quant.decomposed import float_columns

    layer = Int8Linear.from_linear(torch.nn.Linear(32, 8), "llm.int8", threshold=6.0)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).clamp(-5, 5)
    x[:, [4, 9]] = 10.0  # two outlier columns, nothing else reaches 6
    with float_columns(layer) as seen:
        layer(x)
    layer(x)  # not counted
    assert seen.calls == {"": 1} and seen.share == pytest.approx(2 / 32) and layer.count_float_columns is None
