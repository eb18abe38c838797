"""The architecture registry: every path an entry names exists in a tiny model of its family,
capture points and quantization read it, scales fold into each norm kind, and a new family is one entry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import make_model
from torch import nn

from outliers import InvalidArgumentError
from outliers.analysis.ablate import readers
from outliers.analysis.hooks import capture
from outliers.analysis.points import resolve_points
from outliers.arch import registry
from outliers.arch.linear import LinearKind, linear_kind
from outliers.arch.norms import fold_inverse_scale
from outliers.arch.registry import ARCHITECTURES, Architecture, NormKind, SharedInput, architecture_of, blocks
from outliers.quant.model import quantize_model

# every model type the registry names gets a tiny model here, but the multimodal Gemma 3 wrapper
# (its text part is gemma3_text, built here)
NOT_BUILT = {"gemma3"}
MODEL_TYPES = sorted(t for a in ARCHITECTURES.values() for t in a.model_types if t not in NOT_BUILT)
SMALL = dict(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny(model_type: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if model_type in ("gpt2", "opt", "gpt_neox"):
        return make_model(model_type)
    torch.manual_seed(0)
    if model_type == "bert":
        kw = {k: SMALL[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
        return AutoModel.from_config(AutoConfig.for_model("bert", num_attention_heads=4, **kw)).eval()
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL)).eval()


def test_every_family_has_a_model_type_built_here():
    assert all(set(a.model_types) - NOT_BUILT for a in ARCHITECTURES.values())
    assert len(ARCHITECTURES) >= 14


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_path_of_an_entry_exists_in_each_block(model_type):
    model = tiny(model_type)
    arch = architecture_of(model)
    assert model_type in arch.model_types
    found = blocks(model, arch)
    assert [i for i, _, _ in found] == list(range(model.config.num_hidden_layers))
    for _, _, block in found:
        paths = [
            arch.attention,
            arch.attn_out,
            arch.down,
            arch.kv.keys,
            arch.kv.values,
            arch.kv.key_norm,
            *arch.attn_in.linears,
            arch.attn_in.norm,
            *arch.ffn_in.linears,
            arch.ffn_in.norm,
        ]
        if arch.mlp:
            paths.append(arch.mlp)
        for path in filter(None, paths):
            block.get_submodule(path)  # raises AttributeError naming the missing part
        for path in (*arch.attn_in.linears, *arch.ffn_in.linears, arch.attn_out, arch.down):
            assert linear_kind(block.get_submodule(path)) is arch.linear, path
    classes = {type(m).__name__ for m in model.modules()}
    assert set(arch.no_split) <= classes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_capture_points_come_from_the_registry(model_type):
    model = tiny(model_type)
    pts = resolve_points(model, "attn,ffn,residual")
    n = model.config.num_hidden_layers
    assert [p.kind for p in pts].count("attn_in") == n and len(pts) == 4 * n
    arch = architecture_of(model)
    assert all(p.module.endswith(arch.attn_in.linears[0]) for p in pts if p.kind == "attn_in")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_down_projection_input_is_its_own_space(model_type):
    from outliers.arch.linear import in_features

    model = tiny(model_type)
    pts = resolve_points(model, "down_in")
    arch = architecture_of(model)
    modules = dict(model.named_modules())
    assert len(pts) == model.config.num_hidden_layers and {p.space for p in pts} == {"intermediate"}
    for p in pts:
        assert p.module.endswith(arch.down) and p.dims == in_features(modules[p.module])
    # not among the default points: existing scans do not change
    assert all(p.kind != "down_in" for p in resolve_points(model))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "opt", "gpt_neox"])
def test_a_scale_folded_into_the_norm_divides_its_output(model_type):
    model = tiny(model_type)
    arch = architecture_of(model)
    _, _, block = blocks(model, arch)[0]
    for shared in (arch.attn_in, arch.ffn_in):
        norm = block.get_submodule(shared.norm)
        x = torch.randn(5, model.config.hidden_size)
        if shared.norm_kind is not NormKind.RMS:  # give Gemma's w and LayerNorm's b something to fold
            with torch.no_grad():
                norm.weight.uniform_(-0.5, 0.5)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.uniform_(-0.5, 0.5)
        before = norm(x)
        s = torch.rand(model.config.hidden_size) * 4 + 0.25
        fold_inverse_scale(norm, shared.norm_kind, s)
        torch.testing.assert_close(norm(x), before / s, rtol=1e-5, atol=1e-6)


def test_folding_refuses_a_bad_scale():
    norm = nn.LayerNorm(4)
    with pytest.raises(InvalidArgumentError, match="positive and finite"):
        fold_inverse_scale(norm, NormKind.LAYERNORM, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InvalidArgumentError, match="shape"):
        fold_inverse_scale(norm, NormKind.LAYERNORM, torch.ones(3))


def test_quantization_skips_what_the_family_says():
    model = make_model("gpt2")
    assert architecture_of(model).linear is LinearKind.CONV1D and architecture_of(model).skip == ("lm_head",)
    report = quantize_model(model, "llm.int8")
    assert report.skipped == ["lm_head"] and len(report.replaced) == 4 * model.config.n_layer
    assert linear_kind(model.lm_head) is LinearKind.LINEAR


class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        x = x + self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.proj(torch.relu(self.fc(x)))


class ToyModel(nn.Module):
    def __init__(self, d: int = 8, n: int = 3):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=d)
        self.stack = nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.stack:
            x = b(x)
        return self.head(x)


def test_a_new_family_is_one_entry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BY_MODEL_TYPE", dict(registry._BY_MODEL_TYPE))
    model = ToyModel().eval()
    with pytest.raises(InvalidArgumentError, match="no capture-point patterns for architecture 'toy'"):
        resolve_points(model, "attn_in")
    by_hand = resolve_points(model, "attn_in", patterns={"attn_in": r"stack\.(\d+)\.qkv"})
    with pytest.warns(UserWarning, match="only stack.0.qkv is edited"):
        assert readers(model, by_hand[0]) == ["stack.0.qkv"]
    registry.register_architecture(
        Architecture(
            "toy",
            ("toy",),
            blocks=r"stack\.(\d+)",
            attention="",
            mlp="",
            attn_in=SharedInput(("qkv",), "norm", NormKind.LAYERNORM),
            attn_out="out",
            ffn_in=SharedInput(("fc",), None, None),
            down="proj",
            skip=("head",),
        )
    )
    pts = resolve_points(model, "attn,ffn,residual")
    assert [p.name for p in pts[:4]] == ["L00.attn_in", "L00.attn_out", "L00.ffn_in", "L00.residual"]
    x = torch.randn(2, 4, 8)
    with capture(model, points="attn,ffn", threshold=1.0) as stats:
        model(x)
    assert len(stats.points) == 9
    report = quantize_model(model, "llm.int8", threshold=6.0)
    assert report.skipped == ["head"] and len(report.replaced) == 12
    with pytest.raises(ValueError, match="clashes"):
        registry.register_architecture(Architecture("toy2", ("toy",), None))
