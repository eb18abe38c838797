"""The method registry: the built-in Table-1 rows, a new method usable everywhere by registering it,
the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_model, planted
from torch import nn

from outliers import InvalidArgumentError
from outliers.quant.linear import Int8Linear
from outliers.quant.methods import (
    METHODS,
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


def test_a_method_must_be_well_formed():
    with pytest.raises(ValueError, match="needs a label"):
        Method("x", "", Scheme.ABSMAX, Granularity.ROW, Granularity.CHANNEL)
    with pytest.raises(ValueError, match="per tensor or row"):
        Method("x", "x", Scheme.ABSMAX, Granularity.CHANNEL, Granularity.CHANNEL)
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("llm.int8", "again", Scheme.ABSMAX, Granularity.ROW, Granularity.CHANNEL))
    with pytest.raises(InvalidArgumentError, match="unknown method 'int4'"):
        get_method("int4")


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
    assert f"| `{TOY.name}` | tensor | per output channel | no |" in method_table()
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


def test_the_readme_shows_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert method_table() in readme
