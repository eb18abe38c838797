"""Atomic writes to shared places: scratch names, failure, losing a race, two real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from outliers.cache import atomic_dir, atomic_file, atomic_path, atomic_write
from outliers.errors import ModelFileError
from outliers.models.packaged import assemble


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".tmp-*"))


# ---------------------------------------------------------------- files


def test_atomic_file_replaces_the_target_whole(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old and longer than the new text")
    with atomic_file(target, "w", encoding="utf-8") as f:
        f.write('{"new"')
        assert target.read_text() == "old and longer than the new text"  # untouched until the end
        scratch = Path(f.name)
        assert scratch.parent == tmp_path and scratch.name.startswith(".tmp-out.json-")
        f.write(": 1}")
    assert json.loads(target.read_text()) == {"new": 1}
    assert leftovers(tmp_path) == []


def test_atomic_file_failure_leaves_the_old_target_and_no_scratch(tmp_path):
    target = tmp_path / "ids.npy"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as scratch:
            scratch.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_atomic_path_keeps_the_suffix_and_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "arr.npy"
    with atomic_path(target) as scratch:
        assert scratch.suffix == ".npy" and scratch.exists()
        np.save(scratch, np.arange(5))  # np.save keeps a name that ends in .npy
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]
    plain = tmp_path / "sub" / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode == plain.stat().st_mode  # 0o666 less umask, not mkstemp's 0o600
    assert atomic_write(tmp_path / "t.txt", "é") == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == "é".encode()
    atomic_write(tmp_path / "t.txt", b"\x00\x01")
    assert (tmp_path / "t.txt").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_file(tmp_path / "x", "ab"):
            pass
    assert leftovers(tmp_path) == []


def test_concurrent_writers_of_one_file_each_leave_a_whole_copy(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 300_000 for i in range(4)]
    both_open = threading.Barrier(len(payloads))

    def write(data):
        with atomic_file(target) as f:
            f.write(data[:1000])
            both_open.wait(timeout=10)  # every writer holds a scratch at once
            f.write(data[1000:])

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads and leftovers(tmp_path) == []


# ---------------------------------------------------------------- folders


def test_atomic_dir_moves_the_folder_or_nothing(tmp_path):
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as scratch:
            (scratch / "config.json").write_text("{}")
            raise RuntimeError
    assert not target.exists() and leftovers(tmp_path) == []
    with atomic_dir(target) as scratch:
        assert scratch.parent == target.parent and scratch.name.startswith(".tmp-m-")
        (scratch / "config.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["config.json"] and leftovers(tmp_path) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    assert target.stat().st_mode == plain.stat().st_mode  # 0o777 less umask, not mkdtemp's 0o700


@pytest.mark.parametrize("when", ["during the block", "just before our os.replace"])
def test_atomic_dir_that_loses_the_race_discards_its_copy(tmp_path, monkeypatch, when):
    target = tmp_path / "m"

    def theirs():  # another process finished first
        target.mkdir()
        (target / "weights").write_text("theirs")

    if when != "during the block":
        real = os.replace

        def replace(src, dst):
            theirs()  # after any exists() check a check-then-replace would make
            return real(src, dst)

        monkeypatch.setattr("outliers.cache.os.replace", replace)
    with atomic_dir(target) as scratch:
        (scratch / "weights").write_text("ours")
        if when == "during the block":
            theirs()
    assert (target / "weights").read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_still_fails_when_a_file_is_in_the_way(tmp_path):
    target = tmp_path / "m"
    target.write_text("not a folder")
    with pytest.raises(OSError):
        with atomic_dir(target) as scratch:
            (scratch / "weights").write_text("ours")
    assert target.read_text() == "not a folder" and leftovers(tmp_path) == []


def test_concurrent_assemblers_both_succeed(tmp_path):
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(bytes([i]) * (3 << 20))
    sha = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    target = tmp_path / "joined" / "model.gguf"
    (tmp_path / "joined").mkdir()
    (tmp_path / "joined" / "model.gguf.partial").write_bytes(b"stale")  # the old fixed name is not used
    errors: list[BaseException] = []

    def run():
        try:
            assert assemble(parts, target, sha) == target
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha and leftovers(tmp_path) == []
    with pytest.raises(ModelFileError):
        assemble(parts, tmp_path / "joined" / "bad.gguf", "0" * 64)
    assert sorted(p.name for p in (tmp_path / "joined").iterdir()) == ["model.gguf", "model.gguf.partial"]


# ---------------------------------------------------------------- two processes


def write_llama_gguf(path: Path, tokenizer, hidden: int = 32, ffn: int = 64) -> np.ndarray:
    """Write a one-layer llama GGUF with ``tokenizer``'s BPE that transformers can load; return its embedding."""
    from gguf import GGUFWriter, TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    tokens = sorted(vocab, key=vocab.get)
    heads, kv_heads = 4, 2
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t == "<eos>" else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<eos>"])
    w.add_eos_token_id(vocab["<eos>"])
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embedding = rand(len(tokens), hidden)
    kv = hidden * kv_heads // heads
    w.add_tensor("token_embd.weight", embedding)
    for name, array in [
        ("attn_norm", np.ones(hidden, np.float32)),
        ("ffn_norm", np.ones(hidden, np.float32)),
        ("attn_q", rand(hidden, hidden)),
        ("attn_k", rand(kv, hidden)),
        ("attn_v", rand(kv, hidden)),
        ("attn_output", rand(hidden, hidden)),
        ("ffn_gate", rand(ffn, hidden)),
        ("ffn_up", rand(ffn, hidden)),
        ("ffn_down", rand(hidden, ffn)),
    ]:
        w.add_tensor(f"blk.0.{name}.weight", array)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding


# Each child tokenizes the corpus, then converts the GGUF. Its os.replace waits,
# scratch complete, until the other child is about to move its own scratch onto
# the same target: the two moves race every time, and for the folder one of them
# must find the target already there (which a check-then-replace would not survive).
CHILD = r"""
import os, sys, time
from pathlib import Path
import outliers
from outliers.data.corpus import encode_corpus, load_corpus
from transformers import AutoTokenizer

sync, me, tok_dir, text_file, gguf = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

def meet(tag):
    (sync / f"{tag}-{me}").touch()
    deadline = time.monotonic() + 60
    while len(list(sync.glob(f"{tag}-*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"the other process never reached {tag}")
        time.sleep(0.005)

real_replace = os.replace

def replace(src, dst, **kwargs):
    if Path(dst).parent.name in ("tokens", "models"):
        meet(Path(dst).parent.name)
    return real_replace(src, dst, **kwargs)

os.replace = replace
tok = AutoTokenizer.from_pretrained(tok_dir)
meet("ready")
ids = encode_corpus(tok, load_corpus(text_file))
loaded = outliers.load_model(gguf, progress=False)
print(len(ids), int(ids.sum()), loaded.model.name_or_path)
"""


def test_two_processes_tokenize_and_convert_the_same_thing(tmp_path, tokenizer, model_dir, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from outliers.data.corpus import encode_corpus, load_corpus

    tok_dir = model_dir("llama")
    gguf = tmp_path / "tiny.gguf"
    embedding = write_llama_gguf(gguf, tokenizer)
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = {
        **os.environ,
        "OUTLIERS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(sync), str(i), str(tok_dir), str(text_file), str(gguf)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [c.communicate(timeout=120) for c in children]
    finally:
        for c in children:
            c.kill()  # only if still running (a timeout)
    for child, (_, err) in zip(children, outs, strict=True):
        assert child.returncode == 0, err[-3000:]
    lines = [out.split() for out, _ in outs]
    assert lines[0] == lines[1]  # same ids, same converted folder

    assert leftovers(cache) == []
    (npy,) = (cache / "tokens").iterdir()
    expected = encode_corpus(AutoTokenizer.from_pretrained(tok_dir), load_corpus(str(text_file)), cache=False)
    assert np.load(npy).tolist() == expected.tolist()
    assert [int(lines[0][0]), int(lines[0][1])] == [len(expected), int(expected.sum())]

    (folder,) = (cache / "models").iterdir()
    assert str(folder) == lines[0][2]
    assert json.loads((folder / "outliers_source.json").read_text())["gguf"] == str(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert np.array_equal(model.get_input_embeddings().weight.detach().numpy(), embedding)
