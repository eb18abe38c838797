"""Agreement as llama.cpp reports it (outliers.eval.agreement): per-token KLD and Δp by hand, their
percentiles, RMS and intervals over windows, and the fields a compared perplexity result carries."""

import json
import math
import time

import numpy as np
import pytest
import torch
from helpers import make_model

from outliers.eval.agreement import (
    agreement_fields,
    delta_p,
    delta_p_summary,
    kld_summary,
    token_agreement,
)
from outliers.eval.intervals import N_RESAMPLES, SEED, pooled_percentile_intervals
from outliers.eval.perplexity import perplexity
from outliers.eval.windows import PerplexitySettings
from outliers.quant.model import quantized_copy

# ---------------------------------------------------------------- per token, by hand


def test_kld_delta_p_and_top1_of_two_3_token_vocabularies_by_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    q = np.array([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])
    # logits are log-probabilities up to a constant per position: a shift must change nothing
    got = token_agreement(np.log(p), np.log(q) + np.array([[0.0], [7.0]]), np.array([1, 2]))
    # KL(p || q) = 0.5 ln(0.5 / 0.25) + 0.25 ln(0.25 / 0.5) + 0.25 ln 1 = 0.25 ln 2; the same distribution: 0
    assert got.kl == pytest.approx([0.25 * math.log(2), 0.0], abs=1e-15)
    assert got.delta_p == pytest.approx([0.5 - 0.25, 0.0], abs=1e-15)  # q(next) - p(next)
    assert got.same_top.tolist() == [False, True]


def test_delta_p_from_the_two_nlls():
    assert delta_p(np.array([-math.log(0.5)]), np.array([-math.log(0.25)])) == pytest.approx([0.25])
    assert delta_p(np.float32([1.0]), np.float32([1.0])).dtype == np.float64


# ---------------------------------------------------------------- summaries


def test_kld_percentiles_are_numpy_s_linear_ones_and_the_max():
    kl = np.arange(1.0, 11.0)  # 1 .. 10: rank position q (n - 1), linearly between neighbours
    s = kld_summary(kl, [5, 5])
    assert s.percentiles == pytest.approx({"50": 5.5, "90": 9.1, "95": 9.55, "99": 9.91, "99.9": 9.991, "max": 10.0})
    for k in ("50", "90", "95", "99", "99.9"):
        assert s.percentiles[k] == pytest.approx(np.percentile(kl, float(k)))
    assert set(s.percentiles_ci95) == {"50", "90", "95", "99", "99.9"}  # the max has none


def test_delta_p_mean_rms_percentiles_and_extremes():
    dp = np.array([0.1, -0.2, 0.3, 0.0])
    s = delta_p_summary(dp, [2, 2])
    assert s.mean == pytest.approx(0.05) and s.rms == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 4))
    assert s.percentiles["min"] == -0.2 and s.percentiles["max"] == 0.3
    assert s.percentiles["50"] == pytest.approx(0.05) and set(s.percentiles) == {
        *("1", "5", "10", "50", "90", "95", "99"),
        *("min", "max"),
    }
    assert set(s.percentiles_ci95) == {"1", "5", "10", "50", "90", "95", "99"}


def test_intervals_contain_their_point_estimates():
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 60, size=25)
    kl = rng.exponential(0.01, size=tokens.sum()) * np.repeat(rng.uniform(0.5, 2, size=25), tokens)
    s = kld_summary(kl, tokens)
    for k, (lo, hi) in s.percentiles_ci95.items():
        assert lo <= s.percentiles[k] <= hi, k
    dp = rng.normal(-0.002, 0.03, size=tokens.sum())
    d = delta_p_summary(dp, tokens)
    assert d.mean_ci95[0] <= d.mean <= d.mean_ci95[1] and d.rms_ci95[0] <= d.rms <= d.rms_ci95[1]
    for k in ("5", "50", "95"):
        lo, hi = d.percentiles_ci95[k]
        assert lo <= d.percentiles[k] <= hi, k


def test_one_window_gives_no_interval():
    x = np.linspace(0.0, 1.0, 31)
    assert kld_summary(x, [31]).percentiles_ci95 is None
    d = delta_p_summary(x - 0.5, [31])
    assert d.mean_ci95 is None and d.rms_ci95 is None and d.percentiles_ci95 is None
    assert pooled_percentile_intervals(x, [31], [50.0]) is None


def test_pooled_percentiles_are_those_of_the_resampled_windows_concatenated():
    """The vectorized bootstrap equals resampling windows, concatenating their tokens and calling numpy."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 90, size=9)
    x = rng.exponential(size=tokens.sum())
    x[::4] = 0.0  # ties
    qs = [0.0, 1.0, 50.0, 99.0, 99.9, 100.0]
    got = pooled_percentile_intervals(x, tokens, qs, n_resamples=200)
    draws = np.random.default_rng(SEED).integers(0, len(tokens), size=(200, len(tokens)))  # the same draws
    starts = np.concatenate([[0], np.cumsum(tokens)])
    by_hand = [np.percentile(np.concatenate([x[starts[w] : starts[w + 1]] for w in d]), qs) for d in draws]
    lo, hi = np.percentile(by_hand, [2.5, 97.5], axis=0)
    assert np.allclose([g[0] for g in got], lo, rtol=1e-12) and np.allclose([g[1] for g in got], hi, rtol=1e-12)
    assert pooled_percentile_intervals(x, tokens, qs, n_resamples=200) == got  # seeded


def test_pooled_percentiles_are_fast():
    tokens = [511] * 40  # 40 windows of 512: ~20k scored tokens
    x = np.random.default_rng(0).exponential(size=sum(tokens))
    started = time.perf_counter()
    pooled_percentile_intervals(x, tokens, [50, 90, 95, 99, 99.9], n_resamples=N_RESAMPLES)
    assert time.perf_counter() - started < 1.0


def test_token_counts_must_match_the_values():
    with pytest.raises(ValueError, match="window_tokens sums to 5"):
        pooled_percentile_intervals(np.zeros(6), [2, 3], [50.0])


# ---------------------------------------------------------------- on a perplexity result


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (1000,), generator=torch.Generator().manual_seed(0))


def _peaked(seed: int) -> torch.nn.Module:
    """A tiny model whose next-token distributions are far from uniform (a random one's are nearly uniform)."""
    model = make_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight *= 20
    return model


def test_a_compared_result_carries_llama_cpp_s_statistics_computed_exactly(ids):
    model, q = _peaked(0), _peaked(1)  # two models that disagree plainly, each token's KL far above rounding
    r = perplexity(q, ids, PerplexitySettings(window=32, max_windows=6, batch_size=2), reference=model, progress=False)
    assert r.token_ref_nll.shape == r.token_kl.shape == r.token_nll.shape == (6 * 31,)
    kl, dp, same = [], [], []
    with torch.no_grad():
        for w in range(6):
            x = ids[w * 32 : (w + 1) * 32]
            ref_logits, logits = model(input_ids=x[None]).logits[0, :-1], q(input_ids=x[None]).logits[0, :-1]
            a = token_agreement(ref_logits.numpy(), logits.numpy(), x[1:].numpy())
            kl.append(a.kl), dp.append(a.delta_p), same.append(a.same_top)
    kl, dp = np.concatenate(kl), np.concatenate(dp)
    # float32 log-probabilities round each token's KL by ~1e-6 nats; float64 by hand
    assert np.abs(r.token_kl - kl).max() < 1e-5 and kl.min() > 1e-2 and np.abs(dp).max() > 0.01
    assert np.abs(delta_p(r.token_nll, r.token_ref_nll) - dp).max() < 1e-6
    assert r.top1_agreement == pytest.approx(np.concatenate(same).mean())
    assert r.kld_percentiles["99"] == pytest.approx(np.percentile(r.token_kl.astype(np.float64), 99))
    assert r.kld_percentiles["max"] == pytest.approx(float(r.token_kl.max()))
    assert r.delta_p_rms == pytest.approx(math.sqrt(np.mean(dp * dp)), rel=1e-4)
    assert r.delta_p_mean == pytest.approx(dp.mean(), abs=1e-6)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert "token_ref_nll" not in d and d["kld_percentiles_ci95"]["99"][0] <= d["kld_percentiles"]["99"]
    assert d["delta_p_percentiles"]["min"] <= d["delta_p_percentiles"]["1"] and d["delta_p_rms_ci95"]
    html = r._repr_html_()
    assert "KLD p99" in html and "Δp RMS" in html and f"{100 * r.delta_p_rms:.3f} %" in html


def test_without_a_reference_there_are_none(ids):
    r = perplexity(make_model("llama"), ids, PerplexitySettings(window=32, max_windows=2), progress=False)
    d = r.to_dict()
    assert r.token_ref_nll is None
    assert all(d[k] is None for k in agreement_fields(np.zeros(2), np.zeros(2), np.zeros(2), [1, 1]))


def test_one_window_stores_no_nan(ids):
    model = make_model("llama")
    q, _ = quantized_copy(model, "absmax", 0.0)
    r = perplexity(q, ids, PerplexitySettings(window=32, max_windows=1), reference=model, progress=False)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # raises on NaN
    for k in ("kld_percentiles_ci95", "delta_p_mean_ci95", "delta_p_rms_ci95", "delta_p_percentiles_ci95"):
        assert d[k] is None, k
    assert d["kld_percentiles"]["50"] >= 0 and "nan" not in r._repr_html_()


def test_to_dict_nulls_nan_intervals_inside_dicts():
    from outliers.eval.result import _no_nan

    nan = float("nan")
    assert _no_nan({"50": (nan, nan), "99": (1.0, 2.0)}) == {"50": None, "99": (1.0, 2.0)}
    assert _no_nan({"50": (nan, nan)}) is None and _no_nan((nan, nan)) is None and _no_nan(None) is None
