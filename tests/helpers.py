"""Test code shared by several test modules: tiny seeded models built in-process, planted inputs.

Test modules import from here (``from helpers import make_model``), never from one another.
"""

from __future__ import annotations

import torch

ARCHS = (
    "llama",
    "gpt2",
    "opt",
)  # the families most tests run on: RMSNorm + RoPE, Conv1D, LayerNorm + learned positions


def make_config(arch: str, vocab_size: int = 384, hidden: int = 32, layers: int = 2):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            architectures=["LlamaForCausalLM"],
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
            architectures=["GPT2LMHeadModel"],
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            architectures=["OPTForCausalLM"],
        )
    if arch == "gemma":  # Gemma-3: (1 + w) norms, a BOS-sensitive family
        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=16,
            architectures=["Gemma3ForCausalLM"],
        )
    if arch in ("mistral", "qwen2", "qwen3", "gemma1", "gemma2"):
        import transformers

        cls = {
            "mistral": "MistralConfig",
            "qwen2": "Qwen2Config",
            "qwen3": "Qwen3Config",
            "gemma1": "GemmaConfig",
            "gemma2": "Gemma2Config",
        }[arch]
        extra = {"head_dim": 8} if arch in ("qwen3", "gemma1", "gemma2") else {}
        return getattr(transformers, cls)(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
        )
    if arch == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.25,
            architectures=["GPTNeoXForCausalLM"],
        )
    raise ValueError(f"unknown test architecture {arch!r}")


def make_model(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny causal LM with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **kw))
    return model.eval()


def planted(rows=37, cols=499, outlier_cols=(3, 250, 498), seed=0, scale=9.0) -> torch.Tensor:
    """A standard-normal ``(rows, cols)`` input with large values planted in every third row of ``outlier_cols``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    for c in outlier_cols:
        x[::3, c] = scale * (1 + torch.rand(len(range(0, rows, 3)), generator=g))
    return x


PLANTED = (3, 17)  # the dims planted_model makes into outlier features


def planted_model(arch: str, dims=PLANTED, gain: float = 40.0) -> torch.nn.Module:
    """A tiny model whose pre-attention and pre-FFN norms scale ``dims`` by ``gain`` in every block.

    Normalized values are ~N(0, 1) and, over 32 dims, never reach 6 in magnitude;
    scaled by 40 the planted dims reach 6 at most positions, in every block. The
    norms are the ones the architecture registry names before q/k/v and the FFN.
    """
    from outliers.arch.registry import architecture_of, blocks

    model = make_model(arch)
    family = architecture_of(model)
    with torch.no_grad():
        for _, _, block in blocks(model, family):
            for shared in (family.attn_in, family.ffn_in):
                block.get_submodule(shared.norm).weight[list(dims)] = gain
    return model
