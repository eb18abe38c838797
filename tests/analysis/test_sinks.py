"""Attention sinks (outliers.analysis.sinks): planted effects on tiny in-process models, a slow reference, the CLI
and the study measure."""

import json

import pytest
import torch
from helpers import hook_count, make_model

from outliers import InvalidArgumentError
from outliers.analysis.sinks import attention_sinks
from outliers.cli import main

W = 32


def _ids(n=200, seed=0):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


def _uniform(window, sliding=None):
    """Mean over queries t of the weight on key 0 under uniform causal attention (a sliding window: t < size)."""
    return sum(1 / (t + 1) for t in range(window) if sliding is None or t < sliding) / window


def _zero_queries(model):
    """Zero every query projection (weights and biases): all logits equal, attention uniform over what is visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name:
                p.zero_()
            elif name.endswith("attn.c_attn.weight"):  # GPT-2's fused Conv1D: queries are the first n_embd outputs
                p[:, : model.config.n_embd] = 0
            elif name.endswith("attn.c_attn.bias"):
                p[: model.config.n_embd] = 0
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_uniform_attention_scores_mean_of_one_over_t(arch):
    res = attention_sinks(_zero_queries(make_model(arch)), _ids(), window=W, max_windows=3, progress=False)
    assert len(res.heads) == 2 * 4 and res.n_windows == 3 and not res.heads.local.any()
    assert res.heads.score.tolist() == pytest.approx([_uniform(W)] * 8, abs=1e-6)
    assert res.sink_rate == 0.0 and res.bos == "corpus"


def test_gemma_local_layers_are_flagged_and_left_out_of_the_rate():
    model = _zero_queries(make_model("gemma", layers=6))  # layers 0-4 slide over 16 tokens, layer 5 is global
    res = attention_sinks(model, _ids(), window=W, max_windows=2, epsilon=0.12, progress=False)
    local = res.heads[res.heads.local]
    assert sorted(set(local.layer)) == [0, 1, 2, 3, 4]
    assert local.score.tolist() == pytest.approx([_uniform(W, sliding=16)] * 20, abs=1e-6)
    assert res.heads[~res.heads.local].score.tolist() == pytest.approx([_uniform(W)] * 4, abs=1e-6)
    assert _uniform(W, 16) < 0.12 < _uniform(W)  # so only the global layer's heads pass epsilon
    assert res.sink_rate == 1.0 and res.sink_rate_all == pytest.approx(4 / 24)
    d = res.to_dict()
    assert d["local_layers"] == [0, 1, 2, 3, 4] and d["n_counted_heads"] == 4 and d["n_sink_heads"] == 4
    short = attention_sinks(model, _ids(), window=16, max_windows=2, progress=False)  # sees the first token
    assert not short.heads.local.any()


def test_planted_sink_head_is_the_only_sink():
    """GPT-2 (learned positions): a huge wpe[0] in dim D, and head 2 of block 0 keys on D with a constant query."""
    model = make_model("gpt2")
    e, hd, head, d = 32, 8, 2, 5
    q, k = slice(head * hd, (head + 1) * hd), slice(e + head * hd, e + (head + 1) * hd)
    with torch.no_grad():
        model.transformer.wpe.weight[0, d] = 50.0
        attn = model.transformer.h[0].attn.c_attn
        attn.weight[:, q] = 0
        attn.bias[q] = 0
        attn.bias[head * hd] = 10.0  # the query: a constant
        attn.weight[:, k] = 0
        attn.bias[k] = 0
        attn.weight[d, e + head * hd] = 10.0  # the key: dim D of the normalized input, large only at position 0
    res = attention_sinks(model, _ids(), window=W, max_windows=3, progress=False)
    sinks = res.heads[res.heads.sink]
    assert sinks[["layer", "head"]].values.tolist() == [[0, head]] and sinks.score.iloc[0] > 0.99
    assert res.sink_rate == pytest.approx(1 / 8) and res.top(1)["head"].iloc[0] == head
    assert (res.norms.first_token_norm > 10 * res.norms.other_tokens_norm).all()  # the planted first-token state


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_match_output_attentions(arch):
    model = make_model(arch)
    assert model.config._attn_implementation == "sdpa"
    ids = _ids(300, seed=1)
    res = attention_sinks(model, ids, window=24, max_windows=5, batch_size=2, progress=False)
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the run, then back
    model.set_attn_implementation("eager")
    windows = ids[: 5 * 24].view(5, 24)
    with torch.inference_mode():
        out = model(input_ids=windows, output_attentions=True, output_hidden_states=True)
    ref = torch.stack([a[:, :, :, 0].mean(dim=(0, 2)) for a in out.attentions])  # (layers, heads)
    assert res.heads.score.tolist() == pytest.approx(ref.flatten().tolist(), abs=1e-6)
    first = out.hidden_states[1].norm(dim=-1)  # block 0's output (the last one is normed after the block)
    assert res.norms.first_token_norm[0] == pytest.approx(float(first[:, 0].mean()), rel=1e-5)
    assert res.norms.other_tokens_norm[0] == pytest.approx(float(first[:, 1:].mean()), rel=1e-5)


def test_hooks_are_removed_when_the_forward_raises():
    model = make_model("llama")
    before = hook_count(model)

    def boom(module, args, out):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        attention_sinks(model, _ids(), window=W, max_windows=1, progress=False)
    handle.remove()
    assert hook_count(model) == before and model.config._attn_implementation == "sdpa"


def test_bad_arguments_and_encoders():
    model = make_model("llama")
    for kw, message in (
        ({"epsilon": 0.0}, "epsilon must be in"),
        ({"epsilon": 1.0}, "epsilon must be in"),
        ({"window": 1}, "window must be >= 2"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            attention_sinks(model, _ids(), progress=False, **kw)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    before = hook_count(bert)
    with pytest.raises(InvalidArgumentError, match="not a causal LM"):
        attention_sinks(bert, _ids(), window=W, max_windows=1, progress=False)
    assert hook_count(bert) == before


def test_cli_json_and_out(model_dir, text_file, tmp_path, capsys):
    path, out = tmp_path / "s.json", tmp_path / "sinks"
    args = ["sinks", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", str(W)]
    assert main([*args, "--max-windows", "2", "--json", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sink rate" in printed and "top 8 heads" in printed and "first_token_norm" in printed
    d = json.loads(path.read_text())
    assert {"sink_rate", "heads", "epsilon", "window", "bos", "n_windows", "norms", "model", "n_params"} <= set(d)
    assert len(d["heads"]) == 8 and len(d["norms"]) == 2 and d["n_windows"] == 2 and d["epsilon"] == 0.3
    for f in ("heads.csv", "norms.csv", "sink_heatmap.png", "norms.png"):
        assert (out / f).stat().st_size > 0, f


def test_cli_bad_input(model_dir, text_file, tmp_path, tokenizer, capsys):
    for extra, message in (
        (["--epsilon", "1.5"], "--epsilon must be in (0, 1)"),
        (["--window", "1"], "--window must be >= 2"),
        (["--json", str(tmp_path)], "is a folder"),
    ):
        assert main(["sinks", "--model", "no-such-model", *extra, "--quiet"]) == 2  # refused before loading
        assert message in capsys.readouterr().err
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, architectures=["BertModel"]
    )
    BertModel(bert).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    assert main(["sinks", "--model", str(tmp_path / "bert"), "--corpus", str(text_file), "--quiet"]) == 2
    assert "is an encoder (bert)" in capsys.readouterr().err


def test_study_measure(model_dir, text_file, tmp_path):
    from studies.config import as_tables, parse_config
    from studies.report import write_report
    from studies.runner import run_study
    from studies.store import Store

    study = {"name": "sinks", "models": [str(model_dir("gpt2"))], "corpora": [str(text_file)], "window": W}
    plain = parse_config({"study": study})
    assert not any(k.startswith("sink") for k in as_tables(plain)["study"])  # other studies' study.json unchanged
    with pytest.raises(InvalidArgumentError, match="sink_epsilon must be in"):
        parse_config({"study": {**study, "sink_epsilon": 2}})
    cfg = parse_config({"study": {**study, "measure": ["sinks"], "sink_windows": 2, "batch_size": 2}})
    out = tmp_path / "out"
    counts = run_study(cfg, out, progress=False)
    row = Store(out).frame().iloc[0]
    assert counts["done"] == 1, row.error
    res = row.result
    assert row.kind == "sinks" and row.n_tokens == 2 * W and res["n_windows"] == 2 and res["n_heads"] == 8
    assert 0 <= res["sink_rate"] <= 1 and res["epsilon"] == 0.3 and res["max_norm_ratio"] > 0
    text = write_report(out).read_text()
    assert "## Attention sinks" in text and (out / "sinks.csv").exists() and "| 0/8 |" in (out / "sinks.md").read_text()
