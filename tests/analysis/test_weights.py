"""Weight outliers (outliers.analysis.weights): planted weights on tiny in-process models, kurtosis of known
distributions, exact reconstructions on the int8 grid, the figures, the CLI and the study measure."""

import json
import math

import pytest
import torch
from helpers import make_model

from outliers import InvalidArgumentError
from outliers.analysis.weights import (
    WEIGHT_METHODS,
    kurtosis,
    quantizable_linears,
    reconstruct,
    weight_histogram,
    weight_stats,
)
from outliers.arch.linear import weight_of
from outliers.cli import main
from outliers.quant.model import quantized_copy

PLANTED = {
    "llama": "model.layers.1.mlp.down_proj",
    "gpt2": "transformer.h.1.mlp.c_proj",
    "opt": "model.decoder.layers.0.fc1",
}
ROW, COL = 5, 9  # W[ROW, COL] of the planted layer, W as (out, in)


def _planted(arch):
    model = make_model(arch)
    with torch.no_grad():
        weight_of(model.get_submodule(PLANTED[arch]))[ROW, COL] = 1.0  # ~50 std of the 0.02 init
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_planted_weight_stands_out(arch):
    res = weight_stats(_planted(arch))
    df = res.layers.set_index("name")
    hit = df.loc[PLANTED[arch]]
    assert res.top("max_abs", 1).name.item() == PLANTED[arch] == res.top("kurtosis", 1).name.item()
    assert hit.max_abs == 1.0 and (hit.row, hit.col) == (ROW, COL)  # also through Conv1D's transpose
    assert hit.n_beyond_6sigma == 1 and hit.beyond_6sigma == 1 / hit.numel
    others = df.drop(index=PLANTED[arch])
    assert (others.n_beyond_6sigma == 0).all() and others["kurtosis"].between(2, 4.5).all()
    assert hit["kurtosis"] > 50
    # the outlier stretches the tensor-wise grids; one statistic per output channel confines it to its row
    assert hit.rel_err_absmax > 3 * others.rel_err_absmax.max()
    assert hit.rel_err_absmax_channel < hit.rel_err_absmax / 3
    s = res.summary()
    assert s["max_abs_layer"] == s["max_kurtosis_layer"] == PLANTED[arch] and s["layers_beyond_6sigma"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_layers_are_what_quantize_model_replaces(arch):
    model = make_model(arch)
    res = weight_stats(model)
    _, report = quantized_copy(model, "absmax")
    assert res.layers.name.tolist() == report.replaced and res.skipped == report.skipped == ["lm_head"]
    assert [n for n, _ in quantizable_linears(model)] == report.replaced
    assert res.layers.block.notna().all() and set(res.layers.role) == {"attn_in", "attn_out", "ffn_in", "down"}
    shapes = {n: tuple(weight_of(m).shape) for n, m in quantizable_linears(model)}
    assert all(shapes[r.name] == (r.out_features, r.in_features) for r in res.layers.itertuples())


def test_layers_argument_and_unknown_names():
    model = make_model("llama")
    res = weight_stats(model, layers=["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"])
    assert res.layers[["block", "kind", "role"]].values.tolist() == [
        [0, "mlp.up_proj", "ffn_in"],
        [1, "self_attn.k_proj", "attn_in"],
    ]
    for bad in ("lm_head", "model.layers.0.mlp", "nope"):
        with pytest.raises(InvalidArgumentError, match="not a linear layer quantize_model would replace"):
            weight_stats(model, layers=[bad])


def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert kurtosis(torch.randn(1_000_000, generator=g)) == pytest.approx(3.0, abs=0.03)  # se ~ sqrt(24/n)
    assert kurtosis(torch.tensor([-2.0, 4.0] * 500)) == pytest.approx(1.0, rel=1e-12)  # two points: exactly 1
    n = 1001  # n equally spaced points: 3(3n² - 7) / (5(n² - 1)) -> 1.8, the continuous uniform's
    assert kurtosis(torch.arange(n, dtype=torch.float64)) == pytest.approx(
        3 * (3 * n**2 - 7) / (5 * (n**2 - 1)), rel=1e-9
    )
    assert kurtosis(torch.rand(1_000_000, generator=g)) == pytest.approx(1.8, abs=0.01)
    assert math.isnan(kurtosis(torch.full((10,), 3.0)))
    x = torch.randn(100, dtype=torch.float64, generator=g)
    before = x.clone()
    kurtosis(x)
    assert torch.equal(x, before)  # the float64 input is copied, not centred in place


def test_weights_on_the_int8_grid_reconstruct_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (37, 499), generator=g)
    codes[:, 0] = 127  # every row reaches its absmax
    step = 2.0 ** -torch.randint(3, 9, (37, 1), generator=g)  # a power of two per row: exact in float32
    w_rows = codes * step
    w_tensor = codes * 2.0**-7
    zp = torch.randint(-128, 128, (37, 499), generator=g)
    zp[0, :2] = torch.tensor([-128, 127])  # the range [-1, 127/128]: scale 128, zero point 0
    w_zero = zp * 2.0**-7
    for method, w in (("absmax", w_tensor), ("absmax-channel", w_rows), ("zeropoint", w_zero)):
        assert torch.equal(reconstruct(w, method)[0], w), method
    model = torch.nn.Sequential(torch.nn.Linear(499, 37, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w_tensor)
    row = weight_stats(model).layers.iloc[0]
    assert row.rel_err_absmax == row.max_err_absmax == 0 and row.rel_err_absmax_channel == 0
    with pytest.raises(InvalidArgumentError, match="unknown weight method"):
        reconstruct(w_tensor, "absmax-row")


def test_histogram_counts_every_weight_and_the_codes_used():
    model = _planted("llama")
    hist = weight_histogram(model, PLANTED["llama"], bins=64)
    n = weight_of(model.get_submodule(PLANTED["llama"])).numel()
    assert list(hist.counts) == ["original", "absmax", "zeropoint"] and len(hist.edges) == 65
    assert all(c.sum() == n for c in hist.counts.values()) and hist.edges[0] == -hist.edges[-1] == -1.0
    # 1.0 sets the absmax step to 1/127: the ~N(0, 0.02) rest uses a few dozen of the 255 codes
    assert hist.codes_used["absmax"] < 40 and hist.rel_err["absmax"] > 0.05
    d = hist.to_dict()
    assert d["layer"] == PLANTED["llama"] and len(d["counts"]["absmax"]) == 64 and json.dumps(d)
    with pytest.raises(InvalidArgumentError, match="bins must be >= 1"):
        weight_histogram(model, PLANTED["llama"], bins=0)


def test_figures():
    from outliers.analysis.plots import weight_layers, weight_reconstructions

    model = _planted("gpt2")
    res = weight_stats(model, meta={"model": "tiny"})
    hist = weight_histogram(model, PLANTED["gpt2"], meta={"model": "tiny"})
    assert len(weight_layers(res).axes) == 2 and len(weight_reconstructions(hist).axes) == 3


def test_to_dict_is_json():
    res = weight_stats(_planted("opt"), meta={"model": "tiny"})
    d = json.loads(json.dumps(res.to_dict()))
    assert d["model"] == "tiny" and d["methods"] == list(WEIGHT_METHODS) and d["skipped"] == ["lm_head"]
    assert len(d["layers"]) == 12 and d["summary"]["n_layers"] == 12 and d["layers"][0]["block"] == 0
    assert {f"mean_rel_err_{m.replace('-', '_')}" for m in WEIGHT_METHODS} <= set(d["summary"])


def test_cli_json_and_out(model_dir, tmp_path, capsys):
    path, out = tmp_path / "w.json", tmp_path / "weights"
    args = ["weights", "--model", str(model_dir("llama")), "--json", str(path), "--out", str(out), "--quiet"]
    assert main([*args, "--show", "3"]) == 0
    printed = capsys.readouterr().out
    assert "largest max |w|" in printed and "largest kurtosis" in printed and "absmax-channel" in printed
    d = json.loads(path.read_text())
    assert {"model", "weights", "n_params", "layers", "summary", "histogram", "skipped"} <= set(d)
    assert len(d["layers"]) == 14 and d["histogram"]["layer"] == d["summary"]["max_kurtosis_layer"]
    for f in ("weights.csv", "weight_layers.png", "weight_histogram.png"):
        assert (out / f).stat().st_size > 0, f
    layer = "model.layers.0.self_attn.v_proj"
    assert main([*args[:3], "--layer", layer, "--json", str(path), "--quiet"]) == 0
    assert json.loads(path.read_text())["histogram"]["layer"] == layer
    assert main([*args[:3], "--layer", "lm_head", "--quiet"]) == 2
    assert "not a linear layer quantize_model would replace: lm_head" in capsys.readouterr().err


def test_cli_bad_input(tmp_path, capsys):
    for extra, message in ((["--show", "-1"], "--show must be >= 0"), (["--json", str(tmp_path)], "is a folder")):
        assert main(["weights", "--model", "no-such-model", *extra, "--quiet"]) == 2  # refused before loading
        assert message in capsys.readouterr().err


def test_study_measure(model_dir, text_file, tmp_path):
    import pandas as pd

    from studies.config import parse_config
    from studies.measures import MEASURES
    from studies.planning import cells
    from studies.report import write_report
    from studies.runner import run_study
    from studies.store import Store

    study = {"name": "weights", "models": [str(model_dir("gpt2"))], "corpora": [str(text_file)], "window": 32}
    # no settings: other studies' study.json, grids and fingerprints stay as they were
    assert MEASURES["weights"].settings == () and {c["kind"] for c in cells(parse_config({"study": study}))} == {
        "perplexity"
    }
    cfg = parse_config({"study": {**study, "measure": ["weights"]}})
    out = tmp_path / "out"
    counts = run_study(cfg, out, progress=False)
    row = Store(out).frame().iloc[0]
    assert counts["done"] == 1, row.error
    res = row.result
    assert row.kind == "weights" and res["n_layers"] == 8 and res["skipped"] == ["lm_head"]
    assert 2 < res["mean_kurtosis"] < 4 and res["beyond_6sigma"] == 0
    assert set(res["mean_rel_err"]) == set(WEIGHT_METHODS) and all(0 < e < 0.02 for e in res["mean_rel_err"].values())
    text = write_report(out).read_text()
    assert "## Weight outliers" in text and (out / "weights.csv").exists()
    assert pd.read_csv(out / "weights.csv")["max |w|"].item() == pytest.approx(res["max_abs"])
