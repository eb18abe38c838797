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


# The planted lifecycle (outliers.analysis.lifecycle): a super weight in block 1's down projection reads hidden unit
# CHAIN["col"], which only the BOS token opens (through embedding dim CHAIN["gate"]), and writes residual dim
# CHAIN["row"]: a massive activation on token 0. Head CHAIN["head"] of block 3 has a constant query (its q bias)
# and a key that reads that dim, on the slowest RoPE pair, so it attends to token 0 whenever the activation is there.
CHAIN = {"block": 1, "row": 5, "col": 9, "gate": 20, "sink_block": 3, "head": 1, "bos": 0}


def planted_chain(seed: int = 0, super_weight: bool = True) -> torch.nn.Module:
    """A 4-block Llama with the lifecycle planted (``CHAIN``); ``super_weight=False`` puts the massive activation in
    the BOS embedding itself (no down projection makes it: no super weight, as in Gemma-3-270M)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config("llama", layers=4)
    config.attention_bias = True
    m = AutoModelForCausalLM.from_config(config).eval()
    c, hd = CHAIN, config.hidden_size // config.num_attention_heads
    layers = m.model.layers
    with torch.no_grad():
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).bias.zero_()
        emb = m.model.embed_tokens.weight
        emb[:, c["gate"]] = 0.0
        mlp = layers[c["block"]].mlp
        if super_weight:
            emb[c["bos"], c["gate"]] = 1.0
            for b in range(c["block"] + 1):  # nothing but the embedding writes the gate dim before block 1 reads it
                layers[b].self_attn.o_proj.weight[c["gate"]] = 0.0
                if b < c["block"]:
                    layers[b].mlp.down_proj.weight[c["gate"]] = 0.0
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight[c["col"]] = 0.0
                lin.weight[c["col"], c["gate"]] = 4.0
            mlp.down_proj.weight[:, c["col"]] = 0.0
            mlp.down_proj.weight[c["row"], c["col"]] = 50.0
        else:
            emb[c["bos"], c["row"]] = 3000.0
        attn = layers[c["sink_block"]].self_attn
        q = slice(c["head"] * hd, (c["head"] + 1) * hd)
        kv = c["head"] // (config.num_attention_heads // config.num_key_value_heads)
        slow = hd // 2 - 1  # the RoPE pair (slow, slow + hd/2) turns least over the window
        attn.q_proj.weight[q] = 0.0
        attn.q_proj.bias[c["head"] * hd + slow] = 10.0
        attn.k_proj.weight[kv * hd + slow] = 0.0
        attn.k_proj.weight[kv * hd + slow, c["row"]] = 1.0
    return m


def chain_ids(windows: int = 6, window: int = 48, seed: int = 0) -> torch.Tensor:
    """Windows of random tokens (not the BOS), each starting with the BOS, as one sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 384, (windows, window), generator=g)
    x[:, 0] = CHAIN["bos"]
    return x.reshape(-1)


def save_planted_chain(folder, tokenizer) -> None:
    """Save ``planted_chain()`` with ``tokenizer``, given the BOS that opens the chain (for ``--bos window``)."""
    import copy

    planted_chain().save_pretrained(folder)
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<eos>"  # id CHAIN["bos"]
    tok.save_pretrained(folder)
