"""Sibling int8 linears (q, k, v; gate, up) quantize their shared input once, and only when it is unchanged."""

import gc
import weakref

import pytest
import torch
from helpers import planted_model

from outliers.quant import cpu_kernels
from outliers.quant.linear import Int8Linear
from outliers.quant.model import quantize_model
from outliers.quant.shared_input import QuantizedInput, quantized_input


@pytest.fixture
def count_quantize(monkeypatch):
    """Count the CPU quantize passes (the function Int8Linear looks up at call time)."""
    calls = []
    real = cpu_kernels.quantize_decompose

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "quantize_decompose", counted)
    return calls


def _pair(threshold=6.0, seed=0, count=None):
    """Two Int8Linears reading 32 features; ``count`` (the fixture's list) forgets their weights' quantization."""
    g = torch.Generator().manual_seed(seed)
    lins = [torch.nn.Linear(32, n) for n in (16, 24)]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
    layers = [Int8Linear.from_linear(lin, "llm.int8", threshold=threshold) for lin in lins]
    if count is not None:
        count.clear()
    return layers


def _x(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 32, generator=g)
    x[..., 5] *= 20  # an outlier column
    return x


def test_siblings_reading_one_tensor_quantize_it_once(count_quantize):
    a, b = _pair(count=count_quantize)
    x = _x()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert len(count_quantize) == 1
    with torch.no_grad():  # the same values in fresh tensors: each layer quantizes, the outputs agree bit for bit
        assert torch.equal(ya, a(x.clone())) and torch.equal(yb, b(x.clone()))
    assert len(count_quantize) == 3


def test_an_in_place_write_between_siblings_is_seen(count_quantize):
    a, b = _pair(count=count_quantize)
    x = _x()
    with torch.no_grad():
        a(x)
        x[0, 0, 0] = 100.0  # bumps the version counter: b must not take a's codes
        got = b(x)
        want = b(x.clone())
    assert len(count_quantize) == 3 and torch.equal(got, want)


def test_a_view_of_the_tensor_is_another_input(count_quantize):
    a, b = _pair(count=count_quantize)
    x = _x()
    with torch.no_grad():
        a(x)
        b(x[:2])  # another object (and shape): never the first one's entry
    assert len(count_quantize) == 2


def test_a_different_threshold_is_not_shared(count_quantize):
    (a, _), (_, b) = _pair(6.0), _pair(3.0, count=count_quantize)
    x = _x()
    with torch.no_grad():
        a(x)
        got = b(x)
        want = b(x.clone())
    assert len(count_quantize) == 3 and torch.equal(got, want)


def test_inference_tensors_are_never_shared(count_quantize):
    a, b = _pair(count=count_quantize)
    with torch.inference_mode():
        x = _x()
        a(x), b(x)
    assert len(count_quantize) == 2


def test_the_entry_goes_with_its_tensor():
    def fresh() -> QuantizedInput:
        return QuantizedInput(*(torch.zeros(1) for _ in range(4)))

    x = torch.randn(4, 4)
    first = quantized_input(x, "k", fresh)
    assert quantized_input(x, "k", fresh) is first  # the same tensor, unchanged: the entry
    ref = weakref.ref(first)
    del x, first
    gc.collect()
    assert ref() is None  # nothing keeps the codes of a tensor that is gone


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma"])
def test_a_quantized_model_is_bit_identical_with_and_without_sharing(arch, count_quantize):
    model = planted_model(arch)
    quantize_model(model, "llm.int8", 6.0)
    count_quantize.clear()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        unshared = model(ids).logits.clone()
    per_forward = len(count_quantize)
    count_quantize.clear()
    with torch.no_grad():
        shared = model(ids).logits
    assert torch.equal(shared, unshared)
    assert len(count_quantize) < per_forward  # q, k, v (and gate, up where the FFN has them) shared


@pytest.mark.parametrize("method", ["llm.int8", "absmax-vector"])
def test_re_thresholding_a_copy_is_quantizing_at_that_threshold(method):
    """A threshold sweep quantizes once and re-thresholds (studies): the same model as quantizing anew."""
    from outliers import InvalidArgumentError
    from outliers.quant.model import quantized_copy, set_threshold

    model = planted_model("llama")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    swept, report = quantized_copy(model, method, 6.0)
    for t in (2.0, 0.0, 16.0):
        report = set_threshold(swept, report, t)
        fresh, fresh_report = quantized_copy(model, method, t)
        assert report == fresh_report
        a, b = swept.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [repr(m) for m in swept.modules()] == [repr(m) for m in fresh.modules()]
        with torch.no_grad():
            assert torch.equal(swept(ids).logits, fresh(ids).logits)
    with pytest.raises(InvalidArgumentError, match="threshold must be >= 0"):
        set_threshold(swept, report, -1.0)
