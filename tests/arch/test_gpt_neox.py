"""GPT-NeoX (Pythia): the fused ``query_key_value`` and the parallel residual, scanned and quantized.

A tiny GPTNeoXConfig built in-process, with and without ``use_parallel_residual``
(Pythia uses it; the FFN then reads the block's input, not the attention's
output): the registry's norms must still be what produces the linears' inputs,
the scan must find planted outlier dims in every block, and llm.int8 must
replace the fused QKV like any other linear and stay close to the float model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PLANTED, make_config

from outliers.analysis.criteria import Criteria, outlier_features
from outliers.analysis.scan import scan
from outliers.arch.registry import architecture_of, blocks
from outliers.quant.linear import Int8Linear
from outliers.quant.model import quantized_copy


def planted_neox(parallel: bool, gain: float = 40.0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = make_config("gpt_neox")
    config.use_parallel_residual = parallel
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    family = architecture_of(model)
    with torch.no_grad():
        for _, _, block in blocks(model, family):
            for shared in (family.attn_in, family.ffn_in):
                block.get_submodule(shared.norm).weight[list(PLANTED)] = gain
    return model


def ids(n=144, seed=0) -> torch.Tensor:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential"])
def test_registry_norms_produce_the_fused_qkv_and_ffn_inputs(parallel):
    model = planted_neox(parallel)
    family = architecture_of(model)
    _, _, block = blocks(model, family)[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, out=None: seen.__setitem__(name, out if out is not None else args[0])

    handles = [
        block.get_submodule(family.attn_in.norm).register_forward_hook(keep("attn_norm")),
        block.get_submodule(family.ffn_in.norm).register_forward_hook(keep("ffn_norm")),
        block.get_submodule(family.attn_in.linears[0]).register_forward_pre_hook(keep("qkv_in")),
        block.get_submodule(family.ffn_in.linears[0]).register_forward_pre_hook(keep("ffn_in")),
    ]
    try:
        with torch.inference_mode():
            model(input_ids=ids(24).unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    assert family.attn_in.linears == ("attention.query_key_value",)  # one fused linear for q, k and v
    assert block.get_submodule(family.attn_in.linears[0]).out_features == 3 * model.config.hidden_size
    torch.testing.assert_close(seen["qkv_in"], seen["attn_norm"])
    torch.testing.assert_close(seen["ffn_in"], seen["ffn_norm"])  # in both residual layouts


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential"])
def test_scan_finds_planted_dims_and_llm_int8_stays_close(parallel):
    model = planted_neox(parallel)
    st = scan(model, ids(), points="attn,ffn", window=24, max_tokens=144, batch_size=2, progress=False)
    found = outlier_features(st, Criteria())
    assert sorted(found.dim.tolist()) == list(PLANTED) and (found.pct_layers == 100).all()

    q, report = quantized_copy(model, "llm.int8", 6.0)
    layers = model.config.num_hidden_layers
    assert len(report.replaced) == 4 * layers and report.skipped == ["lm_head"]
    assert all(isinstance(b.attention.query_key_value, Int8Linear) for b in q.gpt_neox.layers)
    x = ids(48, seed=1).view(2, 24)
    with torch.inference_mode():
        ref, out = model(input_ids=x).logits, q(input_ids=x).logits
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.9
    # relative RMS error 0.013 (parallel) and 0.018 (sequential); absmax-vector, without decomposition, 0.023 and 0.041
    assert ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt() < 0.02
