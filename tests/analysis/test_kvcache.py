"""Key-cache channels (outliers.analysis.kvcache): planted key outlier channels on tiny in-process models, a slow
reference on the cache itself, padding, hooks, the CLI and the study measure."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from outliers import InvalidArgumentError
from outliers.analysis.kvcache import kv_channels
from outliers.analysis.kvcache_capture import kv_hooks, rope_pairs, rotary_dims, run_with_cache
from outliers.cli import main
from outliers.quant.quantizers import dequantize_absmax, quantize_absmax

W, PLANT, GAIN = 32, 9, 50.0  # channel 9 = kv head 1, dim 1 (head_dim 8); its rotate_half pair is 13


def _ids(n=200, seed=0):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


def _plant(model, layer=1, channel=PLANT, gain=GAIN):
    """Scale one output row of the layer's key projection: a key outlier channel as the projection makes it."""
    with torch.no_grad():
        if hasattr(model, "transformer"):  # GPT-2: Conv1D c_attn, weights (in, out), outputs [q | k | v]
            e = model.config.n_embd
            attn = model.transformer.h[layer].attn.c_attn
            attn.weight[:, e + channel] *= gain
            attn.bias[e + channel] *= gain
        else:
            model.model.layers[layer].self_attn.k_proj.weight[channel] *= gain
    return model


def _row(res, kind, layer):
    rows = res.layers[(res.layers.kind == kind) & (res.layers.layer == layer)]
    assert len(rows) == 1, (kind, layer)
    return rows.iloc[0]


def test_planted_key_channel_is_found_pre_rope_and_within_its_pair_post_rope():
    res = kv_channels(_plant(make_model("llama")), _ids(), window=W, max_windows=3, batch_size=2, progress=False)
    assert (res.cached, res.kv_heads, res.head_dim, res.rotary_dim, res.n_tokens) == ("measured", 2, 8, 8, 3 * W)
    assert sorted(set(res.layers.kind)) == ["keys", "keys_cached", "values"]
    keys = _row(res, "keys", 1)
    assert keys.outliers == [PLANT] and keys.top_channel == PLANT and keys.concentration > 20
    cached = _row(res, "keys_cached", 1)
    assert cached.outliers and set(cached.outliers) <= {PLANT, PLANT + 4}  # RoPE spreads it over its pair
    rope = res.rope.set_index("layer")
    assert rope.loc[1, "pair_overlap"] == 1.0 and rope.loc[1, "n_pre"] == 1 and math.isnan(rope.loc[0, "overlap"])
    assert _row(res, "keys", 0).n_outliers == 0
    values = res.layers[res.layers.kind == "values"]
    assert (values.n_outliers == 0).all() and (values.concentration < 4).all()
    assert keys.err_per_channel < keys.err_per_token  # the KIVI argument, in one number
    summary = res.summary()
    assert summary["keys"]["layers_with_outliers"] == 0.5 and summary["values"]["layers_with_outliers"] == 0.0


def test_statistics_match_the_cache_read_directly():
    """The slow reference: every window through the model at once, statistics computed from the whole tensors."""
    model = _plant(make_model("llama"), layer=0, channel=3)
    ids = _ids(300, seed=1)
    res = kv_channels(model, ids, window=24, max_windows=5, batch_size=2, progress=False)
    with torch.inference_mode():
        cache = run_with_cache(model, ids[: 5 * 24].view(5, 24))
    for layer, (keys, values) in enumerate(cache):
        for kind, x in (("keys_cached", keys), ("values", values)):
            flat = x.transpose(1, 2).flatten(2).flatten(0, 1).double()  # (tokens, channels)
            got = res.channels[(res.channels.kind == kind) & (res.channels.layer == layer)]
            assert got.absmax.to_numpy() == pytest.approx(flat.abs().amax(0).numpy(), rel=1e-6)
            assert got["mean_abs"].to_numpy() == pytest.approx(flat.abs().mean(0).numpy(), rel=1e-5)
            assert got["std"].to_numpy() == pytest.approx(flat.std(0, unbiased=False).numpy(), rel=1e-4)
            z = x.transpose(1, 2)  # (windows, seq, heads, head_dim)
            err = [(dequantize_absmax(*quantize_absmax(z, d), d) - z).norm() / z.norm() for d in (-1, 1)]
            row = _row(res, kind, layer)
            assert [row.err_per_token, row.err_per_channel] == pytest.approx([float(e) for e in err], rel=1e-4)


def test_gpt2_fused_qkv_without_rope_caches_the_projected_keys():
    model = _plant(make_model("gpt2"), layer=0, channel=PLANT)
    res = kv_channels(model, _ids(), window=W, max_windows=2, progress=False)
    assert res.cached == "projected" and res.rotary_dim == 0 and res.rope.empty and res.kv_heads == 4
    assert sorted(set(res.layers.kind)) == ["keys", "values"]  # measured once, not twice
    assert _row(res, "keys", 0).outliers == [PLANT] and _row(res, "keys", 1).n_outliers == 0
    assert (res.layers[res.layers.kind == "values"].n_outliers == 0).all()
    seen: dict = {}
    batch = _ids(64, seed=2).view(2, W)
    with torch.inference_mode(), kv_hooks(model, lambda kind, layer, x: seen.setdefault((kind, layer), x.clone())):
        cache = run_with_cache(model, batch)
    for layer, (keys, values) in enumerate(cache):  # what the projection makes is what the cache holds
        torch.testing.assert_close(keys.transpose(1, 2).flatten(2), seen["keys", layer], rtol=0, atol=0)
        torch.testing.assert_close(values.transpose(1, 2).flatten(2), seen["values", layer], rtol=0, atol=0)


def test_gemma3_key_norm_bounds_the_planted_channel():
    """Gemma 3 normalizes each head's key (RMS, times 1 + w) before RoPE: the planted channel still tops its layer,
    but no key entry can exceed sqrt(head_dim) * max|1 + w|, so the concentration collapses."""
    model = _plant(make_model("gemma"))
    res = kv_channels(model, _ids(), window=W, max_windows=2, progress=False)
    assert sorted(set(res.layers.kind)) == ["keys", "keys_cached", "keys_normed", "values"]
    assert _row(res, "keys", 1).outliers == [PLANT] and _row(res, "keys", 1).concentration > 20
    normed = _row(res, "keys_normed", 1)
    assert normed.top_channel == PLANT and normed.concentration < 4 and normed.n_outliers == 0
    bound = math.sqrt(8) * float((1 + model.model.layers[1].self_attn.k_norm.weight.detach()).abs().max())
    assert normed.top_absmax <= bound + 1e-4 and _row(res, "keys_cached", 1).top_absmax <= bound + 1e-4
    assert normed.top_absmax > 0.9 * bound  # the planted channel carries nearly all of its head's norm
    seen: list = []  # keys_normed is the norm's own output (Gemma 3 lays it out (batch, heads, seq, head_dim))
    norm = model.model.layers[1].self_attn.k_norm
    handle = norm.register_forward_hook(lambda m, a, out: seen.append(out.transpose(1, 2).flatten(2)))
    try:
        with torch.inference_mode():
            model(input_ids=_ids()[: 2 * W].view(2, W))
    finally:
        handle.remove()
    got = res.channels[(res.channels.kind == "keys_normed") & (res.channels.layer == 1)].absmax.to_numpy()
    assert got == pytest.approx(torch.cat(seen).abs().amax((0, 1)).double().numpy(), rel=1e-6)


def test_padding_is_excluded():
    model = make_model("llama")
    rows = _ids(48, seed=3).view(2, 24)
    mask = torch.ones_like(rows)
    mask[1, 16:] = 0  # right padding: the real tokens never see it
    other = rows.clone()
    other[1, 16:] = torch.arange(8) + 300
    a, b = (kv_channels(model, r, attention_mask=mask, batch_size=2, progress=False) for r in (rows, other))
    assert a.n_tokens == b.n_tokens == 24 + 16 and a.bos == "rows"
    for col in ("absmax", "mean_abs", "std"):
        np.testing.assert_allclose(a.channels[col], b.channels[col], rtol=1e-6)
    np.testing.assert_allclose(a.layers.err_per_channel, b.layers.err_per_channel, rtol=1e-6)
    c, d = (kv_channels(model, r, batch_size=2, progress=False) for r in (rows, other))
    assert not np.allclose(c.channels.absmax, d.channels.absmax)  # counted, the tail would change them


def test_hooks_are_removed_on_exit_and_when_the_forward_raises():
    model = make_model("llama")
    before = hook_count(model)
    kv_channels(model, _ids(), window=W, max_windows=1, progress=False)
    assert hook_count(model) == before

    def boom(module, args, out):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        kv_channels(model, _ids(), window=W, max_windows=1, progress=False)
    handle.remove()
    assert hook_count(model) == before
    with pytest.raises(KeyError), kv_hooks(model, lambda *a: None):
        raise KeyError("inside")
    assert hook_count(model) == before


def test_rope_pairs_and_partial_rotary():
    assert rope_pairs(16, 8, 8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 8, 9, 10, 11, 8, 9, 10, 11]
    assert rope_pairs(8, 8, 4).tolist() == [0, 1, 0, 1, 4, 5, 6, 7]  # only the first 4 dims rotate
    model = make_model("gpt_neox")  # rotary_pct 0.25 of head_dim 8: dims 0 and 1 form the only pair
    from outliers.analysis.kvcache_capture import kv_layout

    kv, head_dim = kv_layout(model)
    assert (kv.fused, head_dim, rotary_dims(model, kv, head_dim, 2)) == ("heads,qkv", 8, (2, [True, True]))
    res = kv_channels(model, _ids(), window=W, max_windows=1, progress=False)
    assert res.rotary_dim == 2 and len(res.rope) == 2
    keep = res.channels[(res.channels.kind == "keys") & (res.channels.dim >= 2)]
    post = res.channels[(res.channels.kind == "keys_cached") & (res.channels.dim >= 2)]
    np.testing.assert_allclose(keep.absmax, post.absmax, rtol=1e-6)  # dims past the rotary ones are not rotated


def test_bad_arguments():
    model = make_model("llama")
    for kw, message in (
        ({"k": 1.0}, "k must be > 1"),
        ({"window": 1}, "window must be >= 2"),
        ({"token_sample": 0}, "token_sample >= 1"),
        ({"attention_mask": torch.ones(3, 3)}, "a mask of their shape"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            kv_channels(model, _ids(), progress=False, **kw)
    from types import SimpleNamespace

    class Odd(torch.nn.Module):
        config = SimpleNamespace(model_type="no-such-family")

    with pytest.raises(InvalidArgumentError, match="does not say where its keys and values are"):
        kv_channels(Odd(), _ids(), window=W)


def test_cli_json_and_out(model_dir, text_file, tmp_path, capsys):
    path, out = tmp_path / "kv.json", tmp_path / "kv"
    args = ["kvcache", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", str(W)]
    assert main([*args, "--max-windows", "2", "--json", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "key conc" in printed and "cached conc" in printed and "pairs kept" in printed and "per-channel" in printed
    d = json.loads(path.read_text())
    keys = {"model", "weights", "k", "cached", "kv_heads", "head_dim", "summary", "layers", "rope", "rope_overlap"}
    assert keys <= set(d) and d["n_windows"] == 2 and d["k"] == 4.0 and len(d["layers"]) == 3 * 2
    assert set(d["summary"]) == {"keys", "keys_cached", "values"}
    for f in ("channels.csv", "layers.csv", "rope.csv", "keys_heatmap.png", "keys_cached_heatmap.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "values_heatmap.png").exists() and (out / "concentration.png").exists()
    for extra, message in ((["--k", "1"], "--k must be > 1"), (["--json", str(tmp_path)], "is a folder")):
        assert main(["kvcache", "--model", "no-such-model", *extra, "--quiet"]) == 2  # refused before loading
        assert message in capsys.readouterr().err


def test_study_measure(model_dir, text_file, tmp_path):
    from studies.config import as_tables, parse_config
    from studies.planning import _settings
    from studies.report import write_report
    from studies.runner import run_study
    from studies.store import Store

    study = {"name": "kv", "models": [str(model_dir("gpt2"))], "corpora": [str(text_file)], "window": W}
    plain = parse_config({"study": study})
    assert not any(k.startswith("kvcache") for k in as_tables(plain)["study"])  # other studies' study.json unchanged
    cell = {"kind": "perplexity", "method": "fp32", "threshold": None}
    assert not any(k.startswith("kvcache") for k in _settings(cell, plain))  # nor their fingerprints
    with pytest.raises(InvalidArgumentError, match="kvcache_k must be > 1"):
        parse_config({"study": {**study, "kvcache_k": 1}})
    cfg = parse_config({"study": {**study, "measure": ["kvcache"], "kvcache_windows": 2, "batch_size": 2}})
    out = tmp_path / "out"
    counts = run_study(cfg, out, progress=False)
    row = Store(out).frame().iloc[0]
    assert counts["done"] == 1, row.error
    res = row.result
    assert row.kind == "kvcache" and row.n_tokens == 2 * W and res["n_windows"] == 2 and res["cached"] == "projected"
    assert set(res["summary"]) == {"keys", "values"} and res["k"] == 4.0
    text = write_report(out).read_text()
    assert "## Key-cache channels" in text and (out / "kvcache.csv").exists()
    assert "key err per-channel" in (out / "kvcache.md").read_text()
