import pytest
import torch
from helpers import hook_count, make_model

from outliers import InvalidArgumentError
from outliers.arch.hooks import pre_hooks, record_inputs


def test_record_inputs_shapes_and_cleanup():
    model = make_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    got = record_inputs(model, names, torch.randint(0, 384, (2, 10)))
    assert got[names[0]].shape == (2, 10, 32) and got[names[1]].shape == (2, 10, 64)
    assert hook_count(model) == 0


def test_hooks_removed_on_exception_and_when_nested():
    model = make_model("gpt2")
    names = ["transformer.h.0.attn.c_attn"]
    with pytest.raises(RuntimeError, match="boom"):
        with pre_hooks(model, names, lambda *a: None):
            with pre_hooks(model, names, lambda *a: None):
                assert hook_count(model) == 2
                raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_unknown_module_name():
    with pytest.raises(InvalidArgumentError, match="no submodule named model.layers.9.mlp"):
        with pre_hooks(make_model("llama"), ["model.layers.9.mlp"], lambda *a: None):
            pass
