"""bfloat16 end to end on CPU (eval, scan, every method with and without transforms, save/load), and
float16 through the parts that run without an fp16 matmul on CPU.

The comparisons pair a bf16 model with its float32 *twin*: the same model upcast
(bf16 -> fp32 is exact), so any difference is arithmetic, never weights. Two kinds:

* exact, where the arithmetic allows: every quantizer upcasts (or takes an absmax,
  which is exact in any dtype) before it scales and rounds, so the codes and
  statistics from bf16 weights are the twin's, bit for bit, and a quantized layer
  (which computes in float32 on CPU) gives the twin's output for the same input;
* close, model-level: attention, norms and unquantized layers run in bf16, so the
  inputs of the quantized layers differ by bf16 rounding, and a code near a
  rounding boundary may move by one step. The bound is twice the sum of the float
  gap (bf16 model vs twin) and the twin's own quantization error: bf16 adds an
  error of the float gap's size, and a moved code at most one quantization error.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import pytest
import torch
from helpers import ARCHS, make_model, planted, planted_model

from outliers.analysis.moments import moments_table
from outliers.analysis.points import CapturePoint
from outliers.analysis.scan import scan
from outliers.analysis.stats import OutlierStats, Stat
from outliers.eval.perplexity import PerplexitySettings, perplexity
from outliers.quant.calibration import transformed_copy
from outliers.quant.emulated import quantize_fp8, quantize_rtn
from outliers.quant.int8 import int8_vectorwise_quant
from outliers.quant.linear import Int8Linear
from outliers.quant.methods import METHODS
from outliers.quant.model import load_quantized, quantize_linear, quantized_copy, save_quantized
from outliers.quant.quantizers import quantize_absmax, quantize_zeropoint
from outliers.quant.transforms import Transform

CORPUS = torch.randint(0, 384, (2000,), generator=torch.Generator().manual_seed(0))
BATCH = CORPUS[:96].view(3, 32)
NONE = Transform()
TRANSFORMS = [NONE, Transform(smooth=0.5), Transform(rotate="hadamard")]
HALF = [torch.bfloat16, torch.float16]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=BATCH).logits


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """The float32 copy of a bf16 model: the same weights, exactly."""
    return copy.deepcopy(model).float()


@cache
def bf16_model(arch: str, transform: Transform = NONE) -> torch.nn.Module:
    """A tiny seeded bf16 model, transformed when asked (calibrated on the corpus' end, apart from BATCH)."""
    model = make_model(arch).to(torch.bfloat16)
    if transform:
        model, _ = transformed_copy(model, transform, CORPUS, window=32, reserved=BATCH.numel())
    return model


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, in the same dtype (FP8 codes compared as bytes: float8 has no ``equal``)."""
    bytes_ = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and bytes_(a).equal(bytes_(b))


def quant_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from outliers.quant.model import QuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# ---------------------------------------------------------------- eval and scan


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_of_a_bf16_model(arch):
    model = bf16_model(arch)
    r = perplexity(model, CORPUS, PerplexitySettings(window=32, max_windows=8), progress=False)
    ref = perplexity(twin(model), CORPUS, PerplexitySettings(window=32, max_windows=8), progress=False)
    assert r.dtype == r.method == "bf16" and ref.dtype == "fp32"
    assert math.isfinite(r.ppl) and r.token_nll.dtype.name == "float32"
    # NLLs are float32 sums either way; bf16 logits move a random model's ppl (~385) by < 1e-4 relative here
    assert r.ppl == pytest.approx(ref.ppl, rel=1e-3)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_statistics_of_half_inputs_equal_those_of_their_float32_upcast(dtype):
    point = CapturePoint("L00.attn_in", "blocks.0", 0, "attn_in", "hidden", 499)
    x = planted(37, 499)  # outlier columns 3, 250, 498 beside N(0, 1)

    def fill(x):
        st = OutlierStats([point], top_k=4)
        ids = torch.arange(len(x))
        st.update(point, x, {}, ids // 10, ids % 10, ids, 0)
        return st

    half, upcast = fill(x.to(dtype)), fill(x.to(dtype).float())
    assert half.tensors.keys() == upcast.tensors.keys()
    for k, v in half.tensors.items():
        assert v.dtype == upcast.tensors[k].dtype and v.equal(upcast.tensors[k]), k
    assert half.get(point.name, Stat.ABSMAX).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_of_a_bf16_model(arch):
    model = planted_model(arch).to(torch.bfloat16)
    kw = dict(window=32, max_tokens=256, progress=False)
    st, ref = scan(model, CORPUS, **kw), scan(twin(model), CORPUS, **kw)
    assert st.meta["tokens_scanned"] == 256 and not any(st.nonfinite.values())
    for k, v in st.tensors.items():  # the accumulators keep their dtypes (float32/64, int64) whatever the model's
        assert v.dtype == ref.tensors[k].dtype, k
    for p in st.points:
        # bf16 activations: |x| within a few bf16 ulps (2^-8 relative) of the twin's after two blocks
        torch.testing.assert_close(st.get(p.name, Stat.ABSMAX), ref.get(p.name, Stat.ABSMAX), rtol=3e-2, atol=3e-2)
    table, ref_table = moments_table(st), moments_table(ref)
    assert table.token_kurtosis.notna().all()
    assert table.token_kurtosis.to_numpy() == pytest.approx(ref_table.token_kurtosis.to_numpy(), rel=3e-2)


# ---------------------------------------------------------------- the quantizers on half tensors


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_quantizers_give_the_codes_of_the_float32_upcast(dtype):
    """Pure functions on half tensors (no matmul): the codes and statistics of the exact float32 upcast."""
    x = planted(37, 499).to(dtype)
    xf = x.float()
    for fn in (
        lambda t: quantize_absmax(t),
        lambda t: quantize_absmax(t, -1),
        lambda t: quantize_zeropoint(t),
        lambda t: quantize_zeropoint(t, -1),
        lambda t: int8_vectorwise_quant(t, 6.0),
        lambda t: int8_vectorwise_quant(t, 0.0)[:2],
        lambda t: quantize_fp8(t, -1),
        lambda t: quantize_rtn(t, 128),
    ):
        for got, want in zip(fn(x), fn(xf), strict=True):
            assert same(got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_half_layer_is_its_float32_twin(method, dtype):
    """From half weights: the twin's codes, and for a half input the twin's output rounded to the input's dtype.

    On CPU every layer computes in float32 (no half matmul runs here); the output comes back in the input's dtype.
    """
    torch.manual_seed(0)
    lin = torch.nn.Linear(499, 33).to(dtype)
    q, ref = quantize_linear(lin, method), quantize_linear(copy.deepcopy(lin).float(), method)
    for (name, got), (_, want) in zip(q.state_dict().items(), ref.state_dict().items(), strict=True):
        assert got.float().equal(want.float()) if got.is_floating_point() else got.equal(want), name
    x = planted(37, 499).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.equal(ref(x.float()).to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.decomposition])
def test_the_decomposed_product_of_a_half_input_is_taken_in_float32(method, dtype):
    """The torch path as CUDA runs it for half inputs (the input is not upcast there): the float outlier
    product meets the float32 int8 result in float32, as the Numba kernel's epilogue adds it."""
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(499, 33).to(dtype), method, outlier_weights="fp")
    x = planted(37, 499).to(dtype)
    out = q._forward_2d(x, x)  # what forward does on CUDA with backend="torch"
    assert out.dtype == torch.float32
    assert out.equal(q._forward_2d(x.float(), x.float()))  # the upcast is exact, the arithmetic the same


# ---------------------------------------------------------------- every method, with and without transforms


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.label or "none")
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_quantizes_a_bf16_model(arch, method, transform):
    model = bf16_model(arch, transform)
    ref_float = twin(model)
    q, report = quantized_copy(model, method)
    ref, _ = quantized_copy(ref_float, method)
    assert report.replaced and report.bytes_before > 0
    got_layers, ref_layers = quant_layers(q), quant_layers(ref)
    assert got_layers.keys() == ref_layers.keys() and len(got_layers) == len(report.replaced)
    for name, layer in got_layers.items():  # bf16 weights, the twin's codes and statistics
        for (k, got), (_, want) in zip(layer.state_dict().items(), ref_layers[name].state_dict().items(), strict=True):
            assert got.float().equal(want.float()) if got.is_floating_point() else got.equal(want), f"{name}.{k}"
    out, ref_out, ref_plain = logits(q), logits(ref), logits(ref_float)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    float_gap = (logits(model).float() - ref_plain).abs().max()
    quant_err = (ref_out - ref_plain).abs().max()
    assert (out.float() - ref_out).abs().max() <= 2 * (float_gap + quant_err)


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=lambda t: t.label)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_transformed_bf16_model_keeps_its_dtype_and_function(arch, transform):
    model = bf16_model(arch)
    out = bf16_model(arch, transform)
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    a, b = logits(model), logits(out)
    assert b.dtype == torch.bfloat16
    # the transform rounds each scaled or rotated weight (and a rotated input) to bf16 once more: a second
    # bf16 rounding, of the size of the bf16-vs-float32 gap itself (measured <= 2.2x of it on planted models)
    float_gap = (a.float() - logits(twin(model))).abs().max()
    assert (b.float() - a.float()).abs().max() <= 4 * float_gap


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("method", ["llm.int8", "zeropoint-vector", "fp8-token", "w4a16-g128"])
def test_save_and_load_a_quantized_bf16_model(tmp_path, method):
    q, _ = quantized_copy(bf16_model("llama"), method)
    path = save_quantized(q, tmp_path / "q.safetensors")
    loaded = load_quantized(make_model("llama").to(torch.bfloat16), path, method)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    # bias and float copies load into the empty layer's float32 buffers: bf16 values, exactly
    out = logits(loaded)
    assert out.dtype == torch.bfloat16 and out.equal(logits(q))
    assert {type(m) for m in quant_layers(loaded).values()} == {type(m) for m in quant_layers(q).values()}
