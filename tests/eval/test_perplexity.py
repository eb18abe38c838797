import json
import math

import numpy as np
import pytest
import torch
from helpers import make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers import CorpusError, InvalidArgumentError, perplexity
from outliers.eval.windows import PerplexitySettings, spans


@pytest.fixture(scope="module")
def ids(tokenizer, sample_text) -> torch.Tensor:
    return torch.tensor(tokenizer(sample_text[:8000])["input_ids"])


def plain_chunks_ppl(model, ids, window, n):
    """The GPTQ loop: mean of model(ids, labels=ids).loss over equal chunks."""
    with torch.inference_mode():
        losses = [
            model(ids[None, i * window : (i + 1) * window], labels=ids[None, i * window : (i + 1) * window]).loss.item()
            for i in range(n)
        ]
    return math.exp(sum(losses) / n)


def hf_guide_sliding_nll_sum(model, ids, window, stride):
    """The HF perplexity guide with labels=-100 masks, summing exact token NLLs."""
    total, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            trg_len = end - prev_end
            x = ids[None, begin:end]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            n_valid = int((labels[:, 1:] != -100).sum())
            total += model(x, labels=labels).loss.item() * n_valid
            count += n_valid
            prev_end = end
            if end == len(ids):
                break
    return total, count


def test_chunks_equal_plain_loss_loop(arch, ids):
    model = make_model(arch)
    r = perplexity(model, ids, PerplexitySettings(window=64, max_windows=5, batch_size=2), progress=False)
    assert r.n_windows == 5 and r.n_tokens == 5 * 63
    assert r.ppl == pytest.approx(plain_chunks_ppl(model, ids, 64, 5), rel=1e-5)


def test_sliding_equals_hf_guide(arch, ids):
    model = make_model(arch)
    ids = ids[:300]
    r = perplexity(
        model, ids, PerplexitySettings(protocol="sliding", window=64, stride=24, batch_size=3), progress=False
    )
    total, count = hf_guide_sliding_nll_sum(model, ids, 64, 24)
    assert r.n_tokens == count == len(ids) - 1  # every token after the first, once
    assert r.nll == pytest.approx(total / count, rel=1e-5)


def test_sliding_with_stride_window_equals_chunks(ids):
    model = make_model("llama")
    x = ids[: 4 * 50]
    a = perplexity(model, x, PerplexitySettings(window=50), progress=False)
    b = perplexity(model, x, PerplexitySettings(protocol="sliding", window=50, stride=50), progress=False)
    assert (a.n_tokens, a.n_windows) == (b.n_tokens, b.n_windows)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)


@pytest.mark.parametrize("protocol", ["chunks", "sliding"])
def test_batch_size_does_not_change_the_number(protocol, ids):
    model = make_model("gpt2")
    runs = [
        perplexity(model, ids[:400], PerplexitySettings(protocol=protocol, window=48, batch_size=b), progress=False).ppl
        for b in (1, 3, 8)
    ]
    assert runs == pytest.approx([runs[0]] * 3, rel=1e-5)


def test_logits_to_keep_shortcut_matches_full_logits(ids):
    model = make_model("llama")

    class NoShortcut(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    a = perplexity(model, ids[:300], PerplexitySettings(protocol="sliding", window=64, stride=16), progress=False)
    b = perplexity(
        NoShortcut(model), ids[:300], PerplexitySettings(protocol="sliding", window=64, stride=16), progress=False
    )
    assert a.nll == pytest.approx(b.nll, rel=1e-6)


def test_result_records_settings_and_is_json_ready(ids):
    model = make_model("opt")
    r = perplexity(
        model,
        ids,
        PerplexitySettings(window=32, max_windows=3, batch_size=2),
        progress=False,
        model_name="tiny-opt",
        corpus_name="sample",
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert d["protocol"] == "chunks" and d["window"] == 32 and d["max_windows"] == 3
    assert d["batch_size"] == 2 and d["model"] == "tiny-opt" and d["corpus"] == "sample"
    assert d["method"] == "fp32" and d["dtype"] == "fp32" and d["corpus_tokens"] == len(ids)
    assert d["tokens_per_s"] > 0 and d["seconds"] > 0
    assert math.exp(d["nll"]) == pytest.approx(d["ppl"])


@given(n=st.integers(2, 400), window=st.integers(2, 64), data=st.data())
@settings(max_examples=200, deadline=None)
def test_sliding_scores_every_token_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    if n < window:
        with pytest.raises(CorpusError):
            spans(n, PerplexitySettings("sliding", window, stride))
        return
    scored = []
    for s in spans(n, PerplexitySettings("sliding", window, stride)):
        assert s.begin < s.score_from < s.end and s.end - s.begin <= window
        scored.extend(range(s.score_from, s.end))
    if stride < window:
        assert scored == list(range(1, n))
    else:  # like chunks: each window's first token has no context
        assert scored == [t for t in range(1, n) if t % window]


@given(n=st.integers(2, 400), window=st.integers(2, 64), max_windows=st.none() | st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_chunks_are_disjoint_full_windows(n, window, max_windows):
    if n < window:
        return
    got = spans(n, PerplexitySettings("chunks", window, max_windows=max_windows))
    expect = n // window if max_windows is None else min(n // window, max_windows)
    assert len(got) == expect
    assert all(s.end - s.begin == window and s.score_from == s.begin + 1 for s in got)
    assert all(a.end == b.begin for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=1), "window must be an integer >= 2, got 1"),
        (dict(protocol="sliding", window=8, stride=9), "stride must be <= window"),
        (dict(protocol="sliding", window=8, stride=0), "stride must be an integer >= 1"),
        (dict(window=8, stride=4), "stride applies to the sliding protocol"),
        (dict(window=8, max_windows=0), "max_windows must be"),
        (dict(window=8, batch_size=0), "batch_size must be"),
        (dict(protocol="rolling"), "protocol must be one of"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        PerplexitySettings(**kwargs)


def test_corpus_shorter_than_a_window():
    with pytest.raises(CorpusError, match="corpus has 10 tokens, fewer than one window of 16"):
        perplexity(make_model("llama"), torch.arange(10), PerplexitySettings(window=16), progress=False)


def test_ids_must_be_1d_integers():
    with pytest.raises(InvalidArgumentError, match="1-D integer tensor"):
        perplexity(
            make_model("llama"), torch.zeros(2, 50, dtype=torch.long), PerplexitySettings(window=8), progress=False
        )
    with pytest.raises(InvalidArgumentError, match="1-D integer tensor"):
        perplexity(make_model("llama"), torch.zeros(50), PerplexitySettings(window=8), progress=False)


# ---------------------------------------------------------------- chunked head, reference, BOS, intervals


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "gemma"])
def test_chunked_head_equals_the_models_own_logits(name, ids):
    from outliers.arch.lmhead import split_lm

    model = make_model(name)
    split = split_lm(model)
    assert split is not None
    x = ids[None, :40]
    with torch.inference_mode():
        full = model(input_ids=x).logits
        parts = split.logits(split.hidden(x))
    torch.testing.assert_close(parts, full.float(), rtol=1e-5, atol=1e-5)


def test_token_nlls_add_up_to_the_window_sums(ids):
    r = perplexity(make_model("gpt2"), ids, PerplexitySettings(window=48, max_windows=5, batch_size=2), progress=False)
    assert len(r.token_nll) == r.n_tokens == sum(r.window_tokens)
    assert r.token_nll.dtype.name == "float32"
    per_window = np.split(r.token_nll.astype(np.float64), np.cumsum(r.window_tokens)[:-1])
    assert [w.sum() for w in per_window] == pytest.approx(r.window_nll, rel=1e-5)
    assert sum(r.window_nll) / r.n_tokens == pytest.approx(r.nll)
    low, high = r.ppl_ci95
    assert low < r.ppl < high


def test_a_model_against_itself_agrees_exactly(ids):
    model = make_model("llama")
    r = perplexity(
        model, ids, PerplexitySettings(window=32, max_windows=6, batch_size=4), reference=model, progress=False
    )
    assert r.kl_vs_ref == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
    assert r.delta_ppl_pct == pytest.approx(0.0, abs=1e-9) and r.ref_ppl == pytest.approx(r.ppl)
    assert r.ref_dtype == "fp32" and r.window_top1 == r.window_tokens


def test_agreement_against_a_slow_reference(ids):
    """KL, top-1 and the paired delta from a plain loop over full logits."""
    ref, other = make_model("llama", seed=0), make_model("llama", seed=1)
    states: dict = {}
    r = perplexity(
        other,
        ids,
        PerplexitySettings(window=32, max_windows=4, batch_size=3),
        reference=ref,
        reference_states=states,
        progress=False,
    )
    assert len(states) == 2  # batches of 3 + 1 windows, kept for the next comparison
    kl = agree = n = 0.0
    with torch.inference_mode():
        for i in range(4):
            x = ids[None, i * 32 : (i + 1) * 32]
            lr = torch.log_softmax(ref(input_ids=x).logits[0, :-1].float(), -1)
            lq = torch.log_softmax(other(input_ids=x).logits[0, :-1].float(), -1)
            kl += float((lr.exp() * (lr - lq)).sum())
            agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
            n += 31
    assert r.kl_vs_ref == pytest.approx(kl / n, rel=1e-4)
    assert r.top1_agreement == pytest.approx(agree / n)
    assert r.delta_ppl_pct == pytest.approx(100 * (r.ppl / r.ref_ppl - 1), rel=1e-6)
    again = perplexity(
        other,
        ids,
        PerplexitySettings(window=32, max_windows=4, batch_size=3),
        reference=ref,
        reference_states=states,
        progress=False,
    )
    assert again.kl_vs_ref == pytest.approx(r.kl_vs_ref, rel=1e-6)  # from the kept states
    lo, hi = r.delta_ppl_pct_ci95
    assert lo <= r.delta_ppl_pct <= hi


def test_bos_per_window_prepends_bos_and_scores_every_corpus_token(ids):
    model = make_model("gemma")
    bos = 0
    corpus = torch.cat([torch.tensor([bos]), ids[:200]])  # as a tokenizer that adds one BOS would give
    r = perplexity(model, corpus, PerplexitySettings(window=32, bos="window"), bos_token_id=bos, progress=False)
    n = 200 // 31
    assert r.n_windows == n and r.window_tokens == [31] * n and r.bos == "window"
    total = 0.0
    with torch.inference_mode():
        for i in range(n):
            x = torch.cat([torch.tensor([bos]), ids[i * 31 : (i + 1) * 31]])[None]
            total += model(input_ids=x, labels=x).loss.item() * 31
    assert r.nll == pytest.approx(total / (31 * n), rel=1e-5)
    with pytest.raises(InvalidArgumentError, match="needs the tokenizer's BOS"):
        perplexity(model, corpus, PerplexitySettings(window=32, bos="window"), progress=False)


@given(n=st.integers(2, 300), window=st.integers(3, 40), data=st.data())
@settings(max_examples=100, deadline=None)
def test_bos_window_sliding_scores_every_corpus_token_once(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    s = PerplexitySettings("sliding", window, stride, bos="window")
    if n < window - 1:
        return
    scored = [t for sp in spans(n, s) for t in range(sp.score_from, sp.end)]
    assert scored == list(range(n))
    assert all(sp.end - sp.begin <= window - 1 for sp in spans(n, s))


def test_intervals_cover_the_statistic_and_widen_with_spread():
    from outliers.eval.intervals import delta_ppl_pct_interval, ppl_interval, rate_interval

    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 512, size=40)
    nll = tokens * (2.5 + 0.3 * rng.standard_normal(40))
    lo, hi = ppl_interval(nll, tokens)
    point = math.exp(nll.sum() / tokens.sum())
    assert lo < point < hi
    wide = ppl_interval(tokens * (2.5 + 1.0 * rng.standard_normal(40)), tokens)
    assert wide[1] - wide[0] > hi - lo
    # paired: a constant 1 % shift on every window has a (near) zero-width interval
    q = nll + tokens * math.log(1.01)
    dlo, dhi = delta_ppl_pct_interval(q, nll, tokens)
    assert dlo == pytest.approx(1.0, abs=1e-6) and dhi == pytest.approx(1.0, abs=1e-6)
    assert rate_interval(tokens, tokens) == pytest.approx((1.0, 1.0))
    assert all(math.isnan(v) for v in ppl_interval([1.0], [3]))


# ---------------------------------------------------------------- speed: the first batch apart


def test_first_batch_is_reported_apart_from_the_steady_rate(ids):
    r = perplexity(make_model("llama"), ids, PerplexitySettings(window=32, max_windows=5, batch_size=2), progress=False)
    assert 0 < r.warmup_seconds < r.seconds
    fed_after_first = (5 - 2) * 32  # three windows of 32 tokens after the first batch of two
    assert r.steady_tokens_per_s == pytest.approx(fed_after_first / (r.seconds - r.warmup_seconds))
    assert r.tokens_per_s == pytest.approx(5 * 32 / r.seconds)  # its meaning unchanged: every batch


def test_one_batch_has_no_steady_rate(ids):
    r = perplexity(make_model("llama"), ids, PerplexitySettings(window=32, max_windows=2, batch_size=4), progress=False)
    assert r.steady_tokens_per_s is None and r.warmup_seconds == r.seconds


def test_results_stored_before_the_speed_fields_still_load(ids):
    from outliers.eval.result import PerplexityResult

    d = perplexity(make_model("opt"), ids, PerplexitySettings(window=32, max_windows=3), progress=False).to_dict()
    old = {k: v for k, v in d.items() if k not in ("warmup_seconds", "steady_tokens_per_s")}
    r = PerplexityResult(**old)
    assert r.warmup_seconds is None and r.steady_tokens_per_s is None and r.tokens_per_s == d["tokens_per_s"]
