"""Models placed over devices by accelerate (outliers.models.dispatch), on the CPU with blocks offloaded to disk.

Every comparison is exact: dispatch only moves tensors, so the arithmetic is the undispatched model's.
"""

import gc
import json

import pytest
import torch
from helpers import planted_model

from outliers.analysis.hooks import capture
from outliers.analysis.scan import scan
from outliers.errors import InvalidArgumentError
from outliers.eval.perplexity import PerplexitySettings, perplexity
from outliers.models.dispatch import (
    dispatch,
    dispatched_copy,
    input_device,
    parse_device_map,
    parse_max_memory,
    plan_device_map,
)
from outliers.models.load import load_model
from outliers.quant.linear import Int8Linear
from outliers.quant.model import quantized_copy

# Embeddings, the second block and the head on disk: the first weight of the model is on the meta device.
MAPS = {
    "llama": {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    },
    "gpt2": {  # Conv1D layers; lm_head is tied to wte
        "transformer.wte": "disk",
        "transformer.wpe": "cpu",
        "transformer.h.0": "disk",
        "transformer.h.1": "cpu",
        "transformer.ln_f": "cpu",
        "lm_head": "disk",
    },
}


def _model(arch):
    return planted_model(arch).requires_grad_(False)  # as load_model leaves it


def _ids(n=2, length=24):
    return torch.randint(0, 384, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(MAPS))
def test_dispatched_logits_equal_the_undispatched_model(arch, tmp_path):
    model, ids = _model(arch), _ids()
    placed = dispatched_copy(model, MAPS[arch], offload_folder=tmp_path)
    assert next(placed.parameters()).is_meta and input_device(placed) == torch.device("cpu")
    with torch.inference_mode():
        assert torch.equal(placed(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch", list(MAPS))
def test_capture_and_scan_across_dispatch_boundaries(arch, tmp_path):
    model, ids = _model(arch), _ids()
    placed = dispatched_copy(model, MAPS[arch], offload_folder=tmp_path)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # padding: masked positions are left out on both sides
    with torch.inference_mode():
        with capture(model, "attn,ffn,residual") as a:
            model(input_ids=ids, attention_mask=mask)
        with capture(placed, "attn,ffn,residual") as b:
            placed(input_ids=ids, attention_mask=mask)
    assert a.tensors.keys() == b.tensors.keys() and a.tokens == b.tokens
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert int(a.tensors["top_abs"].numel()) > 0

    corpus = torch.randint(0, 384, (200,), generator=torch.Generator().manual_seed(1))
    settings = dict(points="attn,ffn", window=32, max_tokens=160, batch_size=2, progress=False)
    s, t = scan(model, corpus, **settings), scan(placed, corpus, **settings)
    assert all(torch.equal(s.tensors[k], t.tensors[k]) for k in s.tensors)
    assert s.tokens == t.tokens


@pytest.mark.parametrize("arch", list(MAPS))
def test_quantize_then_dispatch_int8(arch, tmp_path):
    model, ids = _model(arch), _ids()
    q, report = quantized_copy(model, "llm.int8", 6.0)
    with torch.inference_mode():
        expected = q(input_ids=ids).logits
    placed = dispatch(q, MAPS[arch], offload_folder=tmp_path)  # in place: q is the dispatched model now
    disk_block = "model.layers.1" if arch == "llama" else "transformer.h.0"
    layer = next(m for n, m in placed.named_modules() if n.startswith(disk_block) and isinstance(m, Int8Linear))
    # Int8Linear keeps its codes in buffers: they are offloaded with the block, not kept resident
    assert layer.weight_q.is_meta and layer.weight_scale.is_meta
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    index = json.loads((folder / "index.json").read_text())
    assert any(k.endswith("weight_q") and index[k]["dtype"] == "int8" for k in index)
    with torch.inference_mode():
        got = placed(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert layer.weight_q.is_meta  # loaded for the forward only
    corpus = torch.randint(0, 384, (300,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = perplexity(model, corpus, PerplexitySettings(window=32, batch_size=2), progress=False)
        both = perplexity(placed, corpus, PerplexitySettings(window=32, batch_size=2), reference=model, progress=False)
    assert both.ref_ppl == ref.ppl and both.device == "cpu"


def test_offload_folder_goes_with_the_model(tmp_path):
    placed = dispatched_copy(_model("llama"), MAPS["llama"], offload_folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    del placed
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_strategy_offloads_beyond_max_memory(tmp_path):
    model, ids = _model("llama"), _ids()
    plan = plan_device_map(model, "sequential", max_memory={"cpu": 150_000})
    assert plan["model.layers.0"] == "cpu" and plan["model.layers.1"] == "disk"  # 150 kB of 173 kB: the rest to disk
    placed = dispatched_copy(model, "sequential", max_memory={"cpu": 150_000}, offload_folder=tmp_path)
    with torch.inference_mode():
        assert torch.equal(placed(input_ids=ids).logits, model(input_ids=ids).logits)
    assert set(plan_device_map(model, "auto").values()) <= {"cpu", *range(torch.cuda.device_count())}


def test_load_model_with_a_device_map(model_dir, tmp_path):
    folder = model_dir("llama")
    plain = load_model(str(folder), progress=False)
    placed = load_model(str(folder), progress=False, device_map=MAPS["llama"], offload_folder=tmp_path / "off")
    assert "disk" in placed.info.device and placed.info.n_params == plain.info.n_params
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(placed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("device_map", "match"),
    [
        pytest.param({"model.nope": "cpu"}, "names no module.*'model.nope'", id="unknown-module"),
        pytest.param({"model": "cpu"}, "leaves lm_head.weight without a device", id="uncovered"),
        pytest.param({"": "cpu", "lm_head": "cpu"}, "places 'lm_head' twice", id="nested"),
        pytest.param({"model": "gpu", "lm_head": "cpu"}, r"device_map\['model'\] must be", id="bad-device"),
        pytest.param({"model": 99, "lm_head": "cpu"}, "asks for GPU 99", id="missing-gpu"),
        pytest.param({"model": True, "lm_head": "cpu"}, "must be a GPU index", id="bool"),
        pytest.param({}, "empty", id="empty"),
        pytest.param("fastest", "must be one of auto", id="unknown-strategy"),
    ],
)
def test_bad_device_maps_are_named(device_map, match):
    with pytest.raises(InvalidArgumentError, match=match):
        dispatch(_model("llama"), device_map)


def test_dispatch_refusals(tmp_path):
    with pytest.raises(
        InvalidArgumentError, match="sends model.embed_tokens, model.layers.1, lm_head to disk: give an offload folder"
    ):
        dispatch(_model("llama"), MAPS["llama"])
    placed = dispatched_copy(_model("llama"), MAPS["llama"], offload_folder=tmp_path)
    with pytest.raises(InvalidArgumentError, match="already dispatched"):
        dispatch(placed, MAPS["llama"], offload_folder=tmp_path)
    with pytest.raises(InvalidArgumentError, match="asks for GPU 99"):
        plan_device_map(_model("llama"), "auto", max_memory={99: "1GiB"})


def test_command_line_forms(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": 0, "lm_head": "cpu"}') == {"model": 0, "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MAPS["llama"]))
    assert parse_device_map(str(path)) == MAPS["llama"]
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    for bad in ("fast", "[1, 2]", "{nope"):
        with pytest.raises(InvalidArgumentError):
            parse_device_map(bad)
    for bad in ("gpu0=1GiB", "0:1GiB", ""):
        with pytest.raises(InvalidArgumentError):
            parse_max_memory(bad)


def test_eval_and_scan_commands_with_a_device_map(model_dir, text_file, tmp_path, capsys):
    from outliers.cli import main

    folder = str(model_dir("llama"))
    common = ["--model", folder, "--corpus", str(text_file), "--window", "32", "--quiet"]
    device_map = ["--device-map", json.dumps(MAPS["llama"]), "--offload-folder", str(tmp_path / "off")]
    runs = {}
    for name, extra in (("plain", []), ("placed", device_map)):
        out = tmp_path / f"{name}.json"
        args = ["eval", *common, "--max-windows", "2", "--method", "llm.int8", "--json", str(out), *extra]
        assert main(args) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["placed"]["ppl"] == runs["plain"]["ppl"] and runs["placed"]["ref_ppl"] == runs["plain"]["ref_ppl"]
    for extra in ([], device_map):
        assert main(["scan", *common, "--max-tokens", "64", "--out", str(tmp_path / f"scan{len(extra)}"), *extra]) == 0
    assert (tmp_path / "scan0" / "summary.csv").read_text() == (tmp_path / "scan4" / "summary.csv").read_text()
    capsys.readouterr()
    assert main(["eval", *common, "--offload-folder", str(tmp_path)]) == 2
    assert "only apply with --device-map" in capsys.readouterr().err
    assert main(["scan", *common, "--device-map", "auto", "--device", "cuda"]) == 2
    assert "not both" in capsys.readouterr().err
