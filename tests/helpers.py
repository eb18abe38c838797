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


# A tiny model of each family, as a table: transformers' config class and its fields beside the shared ones
# (vocab, hidden, layers, 4 heads, 256 positions; "ffn" is the MLP width 2 * hidden under the family's name).
# Decoders with grouped queries take 2 key-value heads.
_GQA = {"num_key_value_heads": 2, "intermediate_size": "ffn", "hidden_size": "hidden", "num_attention_heads": 4}
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {**_GQA, "architectures": ["LlamaForCausalLM"]}),
    "gpt2": (
        "GPT2Config",
        {"n_embd": "hidden", "n_layer": "layers", "n_head": 4, "n_positions": 256, "bos_token_id": 0}
        | {"eos_token_id": 0, "architectures": ["GPT2LMHeadModel"]},
    ),
    "opt": (
        "OPTConfig",
        {"hidden_size": "hidden", "ffn_dim": "ffn", "num_attention_heads": 4, "word_embed_proj_dim": "hidden"}
        | {"architectures": ["OPTForCausalLM"]},
    ),
    # Gemma-3: (1 + w) norms, a BOS-sensitive family
    "gemma": (
        "Gemma3TextConfig",
        {**_GQA, "head_dim": 8, "sliding_window": 16, "architectures": ["Gemma3ForCausalLM"]},
    ),
    "mistral": ("MistralConfig", dict(_GQA)),
    "qwen2": ("Qwen2Config", dict(_GQA)),
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 8}),
    "gemma1": ("GemmaConfig", {**_GQA, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_GQA, "head_dim": 8}),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"hidden_size": "hidden", "intermediate_size": "ffn", "num_attention_heads": 4, "rotary_pct": 0.25}
        | {"architectures": ["GPTNeoXForCausalLM"]},
    ),
}


def make_config(arch: str, vocab_size: int = 384, hidden: int = 32, layers: int = 2):
    """A tiny transformers config of one family (``CONFIGS``)."""
    import transformers

    if arch not in CONFIGS:
        raise ValueError(f"unknown test architecture {arch!r}")
    cls, fields = CONFIGS[arch]
    sizes = {"hidden": hidden, "ffn": 2 * hidden, "layers": layers}
    kwargs = {k: sizes.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    if "n_layer" not in kwargs:
        kwargs |= {"num_hidden_layers": layers, "max_position_embeddings": 256}
    return getattr(transformers, cls)(vocab_size=vocab_size, **kwargs)


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


def hook_count(model) -> int:
    """Forward and forward pre-hooks left on any module of ``model``: zero once every context manager has exited."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
