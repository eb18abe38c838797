"""Key-value cache quantization (outliers.quant.kv_cache) and its row kind (outliers.eval.kv_rows), on tiny models."""

import itertools
import json

import pytest
import torch
from helpers import make_model

import outliers.quant.kv_cache as kvc
from outliers.cli import main
from outliers.errors import InvalidArgumentError
from outliers.eval.kv_rows import kv_rows
from outliers.eval.rows import Row, evaluate_rows, parse_rows, row_label
from outliers.eval.windows import PerplexitySettings
from outliers.quant.kv_cache import KVQuant, parse_kv_spec, quantized_kv_cache

SETTINGS = PerplexitySettings(window=32, max_windows=6, batch_size=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (2000,), generator=torch.Generator().manual_seed(0))


def _x(seq=24, batch=2, seed=1):
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _kv(spec, keep=0, rotate=False):
    return KVQuant(parse_kv_spec(spec), keep, rotate)


# ------------------------------------------------------------------ references written by hand


def _minmax(x, bits):
    """One slice, asymmetric min-max, as KIVI writes it."""
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / (2**bits - 1)
    return x.clone() if scale == 0 else torch.round((x - lo) / scale) * scale + lo


def _per_token(x, bits, keep=0):
    out = x.clone()
    for b, h, t in itertools.product(*map(range, x.shape[:-1])):
        if t >= keep:
            out[b, h, t] = _minmax(x[b, h, t], bits)
    return out


def _per_channel(x, bits, group, keep=0):
    out = x.clone()
    for b, h, d in itertools.product(range(x.shape[0]), range(x.shape[1]), range(x.shape[3])):
        for start in range(keep, x.shape[2] - group + 1, group):
            out[b, h, start : start + group, d] = _minmax(x[b, h, start : start + group, d], bits)
    return out


def _hand_llama(model, x, attend):
    """A tiny Llama's forward written out, its attention ``attend(q, k, v) -> (batch, heads, seq, dim)`` given."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner, (batch, seq) = model.model, x.shape
    h = inner.embed_tokens(x)
    cos, sin = inner.rotary_emb(h, torch.arange(seq)[None])
    for layer in inner.layers:
        a = layer.self_attn
        y = layer.input_layernorm(h)
        q, k, v = (p(y).view(batch, seq, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (t.repeat_interleave(a.num_key_value_groups, 1) for t in (k, v))
        o = attend(q * a.scaling, k, v)
        h = h + a.o_proj(o.transpose(1, 2).reshape(batch, seq, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def _causal_softmax(scores):
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def test_the_hand_written_llama_is_the_model():
    model = make_model("llama")
    x = _x()

    def attend(q, k, v):
        return _causal_softmax(q @ k.transpose(-1, -2)) @ v

    torch.testing.assert_close(_hand_llama(model, x, attend), model(x).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_an_int8_per_token_cache_is_a_hand_written_fake_quantized_attention():
    model = make_model("llama")
    x = _x()

    def attend(q, k, v):
        return _causal_softmax(q @ _per_token(k, 8).transpose(-1, -2)) @ _per_token(v, 8)

    by_hand = _hand_llama(model, x, attend)
    with quantized_kv_cache(model, _kv("int8-token")) as stats:
        got = model(x).logits
    assert stats.calls == 2 and stats.implementation == "sdpa"
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    assert (got - model(x).logits).abs().max() > 1e-4  # the cache's error is far above the tolerance


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kivi_groups_are_each_query_scored_against_the_keys_it_may_see(impl):
    """Keys per channel over complete groups after 2 kept tokens, values per token: scores computed twice (keys of
    complete groups quantized, and float) and selected per (query, key) pair, as the docs state the rule."""
    model = make_model("llama")
    model.set_attn_implementation(impl)
    x, group, keep = _x(seq=23), 4, 2
    seq = x.shape[1]

    def attend(q, k, v):
        quantized = q @ _per_channel(k, 4, group, keep).transpose(-1, -2)
        floats = q @ k.transpose(-1, -2)
        t, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        boundary = torch.where(t + 1 <= keep, keep, keep + group * ((t + 1 - keep) // group))
        return _causal_softmax(torch.where(j < boundary, quantized, floats)) @ _per_token(v, 4, keep)

    by_hand = _hand_llama(model, x, attend)
    with quantized_kv_cache(model, _kv("int4-kivi-g4", keep=keep)) as stats:
        got = model(x).logits
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    assert stats.blocks > stats.calls  # the queries were split by the group they sit in
    assert model.config._attn_implementation == impl


# ------------------------------------------------------------------ float where nothing is quantized


@torch.no_grad()
@pytest.mark.parametrize(
    ("arch", "impl"), [("llama", "sdpa"), ("llama", "eager"), ("gemma", "sdpa"), ("gpt2", "eager")]
)
def test_every_token_kept_in_float_is_the_float_model_bit_for_bit(arch, impl):
    model = make_model(arch)
    model.set_attn_implementation(impl)
    x = _x()
    ref = model(x).logits
    with quantized_kv_cache(model, _kv("int2-kivi-g4", keep=x.shape[1])) as stats:
        assert model.config._attn_implementation == kvc.ATTENTION_NAME
        got = model(x).logits
    assert stats.calls == model.config.num_hidden_layers  # it went through the registered function
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == impl


@torch.no_grad()
def test_the_rotation_alone_leaves_the_model_as_it_was_to_rounding():
    model = make_model("llama")
    x = _x()
    with quantized_kv_cache(model, _kv("int2-kivi-g4", keep=64, rotate=True)):
        got = model(x).logits
    torch.testing.assert_close(got, model(x).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ what it measures


def test_a_planted_key_channel_outlier_hurts_per_token_keys_more_than_per_channel(ids):
    """Per-token and KIVI caches quantize values alike and differ in the keys' granularity: even without an
    outlier, with one key channel 50 x larger per-token keys are several times worse. (A random tiny model
    attends almost uniformly: its queries are scaled so that the keys' errors move its predictions.)"""

    def kl(outlier):
        model = make_model("llama")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight *= 30
                layer.self_attn.k_proj.weight[3] *= outlier  # one channel of key head 0
        rows = kv_rows("int4-token,int4-kivi-g8", [Row()])
        return [done.result.kl_vs_ref for done in evaluate_rows(model, ids, SETTINGS, rows, progress=False)[1:]]

    token, kivi = kl(1.0)
    assert token < 1.5 * kivi
    token, kivi = kl(50.0)
    assert token > 3 * kivi


@torch.no_grad()
def test_a_query_never_reads_keys_quantized_with_later_tokens(monkeypatch):
    """Token 14 sits in the channel group [12, 16): queries 12 and 13 read keys 12 and 13 in float (their group
    is incomplete), so nothing before position 14 may change with it; earlier groups are quantized."""
    model = make_model("llama")
    x = _x(seq=16, batch=1)
    later = x.clone()
    later[0, 14] = (later[0, 14] + 1) % 384
    kv = _kv("int4-channel-g4")

    def run(inp):
        with quantized_kv_cache(model, kv):
            return model(inp).logits

    a, b = run(x), run(later)
    assert torch.equal(a[:, :14], b[:, :14])  # positions before it see nothing of it
    assert not torch.equal(a[:, 14:], b[:, 14:])
    assert (a[:, :12] - model(x).logits[:, :12]).abs().max() > 1e-4  # and the complete groups are quantized
    # the test can fail: quantizing every group for every query lets queries 12 and 13 read token 14's statistics
    monkeypatch.setattr(kvc, "complete_boundary", lambda position, keep, group: 16)
    a, b = run(x), run(later)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.equal(a[:, 12:14], b[:, 12:14])


# ------------------------------------------------------------------ rows, labels, spelling


def test_rows_labels_and_recorded_facts(ids):
    rows = kv_rows("int8-token,int4-kivi-g8", [Row()], keep=4)
    assert [r.kind for r in rows] == ["method", "kv-cache", "kv-cache"]
    assert row_label(rows[2]) == "KV cache int4 KIVI (g8), 4 sinks kept"
    assert row_label(kv_rows("int2-channel", [Row()], keep=1, rotate=True)[0]) == (
        "KV cache int2 per channel (g32), 1 sink kept, Hadamard-rotated"
    )
    weights = kv_rows("int4-kivi", parse_rows("absmax"))
    assert [r.method for r in weights] == ["fp32", "absmax", "absmax"] and weights[2].kind == "kv-cache"
    assert row_label(weights[2]) == f"{row_label(weights[1])} + KV cache int4 KIVI (g32)"
    model = make_model("llama")
    done = evaluate_rows(model, ids, SETTINGS, [*weights[1:], rows[2]], progress=False)
    extra = done[1].result.extra
    assert extra["kv_cache"] == "int4-kivi" and extra["kv_keep"] == 0 and extra["kv_group"] == 32
    assert extra["kv_attention"] == "sdpa" and done[1].report is not None  # the weights quantized too
    assert done[2].result.extra["kv_keep"] == 4 and done[2].result.kl_vs_ref > 0
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int3-kivi", "int3 is not offered"),
        ("int4-blocks", "unknown granularity 'blocks'"),
        ("int4-token-g32", "per-token scales have no token groups"),
        ("int4-kivi-g0", "must be a positive number"),
        ("int4-kivi-gx", "must be a positive number"),
        ("kivi-int4", "spell it int8|int4|int2"),
        (" , ", "names no cache format"),
        ("int4-kivi,int4-kivi-g32", "names a format twice"),
    ],
)
def test_spelling_errors_are_clear(text, message):
    with pytest.raises(InvalidArgumentError, match=message):
        kv_rows(text, [Row()])


def test_keep_and_several_weight_rows_are_refused():
    with pytest.raises(InvalidArgumentError, match="--kv-keep must be a whole number"):
        kv_rows("int4-kivi", [Row()], keep=-1)
    with pytest.raises(InvalidArgumentError, match="one set of weights"):
        kv_rows("int4-kivi", parse_rows("absmax,llm.int8"))


@torch.no_grad()
def test_the_implementation_is_restored_after_an_exception_and_refusals_name_the_family(monkeypatch):
    model = make_model("llama")
    x = _x()
    ref = model(x).logits
    with pytest.raises(RuntimeError, match="boom"), quantized_kv_cache(model, _kv("int2-token")):
        model(x)
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and not kvc._ACTIVE
    assert torch.equal(model(x).logits, ref)
    model.config._attn_implementation = "flex_attention"
    with (
        pytest.raises(InvalidArgumentError, match="runs 'flex_attention' attention"),
        quantized_kv_cache(model, _kv("int4-kivi")),
    ):
        pass
    model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(InvalidArgumentError, match="family 'llama': its attention does not go through"):
        with quantized_kv_cache(model, _kv("int4-kivi")):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_eval_prints_cache_rows_and_writes_their_facts(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "kv.json"
    folder = str(model_dir("llama"))
    common = ["eval", "--model", folder, "--corpus", str(text_file), "--window", "32", "--max-windows", "4"]
    code = main([*common, "--kv-cache", "int8-token,int4-kivi-g8", "--kv-keep", "2", "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "KV cache int4 KIVI (g8), 2 sinks kept" in printed and "KV cache int8 per token, 2 sinks kept" in printed
    records = json.loads(out.read_text())
    assert [r["extra"].get("kv_cache") for r in records] == [None, "int8-token", "int4-kivi-g8"]
    assert all(r["extra"]["kv_keep"] == 2 and r["extra"]["kv_rotate"] is False for r in records[1:])
    assert all(r["kl_vs_ref"] is not None and r["delta_ppl_pct"] is not None for r in records[1:])
    assert main([*common, "--kv-keep", "4", "--quiet"]) == 2
    assert "apply to --kv-cache rows" in capsys.readouterr().err
    assert main([*common, "--kv-cache", "int5-kivi", "--quiet"]) == 2
    assert "int5 is not offered" in capsys.readouterr().err
