"""LLM.int8() on the real SmolLM2-135M against transformers + bitsandbytes on CPU."""

import copy
import logging

import pytest
import torch

from outliers import encode_corpus, load_corpus, perplexity
from outliers.hooks import record_inputs
from outliers.int8 import int8_vectorwise_quant
from outliers.qmodel import quantize_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference peer (pip install '.[dev]')")
pytestmark = pytest.mark.integration
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its fp16-cast notice, once per layer call


@pytest.fixture(scope="module")
def ids(smollm2):
    return encode_corpus(smollm2.tokenizer, load_corpus("builtin"))


@pytest.fixture(scope="module")
def layer_inputs(smollm2, ids):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.20.mlp.up_proj"]
    return record_inputs(smollm2.model, names, ids[None, :256])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_real_layer_inputs_quantize_like_bitsandbytes(layer_inputs, dtype):
    found_outliers = 0
    for name, x in layer_inputs.items():
        x = x.reshape(-1, x.shape[-1]).to(dtype)
        ours = int8_vectorwise_quant(x, 6.0)
        ref = bnb.functional.int8_vectorwise_quant(x.clone(), threshold=6.0)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]), name
        assert torch.equal(ours[2], ref[2]), name
        found_outliers += ours[2].numel()
    assert found_outliers > 0  # SmolLM2 has real outlier features: the test exercises decomposition


def test_perplexity_within_half_a_percent_of_bitsandbytes(smollm2, ids):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = smollm2.model.name_or_path  # the cached float folder load_model converted the GGUF into
    peer = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
    assert isinstance(peer.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt) and not peer.training
    ref = perplexity(peer, ids, window=512, max_windows=8, progress=False)
    ours_model = copy.deepcopy(smollm2.model)
    quantize_model(ours_model, "llm.int8", 6.0, round_to="float16")  # bitsandbytes' fp16 rounding
    ours = perplexity(ours_model, ids, window=512, max_windows=8, progress=False)
    assert ours.ppl == pytest.approx(ref.ppl, rel=5e-3)
