"""A model's size without loading it: the count load_model will hold, the config's shapes, a GGUF header
before conversion, and no size for a hub id out of reach. The network is never touched."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import ARCHS, make_model

from outliers import HubUnavailableError
from outliers.models import gguf as gguf_module
from outliers.models import hub
from outliers.models.size import OFFLINE, float32_bytes, model_size


@pytest.fixture
def probes(monkeypatch):
    """No hub and an empty hub cache; returns the list of reachability probes made."""
    made: list[int] = []

    def reachable(timeout: float = 3.0) -> bool:
        made.append(1)
        return False

    monkeypatch.setattr(hub, "hub_reachable", reachable)
    monkeypatch.setattr(hub, "hub_snapshot", lambda hub_id: None)
    return made


@pytest.mark.parametrize("arch", ARCHS)
def test_headers_and_an_empty_model_count_what_load_model_holds(arch, model_dir, tmp_path):
    n = sum(p.numel() for p in make_model(arch).parameters())  # tied weights once
    folder = model_dir(arch)
    size, why = model_size(str(folder))
    assert why == "" and size is not None and size.source == "config.json + safetensors headers"
    assert size.n_params == n and float32_bytes(str(folder)) == 4 * n
    assert (size.model_type, size.hidden_size, size.num_layers, size.num_heads, size.vocab_size) == (
        arch,
        32,
        2,
        4,
        384,
    )
    bare = tmp_path / "config-only"  # no safetensors: counted on an empty meta-device model
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    counted, _ = model_size(str(bare))
    assert counted == replace(size, source="config.json")


def test_a_cached_snapshot_is_read_without_the_hub(model_dir, tmp_path, monkeypatch, probes):
    monkeypatch.setattr(hub, "hub_snapshot", lambda hub_id: model_dir("llama"))
    size, _ = model_size("org/cached")
    assert size is not None and size.source == "cached config.json + safetensors headers" and probes == []
    partial = tmp_path / "partial"  # a sharded snapshot with a shard not downloaded: the headers would undercount
    partial.mkdir()
    (partial / "config.json").write_text((model_dir("llama") / "config.json").read_text())
    (partial / "model-00001-of-00002.safetensors").write_bytes((model_dir("llama") / "model.safetensors").read_bytes())
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (partial / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    monkeypatch.setattr(hub, "hub_snapshot", lambda hub_id: partial)
    counted, _ = model_size("org/partial")
    assert counted is not None and counted.source == "cached config.json" and counted.n_params == size.n_params


def test_an_uncached_hub_id_offline_has_no_size(probes):
    assert model_size("org/missing") == (None, OFFLINE) and len(probes) == 1
    assert model_size("org/missing", online=False) == (None, OFFLINE) and len(probes) == 1  # told: no probe
    with pytest.raises(HubUnavailableError, match=r"org/missing: size unknown \(offline\)"):
        float32_bytes("org/missing", online=False)


def test_a_gguf_is_read_from_its_header_until_it_is_converted(tmp_path, model_dir, monkeypatch):
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_embedding_length(8)
    writer.add_block_count(3)
    writer.add_head_count(2)
    writer.add_token_list([f"t{i}" for i in range(5)])
    writer.add_tensor("token_embd.weight", np.zeros((5, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size, _ = model_size(str(path))
    assert size is not None and (size.n_params, size.hidden_size, size.num_layers, size.num_heads) == (104, 8, 3, 2)
    assert (size.vocab_size, size.model_type, size.source) == (5, "llama", "GGUF header")
    monkeypatch.setattr(gguf_module, "converted_dir", lambda name, sha256: model_dir("llama"))
    converted, _ = model_size(str(path))  # load_model would load the converted folder: it is what counts
    assert converted is not None and converted.source == "config.json + safetensors headers"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma", "opt"])
def test_a_folder_s_sizes_read_as_json_are_what_transformers_reads(arch, tmp_path):
    """The plan reads a saved folder's config.json without transformers where its sizes sit at the top level
    under the standard names; the numbers are transformers' own (gpt2's n_embd falls back to AutoConfig)."""
    from helpers import make_model

    from outliers.models import size

    make_model(arch).save_pretrained(tmp_path)
    got = size._folder_size(tmp_path)
    want = size._config_size(size._config(tmp_path), size._safetensors_count(tmp_path), got.source)
    assert got == want
    assert (size._plain_config(tmp_path) is None) == (arch == "gpt2")
