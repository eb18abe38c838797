"""What a model family is: the ``Architecture`` record and its parts, plain frozen data.

``outliers.arch.families`` lists the built-in families as such records and
``outliers.arch.registry`` registers them; a new family is one more record
(docs/extending.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from outliers.arch.linear import LinearKind

__all__ = ["NormKind", "SharedInput", "KeyValues", "Architecture"]


class NormKind(StrEnum):
    """How a norm scales its output, hence how a per-channel factor 1/s folds into it."""

    RMS = "rms"  # y = x / rms(x) * w                 -> w / s
    RMS_PLUS_ONE = "rms+1"  # Gemma: y = x / rms(x) * (1 + w) -> (1 + w) / s - 1
    LAYERNORM = "layernorm"  # y = (x - mean) / std * w + b -> w / s, b / s


@dataclass(frozen=True)
class SharedInput:
    """Linears that read the same input (q/k/v; gate/up), and the norm in the block that produces it.

    ``norm`` names a norm only when its output feeds these linears and nothing
    else, so that folding a per-channel scale into it changes nothing but
    their input. It is None otherwise: no norm precedes the input (post-norm
    blocks: BERT, OLMo 2), the norm's output is also the residual stream
    (BERT's FFN input), or the norm has no affine weight (OLMo); a scale then
    needs its own module before the linears.
    """

    linears: tuple[str, ...]
    norm: str | None
    norm_kind: NormKind | None


@dataclass(frozen=True)
class KeyValues:
    """Where the attention's keys and values are.

    ``keys``/``values`` are the linears whose outputs hold them; where one
    fused linear makes q, k and v (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``) both name it and ``fused`` says its layout.
    ``key_norm`` is a norm applied to keys before RoPE (Gemma 3, Qwen 3).
    ``rope`` is "full", "partial" (GPT-NeoX's rotary_pct), "per-layer" (some
    layers have none: SmolLM3's ``no_rope_layers``) or None (learned or
    absolute positions): keys after RoPE exist only inside the attention's
    forward, never as a module's output.
    """

    keys: str
    values: str
    fused: str | None = None  # "qkv": [q | k | v] along outputs; "heads,qkv": per head [q k v] (GPT-NeoX)
    key_norm: str | None = None
    rope: str | None = "full"


@dataclass(frozen=True)
class Architecture:
    """One model family. See the module docstring; ``model_types`` are transformers' ``config.model_type``."""

    name: str
    model_types: tuple[str, ...]
    blocks: str | None  # regex, block index first: r"layers\.(\d+)"
    attention: str | None = None  # the attention sub-module of a block
    mlp: str | None = None  # the MLP sub-module ("" where its linears sit in the block itself, as in OPT)
    attn_in: SharedInput | None = None
    attn_out: str | None = None  # the attention output projection (input: the concatenated heads)
    ffn_in: SharedInput | None = None
    down: str | None = None  # the MLP's down projection; its input is the FFN's hidden activation
    kv: KeyValues | None = None
    linear: LinearKind = LinearKind.LINEAR
    skip: tuple[str, ...] = ("lm_head",)  # never quantized (transformers' bitsandbytes integration does the same)
    no_split: tuple[str, ...] = ()  # module classes accelerate must keep on one device
    notes: str = ""
    patterns: Mapping[str, str] = field(default_factory=dict)  # capture-point regexes given by hand (generic)

    def capture_patterns(self) -> dict[str, str]:
        """Return ``{kind: regex}`` for the capture points this family has (block index as first group)."""
        out: dict[str, str] = {}
        if self.blocks is not None:
            block = self.blocks

            def at(path: str) -> str:
                return block + r"\." + re.escape(path)

            if self.attn_in:
                out["attn_in"] = at(self.attn_in.linears[0])  # q/k/v share the input: hook it once
            if self.attn_out:
                out["attn_out"] = at(self.attn_out)
            if self.ffn_in:
                out["ffn_in"] = at(self.ffn_in.linears[0])
            if self.down:
                out["down_in"] = at(self.down)  # the MLP's hidden activation, where massive activations are born
            out["residual"] = block
        return out | dict(self.patterns)
