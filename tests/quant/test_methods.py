"""The method registry: the built-in Table-1 rows and the FP8 / W4A16 reference rows, a new method
usable everywhere by registering it (of any format), the docs' table (docs/quantization.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_model, planted
from torch import nn

from outliers import InvalidArgumentError
from outliers.quant.emulated import FP8Linear, W4A16Linear
from outliers.quant.linear import Int8Linear
from outliers.quant.methods import (
    METHODS,
    Format,
    Granularity,
    Method,
    Scheme,
    get_method,
    label,
    method_table,
    register_method,
)
from outliers.quant.model import quantize_model
from outliers.quant.quantizers import dequantize_absmax, quantize_absmax

TOY = Method(
    "absmax-channel",
    "absmax, X per tensor, W per output channel",
    Scheme.ABSMAX,
    Granularity.TENSOR,
    Granularity.CHANNEL,
)


def test_the_table1_rows_in_the_papers_order():
    assert list(METHODS)[:8] == [
        "absmax",
        "zeropoint",
        "absmax-row",
        "absmax-vector",
        "zeropoint-vector",
        "absmax-row+decomp",
        "llm.int8",
        "zeropoint-llm.int8",
    ]
    m = get_method("llm.int8")
    assert (m.scheme, m.activations, m.weights, m.decomposition) == (
        Scheme.ABSMAX,
        Granularity.ROW,
        Granularity.CHANNEL,
        True,
    )
    assert m.settings == ("round_to", "threshold", "outlier_weights")
    assert get_method("absmax-vector").settings == ("round_to",)
    assert label("fp32") == "32-bit float"
    assert all(m.format is Format.INT8 and m.group_size is None for m in list(METHODS.values())[:8])


def test_the_reference_rows_after_table1():
    assert list(METHODS)[8:11] == ["fp8-tensor", "fp8-token", "w4a16-g128"]
    t, k, w = (get_method(n) for n in ("fp8-tensor", "fp8-token", "w4a16-g128"))
    assert (t.format, t.scheme, t.activations, t.weights) == (
        Format.FP8_E4M3,
        Scheme.ABSMAX,
        Granularity.TENSOR,
        Granularity.TENSOR,
    )
    assert (k.activations, k.weights) == (Granularity.ROW, Granularity.CHANNEL)
    assert (w.format, w.scheme, w.activations, w.weights, w.group_size) == (
        Format.INT4,
        Scheme.ZEROPOINT,
        None,
        Granularity.GROUP,
        128,
    )
    assert "emulated" in t.label and "emulated" in k.label and "weight-only" in w.label
    assert t.settings == k.settings == w.settings == ("round_to",)
    with pytest.raises(ValueError, match="leaves X in float"):
        w.x_dim  # noqa: B018


def test_a_method_must_be_well_formed():
    with pytest.raises(ValueError, match="needs a label"):
        Method("x", "", Scheme.ABSMAX, Granularity.ROW, Granularity.CHANNEL)
    with pytest.raises(ValueError, match="per tensor or row"):
        Method("x", "x", Scheme.ABSMAX, Granularity.CHANNEL, Granularity.CHANNEL)
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("llm.int8", "again", Scheme.ABSMAX, Granularity.ROW, Granularity.CHANNEL))
    with pytest.raises(InvalidArgumentError, match="unknown method 'int4'"):
        get_method("int4")
    A, Z, R, C, G = Scheme.ABSMAX, Scheme.ZEROPOINT, Granularity.ROW, Granularity.CHANNEL, Granularity.GROUP
    with pytest.raises(ValueError, match="int8 quantizes X per tensor or row, W per tensor or channel"):
        Method("x", "x", A, None, C)
    with pytest.raises(ValueError, match="fp8-e4m3 takes scheme absmax"):
        Method("x", "x", Z, R, C, format=Format.FP8_E4M3)
    with pytest.raises(ValueError, match="decomposition is int8 only"):
        Method("x", "x", A, R, C, decomposition=True, format=Format.FP8_E4M3)
    with pytest.raises(ValueError, match="int4 leaves X in float and quantizes W per group"):
        Method("x", "x", Z, R, G, format=Format.INT4, group_size=128)
    for size in (None, 0):
        with pytest.raises(ValueError, match=f"group_size >= 1 goes with group-wise weights, got {size}"):
            Method("x", "x", Z, None, G, format=Format.INT4, group_size=size)
    with pytest.raises(ValueError, match="group_size >= 1 goes with group-wise weights, got 64"):
        Method("x", "x", A, R, C, group_size=64)


def test_a_new_method_is_one_record(monkeypatch, model_dir, text_file, capsys):
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    lin = nn.Linear(499, 37)
    x = planted(rows=29)
    q, s = quantize_absmax(x)  # what the record asks for, by hand: X per tensor, W per output channel
    wq, ws = quantize_absmax(lin.weight.detach(), -1)
    want = dequantize_absmax(q, s) @ dequantize_absmax(wq, ws, -1).t() + lin.bias.detach()
    got = Int8Linear.from_linear(lin, TOY.name)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert quantize_model(make_model("llama"), TOY.name).method == TOY.name
    assert f"| `{TOY.name}` | int8 | tensor | per output channel | no |" in method_table()
    from outliers.cli import main

    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir("llama")),
                "--corpus",
                str(text_file),
                "--window",
                "64",
                "--max-windows",
                "2",
                "--method",
                TOY.name,
                "--quiet",
            ]
        )
        == 0
    )
    assert "vs reference" in capsys.readouterr().out


@pytest.mark.parametrize(
    "toy, layer",
    [
        (
            Method(
                "fp8-channel",
                "FP8, X per tensor, W per channel",
                Scheme.ABSMAX,
                Granularity.TENSOR,
                Granularity.CHANNEL,
                format=Format.FP8_E4M3,
            ),
            FP8Linear,
        ),
        (
            Method(
                "w4a16-g32",
                "W4A16 RTN g32",
                Scheme.ZEROPOINT,
                None,
                Granularity.GROUP,
                format=Format.INT4,
                group_size=32,
            ),
            W4A16Linear,
        ),
    ],
    ids=["fp8-channel", "w4a16-g32"],
)
def test_a_new_method_of_another_format_is_one_record(monkeypatch, toy, layer):
    monkeypatch.setitem(METHODS, toy.name, toy)
    model = make_model("llama")  # hidden 32, MLP 64: two groups of 32 in the down projection
    report = quantize_model(model, toy.name)
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, layer) and report.method == toy.name
    if layer is W4A16Linear:
        assert down.weight_scale.shape == (32, 2)
    else:
        assert down.weight_absmax.shape == (32,)
    assert f"| `{toy.name}` |" in method_table()


def test_the_docs_show_the_registry():
    page = (Path(__file__).parents[2] / "docs" / "quantization.md").read_text()
    assert method_table() in page
