"""Number-format headroom: planted overflows are named where they are, the emulated float16 run finds them,
a clean model runs clean, hooks never outlive the call, and the FP8 shares match a slow reference."""

import math

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from outliers.analysis.range import COUNTS, E4M3, E5M2, FLOAT16, format_headroom, range_counts
from outliers.eval.perplexity import perplexity
from outliers.eval.windows import PerplexitySettings

SETTINGS = PerplexitySettings(window=32, max_windows=4, batch_size=2)
PLANT = 1e5  # past float16's 65504


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (200,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_a_clean_model_runs_clean_and_keeps_no_hook(arch, ids):
    model = make_model(arch)
    before = perplexity(model, ids, SETTINGS, progress=False).ppl
    res = format_headroom(model, ids, SETTINGS, progress=False)
    assert hook_count(model) == 0
    assert res.first_overflow == {"float16": None, "bfloat16": None}
    assert res.emulated is not None and res.emulated.clean and res.emulated.first_nonfinite is None
    assert res.ppl == pytest.approx(before, rel=1e-6)  # the hooks only read
    assert res.emulated.ppl == pytest.approx(res.ppl, rel=1e-2)  # float16's precision costs little here
    assert perplexity(model, ids, SETTINGS, progress=False).ppl == pytest.approx(before, rel=1e-6)  # unchanged
    table = res.table()
    assert len(table) == 5 * 2 and list(table.kind[:5]) == ["attn_in", "attn_out", "ffn_in", "down_in", "residual"]
    assert (table.max_abs > 0).all() and (table.fp16_headroom < 1).all()
    assert res.n_windows == 4 and res.n_tokens == 4 * 32
    n = table.n_values.to_numpy()
    assert (n == 4 * 32 * table.dims.to_numpy()).all()  # every value of every window counted once
    assert "Number-format headroom" in res._repr_html_()


def test_a_planted_residual_overflow_is_named_and_the_emulation_goes_inf(ids):
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = PLANT  # one residual dim past float16 from the start
    res = format_headroom(model, ids, SETTINGS, progress=False)
    assert hook_count(model) == 0
    first = res.first_overflow["float16"]
    assert (first.block, first.tensor, first.module) == (0, "residual", "model.layers.0")
    assert res.first_overflow["bfloat16"] is None
    e = res.emulated
    assert not e.clean and e.value == "inf" and not math.isfinite(e.ppl)
    assert (e.first_nonfinite.block, e.first_nonfinite.tensor) == (0, "residual")
    assert model.model.embed_tokens.weight[0, 5] == PLANT  # the float model as it was
    d = res.to_dict()
    assert d["first_overflow"]["float16"] == {"block": 0, "tensor": "residual", "module": "model.layers.0"}
    assert d["emulated_float16"] == {
        "first_nonfinite": {"block": 0, "tensor": "residual", "module": "model.layers.0", "value": "inf"},
        "ppl": None,
        "nll": None,
        "clean": False,
    }


def test_a_planted_down_projection_input_is_named_in_its_block(ids):
    model = make_model("llama")
    down = model.model.layers[1].mlp.down_proj

    def plant(module, args):
        x = args[0].clone()
        x[..., 3] = PLANT
        return (x,)

    handle = down.register_forward_pre_hook(plant)
    try:
        res = format_headroom(model, ids, SETTINGS, progress=False)
    finally:
        handle.remove()
    first = res.first_overflow["float16"]
    assert (first.block, first.tensor, first.module) == (1, "down_in", "model.layers.1.mlp.down_proj")
    assert res.emulated.first_nonfinite == first and res.emulated.value == "inf"
    row = res.table().set_index("point").loc["L01.down_in"]
    assert row.max_abs == PLANT and row.fp16_headroom == pytest.approx(PLANT / FLOAT16.max)
    assert row.fp16_margin_log2 < 0 and res.table().set_index("point").loc["L00.down_in"].fp16_headroom < 1
    assert hook_count(model) == 0


def test_no_emulate_runs_one_pass_and_json_has_its_fields(ids):
    res = format_headroom(make_model("gpt2"), ids, SETTINGS, progress=False, emulate=False)
    d = res.to_dict()
    assert d["emulated_float16"] is None
    for key in ("first_overflow", "points", "n_windows", "n_tokens", "window", "formats", "summary", "ppl"):
        assert key in d
    rec = d["points"][0]
    for key in ("point", "block", "kind", "max_abs", "fp16_headroom", "below_fp16_normal", "below_bf16_normal"):
        assert key in rec
    assert {"e4m3_tensor", "e4m3_token", "e5m2_tensor", "e5m2_token", "zeros", "module"} <= set(rec)
    assert d["formats"]["e4m3"]["max"] == 448 and d["formats"]["e4m3"]["smallest_subnormal"] == 2**-9
    assert d["formats"]["e5m2"]["max"] == 57344 and d["formats"]["e5m2"]["smallest_subnormal"] == 2**-16
    assert d["formats"]["float16"]["smallest_normal"] == 2**-14


def _reference(x: np.ndarray) -> dict[str, int]:
    """The counts the slow way: a loop over windows and tokens, float64."""
    out = dict.fromkeys(COUNTS, 0)
    out["n_values"] = x.size
    out["n_zero"] = int((x == 0).sum())
    for w in x:
        wmax = np.abs(w).max()
        for row in w:
            for v in np.abs(row):
                if v == 0:
                    continue
                out["below_float16_normal"] += v < 2.0**-14
                out["below_bfloat16_normal"] += v < 2.0**-126
                for fmt in (E4M3, E5M2):
                    out[f"{fmt.name}_tensor"] += v * (fmt.max / wmax) < fmt.smallest_subnormal
                    out[f"{fmt.name}_token"] += v * (fmt.max / np.abs(row).max()) < fmt.smallest_subnormal
    return out


def test_fp8_underflow_counts_match_a_slow_reference():
    g = torch.Generator().manual_seed(1)
    # values spread over many decades, a few exact zeros, one token far larger than the rest
    x = torch.randn(3, 7, 11, generator=g) * torch.exp(torch.randn(3, 7, 11, generator=g) * 6)
    x[0, 2, :4] = 0
    x[1, 4] *= 1e4
    x[2, 1, 1] = 1e-40  # a float32 subnormal: below bfloat16's smallest normal too
    amax, counts = range_counts(x, windows=3)
    ref = _reference(x.double().numpy())
    assert dict(zip(COUNTS, counts.tolist(), strict=True)) == ref
    assert float(amax) == float(x.abs().max())
    assert ref["e4m3_tensor"] > ref["e4m3_token"] > 0 and ref["n_zero"] == 4 and ref["below_bfloat16_normal"] == 1
    # flattened tokens (OPT's MLP input) count the same
    assert torch.equal(range_counts(x.reshape(21, 11), windows=3)[1], counts)
