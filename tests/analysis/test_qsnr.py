"""Quantization SNR against the crest factor (outliers.analysis.qsnr): the measures, the noise model beside them."""

import math

import pytest
import torch
from helpers import make_model

from outliers.analysis import qsnr


def test_qsnr_and_crest_by_hand():
    x = torch.ones(2, 64)
    assert qsnr.qsnr_db(x, x) == math.inf
    assert qsnr.qsnr_db(x, x * 1.1) == pytest.approx(20.0)  # noise 1 % of the signal's power
    assert torch.allclose(qsnr.crest_factor(x), torch.ones(2, 2))
    spike = torch.zeros(1, 32)
    spike[0, 5] = -3.0
    assert qsnr.crest_factor(spike).item() == pytest.approx(math.sqrt(32))  # a block's largest crest
    assert qsnr.crest_factor(spike, None).item() == pytest.approx(math.sqrt(32))


def test_the_model_follows_the_measurement_on_gaussian_data():
    t = qsnr.gaussian_table(512).set_index("format")
    for name in ("mxint8", "mxfp8", "mxfp6", "int8-tensor", "fp8-tensor"):
        assert t.loc[name, "model dB"] == pytest.approx(t.loc[name, "measured dB"], abs=0.3), name
    assert t.loc["int8-tensor", "closed form dB"] == pytest.approx(t.loc["int8-tensor", "measured dB"], abs=0.3)
    assert t.loc["mxint8", "closed form dB"] == pytest.approx(t.loc["mxint8", "measured dB"], abs=1.0)
    assert math.isnan(t.loc["mxfp4", "closed form dB"])  # none for E2M1
    order = t["measured dB"]
    assert order["mxint8"] > order["mxfp8"] > order["mxfp8-e5m2"] and order["mxfp6"] > order["nvfp4"] > order["mxfp4"]


def test_blocks_built_to_a_crest_and_where_int_and_fp_cross():
    g = torch.Generator().manual_seed(0)
    x = qsnr._blocks_at(4.0, 64, g)
    assert torch.allclose(qsnr.crest_factor(x), torch.full((64, 1), 4.0))
    sweep = qsnr.crest_sweep((3.0, 5.5), n_blocks=256)
    assert (sweep["mxint8 dB"] > sweep["mxfp8 dB"]).all()  # in a block of 32 MXINT8 stays ahead
    tensors = qsnr.tensor_sweep((4, 30), shape=(32, 256))
    assert (tensors["int8-tensor dB"].iloc[0], tensors["fp8-tensor dB"].iloc[1]) > (
        tensors["fp8-tensor dB"].iloc[0],
        tensors["int8-tensor dB"].iloc[1],
    )
    crests, int8, fp8 = (list(tensors[c]) for c in ("tensor crest", "int8-tensor dB", "fp8-tensor dB"))
    cross = qsnr.crossing(crests, int8, fp8)
    assert cross is not None and 6 < cross < 20  # the closed forms: 10.4
    assert qsnr.crossing([1, 2], [1, 2], [0, 1]) is None


def test_real_inputs_by_tensor_and_by_block():
    model = make_model("llama")  # hidden 32, MLP 64
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    tensors = qsnr.capture_inputs(model, ids, [0, 1], ("mlp.gate_proj", "mlp.down_proj"))
    assert list(tensors) == [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate_proj", "down_proj")]
    assert tensors["model.layers.0.mlp.down_proj"].shape == (2, 16, 64)
    table = qsnr.tensor_table(tensors, ("mxint8", "mxfp8", "nvfp4"))
    assert len(table) == 4 and (table["mxint8 dB"] > table["mxfp8 dB"]).all()
    blocks = qsnr.block_table(tensors)
    assert blocks["blocks"].sum() == 2 * 16 * (1 + 2 + 1 + 2)
    assert set(blocks.columns) >= {"mxint8 dB", "mxfp8 model dB", "mxfp8 better, % of blocks"}
