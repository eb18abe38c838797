"""Static per-tensor activation scales (outliers.quant.static) and their rows (outliers.eval.static_rows):
exact percentiles, saturation, calibration off the evaluated tokens, PrefixQuant's prefix in float, and a
reference that reads the same prefix."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from helpers import make_model

import outliers.eval.static_rows  # noqa: F401  registers the static rows
from outliers.errors import CorpusError, InvalidArgumentError
from outliers.eval.rows import Prepared, Row, RowEvaluator, RowKind, parse_rows, row_label
from outliers.eval.windows import PerplexitySettings
from outliers.quant.static import (
    StaticInt8Linear,
    StaticState,
    TopK,
    calibrate,
    needed,
    quantize_static,
    set_prefix,
    set_scales,
    static_copy,
)

SETTINGS = PerplexitySettings(window=32, max_windows=4, batch_size=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (800,), generator=torch.Generator().manual_seed(0))


def test_the_kept_top_values_give_numpys_percentiles_exactly():
    hand = torch.arange(1000, dtype=torch.float32).flip(0)  # 999 ... 0, streamed in uneven pieces
    top = TopK(needed(1000, 0.99))
    for piece in hand.split(137):
        top.add(piece)
    assert top.n == 1000 and len(top.values) == needed(1000, 0.99) == 11
    for q in (0.99, 0.999, 0.9999, 1.0):
        assert top.quantile(q) == pytest.approx(float(np.quantile(hand.double().numpy(), q)), abs=1e-9)
    assert top.quantile(0.999) == pytest.approx(998.001) and top.max() == 999.0
    with pytest.raises(InvalidArgumentError, match="needs the top"):
        top.quantile(0.9)  # below what the kept values answer
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)).abs()
    top = TopK(needed(len(x), 0.999))
    for piece in x.split(3000):
        top.add(piece)
    for q in (0.999, 0.9999):
        assert top.quantile(q) == pytest.approx(float(np.quantile(x.double().numpy(), q)), rel=1e-6)


def _inputs(model, windows):
    """Every linear's input over ``windows``, whole, by hooks: what the streamed calibration must match."""
    seen: dict[str, list[torch.Tensor]] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).abs() for n, v in seen.items()}


def test_the_scale_is_the_calibration_max_or_its_exact_percentile():
    model = make_model("llama")
    windows = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(2))
    calib = calibrate(model, windows, lowest=0.99, batch_size=2)
    whole = _inputs(model, windows)
    assert set(calib.tops) == set(whole) and calib.tokens == 96
    for q in (None, 0.99, 0.999, 0.9999):
        scales = calib.scales(q)
        for name, a in whole.items():
            want = float(a.max()) if q is None else float(np.quantile(a.double().numpy(), q))
            assert scales[name] == pytest.approx(want, rel=1e-6), (name, q)
    # q, k and v read one tensor: one record
    assert calib.tops["model.layers.0.self_attn.q_proj"] is calib.tops["model.layers.0.self_attn.v_proj"]


def test_values_beyond_the_scale_saturate():
    x = torch.tensor([-10.0, -1.0, 0.0, 0.25, 1.0, 10.0])
    assert quantize_static(x, 1.0).tolist() == [-127, -127, 0, 32, 127, 127]
    assert quantize_static(x, 0.0).tolist() == [0] * 6
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    q = StaticInt8Linear(linear, StaticState(), "l")
    with pytest.raises(InvalidArgumentError, match="calibrate first"):
        q(torch.randn(2, 16))
    q.x_scale.fill_(1.0)
    big = torch.randn(4, 16) * 5  # most values beyond the scale
    assert torch.equal(q(big), q(big.clamp(-1.0, 1.0)))  # saturated: as if clipped first
    assert q.state.saturated == int((big.abs() > 1).sum()) and q.state.values == 2 * big.numel()
    # within the scale: int8 codes on both sides, close to the float product
    small = torch.rand(4, 16) * 2 - 1
    assert torch.allclose(q(small), linear(small), atol=0.05)


def test_prefix_positions_pass_through_the_float_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    state = StaticState(prefix=2)
    q = StaticInt8Linear(linear, state, "l")
    q.x_scale.fill_(0.5)  # coarse: every position after the prefix is visibly quantized
    x = torch.randn(3, 7, 16)
    out = q(x)
    assert torch.allclose(out[:, :2], linear(x[:, :2]), rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 2:], linear(x[:, 2:]), atol=1e-3)
    state.seq = 7  # layers that see (batch x seq, features) rows: the length from the embedding's hook
    assert torch.equal(q(x.reshape(-1, 16)), out.reshape(-1, 8))


def test_calibration_never_reads_the_evaluated_tokens(ids):
    model = make_model("llama")
    ev = RowEvaluator(model, ids, SETTINGS, progress=False)
    assert ev.reserved == 4 * 32
    fed: list[torch.Tensor] = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, a: fed.append(a[0].clone()))
    try:
        ev.prepare(parse_rows("static-p99.9+prefix")[0])
    finally:
        hook.remove()
    assert fed  # prefix detection and calibration ran on the float model
    tail = ids[len(ids) - 4 * 32 :].view(4, 32)
    assert len(ids) - 4 * 32 >= ev.reserved
    for x in fed:  # the windows, after a prefix where there is one: all from the calibration tail
        assert any(torch.equal(x[i, -32:], tail[j]) for i in range(len(x)) for j in range(4))
        assert not any(
            torch.equal(x[i, -32:], ids[: ev.reserved].view(4, 32)[j]) for i in range(len(x)) for j in range(4)
        )
    short = RowEvaluator(model, ids[:200], PerplexitySettings(window=32, max_windows=4), progress=False)
    with pytest.raises(CorpusError, match="calibration needs 4 windows of 32 tokens after the 128"):
        short.prepare(parse_rows("static-minmax")[0])


@contextmanager
def massive_first_position(model, gain=2000.0):
    """The first position of every sequence carries a massive value into each block's down projection: an
    attention sink's massive activation, planted (hooks on act_fn travel with the copies made of the model)."""
    handles = []
    for layer in model.model.layers:

        def plant(module, args, out):
            out = out.clone()
            out[:, 0, 5] += gain
            return out

        handles.append(layer.mlp.act_fn.register_forward_hook(plant))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_the_prefix_keeps_a_massive_first_token_out_of_the_scales(ids):
    model = make_model("llama")
    with torch.no_grad():  # MLPs that matter: what their coarse inputs lose shows in the output
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30)
    with massive_first_position(model):
        ev = RowEvaluator(model, ids, SETTINGS, progress=False)
        plain, prefixed = (
            ev.evaluate(Row(m, kind="static", options={"calibration": "minmax", "quantile": None, "prefix": p}))
            for m, p in (("static-minmax", None), ("static-minmax+prefix=1", 1))
        )
        dynamic = ev.evaluate(Row("absmax-vector"))
    # without the prefix the first token's value sets every down projection's scale: coarse everywhere
    assert prefixed.result.kl_vs_ref < plain.result.kl_vs_ref / 100  # about 1/900 here
    assert prefixed.result.extra["prefix_ids"] == [int(ids[0])]  # no BOS: the corpus' first token
    assert prefixed.result.ref_ppl != plain.result.ref_ppl  # each against the float model given its own input
    assert 0 <= plain.result.extra["saturated_pct"] < 0.1  # min-max: only evaluated values beyond calibration's
    assert dynamic.result.kl_vs_ref < plain.result.kl_vs_ref
    assert prefixed.report.method == "static-minmax+prefix=1" and prefixed.setup["calibrate_seconds"] > 0


def test_a_row_compared_given_the_same_prefix_reads_it_in_the_reference_too(ids):
    model = make_model("llama")
    prefix = torch.tensor([5, 6, 7])
    from outliers.eval import rows

    kinds = [
        rows.register_row_kind(
            RowKind("toy-same-prefix", lambda r, ev: Prepared(ev.model, True, prefix=prefix, reference_prefix=True))
        ),
        rows.register_row_kind(RowKind("toy-own-prefix", lambda r, ev: Prepared(ev.model, True, prefix=prefix))),
    ]
    try:
        ev = RowEvaluator(model, ids, SETTINGS, progress=False)
        own = ev.evaluate(Row(kind="toy-own-prefix"))  # the reference reads the windows alone, kept
        same = ev.evaluate(Row(kind="toy-same-prefix"))  # ... and now after the prefix: kept apart
        again = ev.evaluate(Row(kind="toy-own-prefix"))
    finally:
        for k in kinds:
            rows._KINDS.pop(k.name)
    assert same.result.kl_vs_ref == 0.0 and same.result.top1_agreement == 1.0
    assert same.result.ref_ppl == same.result.ppl == own.result.ppl
    assert own.result.kl_vs_ref > 0 and again.result.kl_vs_ref == own.result.kl_vs_ref
    assert len(ev.reference_states) == 2 * 2  # two batches, read alone and after the prefix


def test_static_names_parse_and_all_is_unchanged():
    rows = parse_rows("static-minmax,static-p99.9,static-p99.99+prefix,static-p99@smooth=0.5,absmax-vector")
    assert [r.kind for r in rows] == ["method", "static", "static", "static", "static", "method"]
    assert [r.options.get("quantile") for r in rows[1:5]] == [None, 0.999, 0.9999, 0.99]
    assert rows[3].options["prefix"] == 4 and rows[4].transform.smooth == 0.5
    labels = [row_label(r) for r in rows]
    assert labels[1:5] == [
        "static W8A8 min-max",
        "static W8A8 p99.9",
        "static W8A8 p99.99 + prefix",
        "static W8A8 p99 after smooth 0.5",
    ]
    assert all(r.kind == "method" for r in parse_rows("all"))
    for bad in ("static-max", "static-p100", "static-minmax+prefix=0", "static-p99.9+bos"):
        with pytest.raises(InvalidArgumentError, match="static row"):
            parse_rows(bad)


def test_the_copy_shares_the_float_weights_and_scales_are_set_per_row():
    model = make_model("llama")
    copy, replaced, skipped, before, after = static_copy(model)
    assert skipped == ["lm_head"] and len(replaced) == 2 * 7 and after < before
    q = copy.get_submodule(replaced[0])
    assert q.weight_fp.data_ptr() == model.get_submodule(replaced[0]).weight.data_ptr()
    with pytest.raises(InvalidArgumentError, match="no activation scale"):
        set_scales(copy, {})
    set_scales(copy, dict.fromkeys(replaced, 2.0))
    assert set_prefix(copy, 3).prefix == 3 and float(q.x_scale) == 2.0


def test_eval_prints_static_rows(model_dir, text_file, tmp_path, capsys):
    from outliers.cli import main

    out = tmp_path / "r.json"
    args = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "64"]
    methods = "static-minmax,static-p99.9+prefix,absmax-vector"
    assert main([*args, "--max-windows", "3", "--method", methods, "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["fp32", "static-minmax", "static-p99.9+prefix", "absmax-vector"]
    assert records[2]["extra"]["prefix_ids"] and records[2]["extra"]["static_calibration"] == "p99.9"
    assert "static W8A8 p99.9 + prefix" in printed and "% of quantized values saturated; prefix" in printed
