"""The row evaluator (outliers.eval.rows): one recipe, copies held one at a time, a toy row kind added alone."""

import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import make_model

from outliers.eval.perplexity import perplexity
from outliers.eval.rows import ROW_KINDS, Prepared, Row, RowEvaluator, RowKind, evaluate_rows, parse_rows
from outliers.eval.windows import PerplexitySettings
from outliers.quant.model import quantized_copy
from outliers.quant.transforms import Transform

SETTINGS = PerplexitySettings(window=32, max_windows=6, batch_size=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (1000,), generator=torch.Generator().manual_seed(0))


def test_a_row_is_what_quantizing_by_hand_and_scoring_gives(ids):
    model = make_model("llama")
    (done,) = evaluate_rows(model, ids, SETTINGS, [Row("llm.int8", threshold=1.0)], progress=False)
    q, report = quantized_copy(model, "llm.int8", 1.0)
    by_hand = perplexity(q, ids, SETTINGS, reference=model, progress=False)
    assert done.result.ppl == by_hand.ppl and done.result.kl_vs_ref == by_hand.kl_vs_ref
    assert done.report.replaced == report.replaced and "quantize_seconds" in done.setup
    # per-token KL beside per-token NLL, summing to the mean; the float share LLM.int8() decomposed
    assert done.result.token_kl.shape == done.result.token_nll.shape
    assert float(done.result.token_kl.astype("float64").mean()) == pytest.approx(done.result.kl_vs_ref, rel=1e-4)
    assert 0 < done.float_columns_pct < 100 and done.float_columns_calls > 0


def test_a_threshold_sweep_quantizes_once_and_holds_one_copy(ids, monkeypatch):
    import outliers.quant.model as qm

    made = []
    real = qm.quantized_copy
    monkeypatch.setattr(qm, "quantized_copy", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    model = make_model("llama")
    ev = RowEvaluator(model, ids, SETTINGS, progress=False)
    swept = [ev.evaluate(Row("llm.int8", threshold=t)) for t in (0.5, 2.0, 6.0)]
    assert made == ["llm.int8"]  # re-thresholded, not quantized again
    fresh = evaluate_rows(model, ids, SETTINGS, [Row("llm.int8", threshold=2.0)], progress=False)[0]
    assert swept[1].result.ppl == fresh.result.ppl and swept[1].report.threshold == 2.0
    ev.evaluate(Row("absmax"))
    assert made == ["llm.int8", "llm.int8", "absmax"] and ev.held["quantized"][1][0] == "absmax"  # one held at a time


def test_the_reference_runs_once_for_all_rows(ids, monkeypatch):
    model = make_model("llama")
    calls = []
    body = model.model  # what the scorer runs (outliers.arch.lmhead); quantized copies carry a copy of the hook
    body.register_forward_pre_hook(lambda mod, args: calls.append(mod is body))
    rows = parse_rows("absmax,llm.int8", threshold=1.0)
    assert [r.method for r in rows] == ["fp32", "absmax", "llm.int8"]
    evaluate_rows(model, ids, SETTINGS, rows, progress=False)
    # fp32 scores the model itself (3 batches); the reference's 3 batches run once for the two quantized rows
    assert sum(calls) == 3 + 3 and len(calls) == 3 + 3 + 2 * 3


def test_a_transformed_row_calibrates_after_the_evaluated_tokens(ids):
    model = make_model("llama")
    ev = RowEvaluator(model, ids, SETTINGS, progress=False)
    assert ev.reserved == 6 * 32
    done = ev.evaluate(Row("absmax-vector", Transform(smooth=0.5, calib_windows=2), 0.0))
    assert done.result.extra["calib_tokens"] == 64 and "transform_seconds" in done.setup
    assert done.result.ref_ppl is not None  # compared with the untransformed float model


@pytest.fixture
def toy_kind():
    """A toy kind: the float model with one block's MLP output scaled, a context on the model."""

    def prepare(row, ev):
        mlp = ev.model.model.layers[0].mlp

        @contextmanager
        def scaled():
            handle = mlp.register_forward_hook(lambda m, a, out: out * row.options["scale"])
            try:
                yield
            finally:
                handle.remove()

        return Prepared(ev.model, compare=True, context=scaled(), facts={"scale": row.options["scale"]})

    from outliers.eval import rows

    kind = rows.register_row_kind(RowKind("toy-scale", prepare))
    yield kind
    rows._KINDS.pop(kind.name)


def test_a_new_row_kind_is_one_registration(toy_kind, ids):
    model = make_model("llama")
    same, changed = evaluate_rows(
        model,
        ids,
        SETTINGS,
        [Row(kind="toy-scale", options={"scale": 1.0}), Row(kind="toy-scale", options={"scale": 50.0})],
        progress=False,
    )
    assert same.result.kl_vs_ref == pytest.approx(0.0, abs=1e-6) and changed.result.kl_vs_ref > 1e-4
    assert changed.result.extra["scale"] == 50.0
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the context left the model as it was


def test_adding_a_row_kind_touches_no_other_module(tmp_path):
    """A kind defined in its own module, imported by nothing else, is evaluated by every caller's evaluator."""
    (tmp_path / "toy_kind.py").write_text(
        textwrap.dedent(
            """
            from outliers.eval.rows import Prepared, RowKind, register_row_kind

            register_row_kind(RowKind("identity", lambda row, ev: Prepared(ev.model, compare=True)))
            """
        )
    )
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        import toy_kind  # noqa: F401  the only new module
        from helpers import make_model
        from outliers.eval.rows import Row, evaluate_rows
        from outliers.eval.windows import PerplexitySettings
        ids = torch.randint(0, 384, (400,), generator=torch.Generator().manual_seed(0))
        settings = PerplexitySettings(window=32, max_windows=2)
        (r,) = evaluate_rows(make_model("llama"), ids, settings, [Row(kind="identity")], progress=False)
        print(r.result.top1_agreement)
        """
    )
    tests = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), tests], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == 1.0


def test_an_unknown_kind_names_the_kinds(ids):
    from outliers.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unknown row kind 'nope'; choose from method"):
        RowEvaluator(make_model("llama"), ids, SETTINGS).evaluate(Row(kind="nope"))
    assert "method" in ROW_KINDS


def test_a_row_may_put_unscored_tokens_before_every_window(ids):
    """A kind that changes the input: its prefix is read before each window, never scored; the reference reads
    the windows alone."""
    model = make_model("llama")
    prefix = torch.tensor([5, 6, 7])
    from outliers.eval import rows

    kind = rows.register_row_kind(RowKind("toy-prefix", lambda row, ev: Prepared(ev.model, True, prefix=prefix)))
    try:
        (done,) = evaluate_rows(model, ids, SETTINGS, [Row(kind=kind.name)], progress=False)
    finally:
        rows._KINDS.pop(kind.name)
    plain = perplexity(model, ids, SETTINGS, progress=False)
    assert done.result.n_tokens == plain.n_tokens and done.result.ref_ppl == pytest.approx(plain.ppl, rel=1e-6)
    # by hand: each window after the prefix, its own tokens' NLL from the logits after the prefix
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(6):
            x = ids[w * 32 : (w + 1) * 32]
            logits = model(input_ids=torch.cat([prefix, x])[None]).logits[0, len(prefix) :]
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], x[1:], reduction="sum"))
            n += 31
    assert done.result.nll == pytest.approx(nll / n, rel=1e-5) and done.result.kl_vs_ref > 0
