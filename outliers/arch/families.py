"""The built-in model families, one ``Architecture`` record each (fields: ``outliers.arch.spec``), plain data
that ``outliers.arch.registry`` registers.

Sources: the modeling files of transformers (module names, norm placement).
Tests build a tiny model of each from its transformers config and check that
every path named here exists (``tests/arch/test_arch.py``).
"""

from __future__ import annotations

from outliers.arch.linear import LinearKind
from outliers.arch.spec import Architecture, KeyValues, NormKind, SharedInput

__all__ = ["FAMILIES"]

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _llama_like(
    name: str,
    model_types: tuple[str, ...],
    block_class: str,
    *,
    norm: NormKind = NormKind.RMS,
    ffn_norm: str = "post_attention_layernorm",
    key_norm: str | None = None,
    rope: str = "full",
    notes: str = "",
) -> Architecture:
    """Pre-norm decoders with separate q/k/v and a gated MLP (up/gate -> down), RoPE on q and k."""
    return Architecture(
        name,
        model_types,
        blocks=r"layers\.(\d+)",
        attention="self_attn",
        mlp="mlp",
        # up first: the capture hook sits on it, as it always has (gate reads the same input)
        attn_in=SharedInput(_QKV, "input_layernorm", norm),
        attn_out="self_attn.o_proj",
        ffn_in=SharedInput(("mlp.up_proj", "mlp.gate_proj"), ffn_norm, norm),
        down="mlp.down_proj",
        kv=KeyValues("self_attn.k_proj", "self_attn.v_proj", key_norm=key_norm, rope=rope),
        no_split=(block_class,),
        notes=notes,
    )


FAMILIES: tuple[Architecture, ...] = (  # registered by outliers.arch.registry
    _llama_like("llama", ("llama",), "LlamaDecoderLayer", notes="SmolLM2 is a Llama"),
    _llama_like(
        "smollm3",
        ("smollm3",),
        "SmolLM3DecoderLayer",
        rope="per-layer",
        notes="no RoPE where config.no_rope_layers is 0",
    ),
    Architecture(
        "olmo",
        ("olmo",),
        blocks=r"layers\.(\d+)",
        attention="self_attn",
        mlp="mlp",
        # its LayerNorms have no weight or bias: nothing to fold a scale into
        attn_in=SharedInput(_QKV, None, None),
        attn_out="self_attn.o_proj",
        ffn_in=SharedInput(("mlp.up_proj", "mlp.gate_proj"), None, None),
        down="mlp.down_proj",
        kv=KeyValues("self_attn.k_proj", "self_attn.v_proj"),
        no_split=("OlmoDecoderLayer",),
        notes="pre-norm with non-parametric LayerNorms (input_layernorm, post_attention_layernorm)",
    ),
    Architecture(
        "olmo2",
        ("olmo2",),
        blocks=r"layers\.(\d+)",
        attention="self_attn",
        mlp="mlp",
        attn_in=SharedInput(_QKV, None, None),  # post-norm: the block's input reaches q/k/v un-normalized
        attn_out="self_attn.o_proj",
        ffn_in=SharedInput(("mlp.up_proj", "mlp.gate_proj"), None, None),
        down="mlp.down_proj",
        kv=KeyValues("self_attn.k_proj", "self_attn.v_proj", key_norm="self_attn.k_norm"),
        no_split=("Olmo2DecoderLayer",),
        notes="norms after attention and MLP (post_attention_layernorm, post_feedforward_layernorm); q/k norms",
    ),
    _llama_like("mistral", ("mistral",), "MistralDecoderLayer"),
    _llama_like("qwen2", ("qwen2",), "Qwen2DecoderLayer", notes="q/k/v carry biases"),
    _llama_like("qwen3", ("qwen3",), "Qwen3DecoderLayer", key_norm="self_attn.k_norm"),
    _llama_like("gemma", ("gemma",), "GemmaDecoderLayer", norm=NormKind.RMS_PLUS_ONE),
    _llama_like(
        "gemma2",
        ("gemma2",),
        "Gemma2DecoderLayer",
        norm=NormKind.RMS_PLUS_ONE,
        ffn_norm="pre_feedforward_layernorm",
        notes="post-norms on the attention and MLP outputs; local layers alternate",
    ),
    _llama_like(
        "gemma3",
        ("gemma3_text", "gemma3"),
        "Gemma3DecoderLayer",
        norm=NormKind.RMS_PLUS_ONE,
        ffn_norm="pre_feedforward_layernorm",
        key_norm="self_attn.k_norm",
        notes="norms scale by (1 + w); 5 sliding-window layers per global one",
    ),
    Architecture(
        "gpt2",
        ("gpt2",),
        blocks=r"h\.(\d+)",
        attention="attn",
        mlp="mlp",
        attn_in=SharedInput(("attn.c_attn",), "ln_1", NormKind.LAYERNORM),
        attn_out="attn.c_proj",
        ffn_in=SharedInput(("mlp.c_fc",), "ln_2", NormKind.LAYERNORM),
        down="mlp.c_proj",
        kv=KeyValues("attn.c_attn", "attn.c_attn", fused="qkv", rope=None),
        linear=LinearKind.CONV1D,
        no_split=("GPT2Block",),
        notes="Conv1D linears (weights stored (in, out)); learned absolute positions",
    ),
    Architecture(
        "opt",
        ("opt",),
        blocks=r"decoder\.layers\.(\d+)",
        attention="self_attn",
        mlp="",
        attn_in=SharedInput(_QKV, "self_attn_layer_norm", NormKind.LAYERNORM),
        attn_out="self_attn.out_proj",
        ffn_in=SharedInput(("fc1",), "final_layer_norm", NormKind.LAYERNORM),
        down="fc2",
        kv=KeyValues("self_attn.k_proj", "self_attn.v_proj", rope=None),
        no_split=("OPTDecoderLayer",),
        notes="the MLP's fc1/fc2 sit in the block; opt-350m normalizes after, not before "
        "(do_layer_norm_before): its norms must not take a folded scale",
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        blocks=r"layers\.(\d+)",
        attention="attention",
        mlp="mlp",
        attn_in=SharedInput(("attention.query_key_value",), "input_layernorm", NormKind.LAYERNORM),
        attn_out="attention.dense",
        ffn_in=SharedInput(("mlp.dense_h_to_4h",), "post_attention_layernorm", NormKind.LAYERNORM),
        down="mlp.dense_4h_to_h",
        kv=KeyValues("attention.query_key_value", "attention.query_key_value", fused="heads,qkv", rope="partial"),
        no_split=("GPTNeoXLayer",),
        notes="Pythia; fused QKV, RoPE on rotary_pct of each head, parallel residual (use_parallel_residual)",
    ),
    Architecture(
        "bert",
        ("bert",),
        blocks=r"encoder\.layer\.(\d+)",
        attention="attention",
        mlp="",
        attn_in=SharedInput(("attention.self.query", "attention.self.key", "attention.self.value"), None, None),
        attn_out="attention.output.dense",
        # attention.output.LayerNorm's output is also the residual that BertOutput adds back: not foldable
        ffn_in=SharedInput(("intermediate.dense",), None, None),
        down="output.dense",
        kv=KeyValues("attention.self.key", "attention.self.value", rope=None),
        no_split=("BertLayer",),
        notes="an encoder, post-norm: no norm folds into q/k/v or the FFN input; no causal LM head",
    ),
)
