"""Results in Jupyter (outliers.display): every ``_repr_html_`` is well-formed, escaped, shows its headline
number with its interval as the commands print it, and caps long tables."""

from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_model

from outliers.analysis.sinks import attention_sinks
from outliers.analysis.stats import outlier_stats_html
from outliers.analysis.superweight_controls import ControlSettings
from outliers.analysis.superweight_effects import SuperWeightEffects
from outliers.analysis.superweight_verdicts import ControlRun, Verdict
from outliers.analysis.superweights import SuperWeight, SuperWeightResult
from outliers.display import fmt_interval, render_html
from outliers.eval.result import PerplexityResult

EVIL = "<script>alert('x')</script>"
VOID = {"br", "hr", "img", "meta", "link", "input", "col", "wbr"}


class _Balance(HTMLParser):
    """Fails on an end tag that closes anything but the innermost open element, and on any script."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        assert tag != "script", "unescaped <script>"
        self.tags.append(tag)
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:] or 'nothing'}"
        self.open.pop()


def well_formed(html: str) -> _Balance:
    assert isinstance(html, str) and html.startswith("<div")
    parser = _Balance()
    parser.feed(html)
    parser.close()
    assert parser.open == [], f"unclosed: {parser.open}"
    return parser


def ppl_result(**kw) -> PerplexityResult:
    fields = dict(
        ppl=12.3456,
        nll=2.5133,
        n_tokens=4000,
        n_windows=40,
        seconds=2.0,
        tokens_per_s=2048.0,
        protocol="chunks",
        window=100,
        stride=None,
        max_windows=None,
        batch_size=4,
        bos="corpus",
        model=EVIL,
        corpus="builtin",
        corpus_tokens=5000,
        dtype="float32",
        method="llm.int8",
        device="cpu",
        torch_threads=1,
        ppl_ci95=(12.1, 12.6),
        window_nll=[1.0] * 40,
        window_tokens=[100] * 40,
    )
    return PerplexityResult(**(fields | kw))


def with_reference(**kw) -> PerplexityResult:
    fields = dict(
        ref_dtype="float32",
        ref_ppl=12.2,
        delta_ppl_pct=1.234,
        delta_ppl_pct_ci95=(0.5, 2.0),
        kl_vs_ref=0.01234,
        kl_vs_ref_ci95=(0.011, 0.013),
        top1_agreement=0.98,
        top1_agreement_ci95=(0.97, 0.99),
        extra={"threshold": 6.0},
    )
    return ppl_result(**(fields | kw))


def test_perplexity_shows_its_intervals_as_the_cli_prints_them():
    html = with_reference()._repr_html_()
    well_formed(html)
    for text in ("12.3456", "[12.100, 12.600] 95 % CI over 40 windows", "+1.23 %", "[+0.50, +2.00] paired"):
        assert text in html
    assert "0.01234" in html and "[0.01100, 0.01300]" in html and "98.00 %" in html and "[97.00, 99.00]" in html
    assert "window 100" in html and "threshold 6 " in html and "method llm.int8" in html
    assert "rough" not in html  # 40 windows


def test_perplexity_without_reference_few_windows_and_nan_interval():
    html = ppl_result(n_windows=1, ppl_ci95=(float("nan"), float("nan")))._repr_html_()
    well_formed(html)
    assert "12.3456" in html and "nan" not in html and "vs reference" not in html
    assert "only 1 windows" in html and "rough" in html


def test_names_are_escaped():
    html = ppl_result()._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    frame = pd.DataFrame({EVIL: [EVIL]})
    html = render_html(EVIL, [(EVIL, EVIL, EVIL)], [(EVIL, EVIL)], tables=[(EVIL, frame)], notes=[EVIL])
    well_formed(html)
    assert (
        "<script>" not in html and html.count("&lt;script&gt;") == 10
    )  # title, row x3, setting x2, note, caption, column, cell


def test_long_frames_are_capped():
    frame = pd.DataFrame({"row": range(25), "x": np.linspace(0, 1, 25)})
    parser = well_formed(render_html("t", [], tables=[("cap", frame)], max_rows=10))
    assert parser.tags.count("tr") == 1 + 10  # the header and ten rows
    assert "… 15 more rows" in render_html("t", [], tables=[("cap", frame)], max_rows=10)
    assert "more row" not in render_html("t", [], tables=[("cap", frame.head(10))])
    assert "… 1 more row<" in render_html("t", [], tables=[("cap", frame.head(11))])


def test_fmt_interval():
    assert fmt_interval((0.5, 2.0), "+.2f") == "[+0.50, +2.00]" and fmt_interval((0.97, 0.99), ".2f", 100) == (
        "[97.00, 99.00]"
    )
    assert fmt_interval(None) == "" and fmt_interval((float("nan"), 1.0)) == "n/a (1 window)"


def test_sinks_show_the_rate_and_cap_the_heads():
    model = make_model("llama", layers=3)  # 12 heads
    ids = torch.randint(0, 384, (100,), generator=torch.Generator().manual_seed(0))
    meta = {"model": EVIL, "corpus": "c.txt", "weights": "seeded", "weights_sha256": "ab" * 32}
    res = attention_sinks(model, ids, window=16, max_windows=2, epsilon=0.2, progress=False, meta=meta)
    html = res._repr_html_()
    parser = well_formed(html)
    n_sink = int(res.heads.sink.sum())
    assert f"{res.sink_rate:.4f}" in html and f"{n_sink} of 12 heads score &gt; 0.2" in html
    assert "… 2 more rows" in html and parser.tags.count("tr") == 2 + 1 + 10  # rate and windows, the header, ten heads
    assert "<script>" not in html and "weights seeded" in html and "weights sha256 " + "ab" * 6 in html


def _weight(block=1, row=3, col=5):
    return SuperWeight(block, row, col, -0.75, -512.0, 40.0, row, row, True)


def test_super_weights_as_a_table_or_none_found_with_spikes():
    spikes = pd.DataFrame({"block": [0, 1], "out_max": [1.0, 60.0], "ratio": [1.0, 60.0]})
    found = SuperWeightResult((_weight(),), spikes, 50.0, "no block's output max reaches 50 x", 32, 2, {"model": EVIL})
    html = found._repr_html_()
    well_formed(html)
    assert "-512.000" in html and "-0.750" in html and "<script>" not in html and "jump 50" in html
    none = SuperWeightResult((), spikes, 50.0, "no block's output max reaches 50 x", 32, 2)._repr_html_()
    well_formed(none)
    assert "none found" in none and "60.000" in none


def test_super_weight_effects_show_four_perplexities_paired():
    zero = ppl_result(ppl=250.0, ppl_ci95=(200.0, 300.0), delta_ppl_pct=1925.0, delta_ppl_pct_ci95=(1800.0, 2100.0))
    effects = SuperWeightEffects(ppl_result(), zero, None, with_reference(), 7000, 0.5, 3)
    html = effects._repr_html_()
    well_formed(html)
    assert "250.0000" in html and "[200.000, 300.000]" in html and "+1925.00 % [+1800.00, +2100.00] paired" in html
    assert "7000 others zeroed" in html and "+1.23 %" in html and "<script>" not in html


def test_super_weight_effects_show_the_controls_the_fair_one_and_the_verdicts():
    zero = ppl_result(ppl=250.0, ppl_ci95=(200.0, 300.0), delta_ppl_pct=1925.0, delta_ppl_pct_ci95=(1800.0, 2100.0))
    seeds = tuple(with_reference(delta_ppl_pct=d) for d in (0.5, 1.234, 3.0))
    controls = (
        ControlRun("matched", 1, seeds[1], seeds, 0, f"band widened {EVIL}", 3.0),
        ControlRun("paper", 210, with_reference(delta_ppl_pct=55.5), (), 12, "", 1.0),
        ControlRun("outside_massive", 0, None, note="no massive dim"),
        ControlRun("largest_down_7000", 7000, with_reference(), (), 300, "", 1.0),
    )
    verdict = Verdict(_weight(), zero, True, 3.0, 100.0, "super_weight", "Δppl +1925.0 % >= 100 %")
    effects = SuperWeightEffects(
        ppl_result(),
        zero,
        None,
        controls[-1].result,
        7000,
        0.5,
        3,
        controls,
        (verdict,),
        ControlSettings(seeds=3),
        {"original": 2.0, "matched": 3.0, "total": 5.0},
        7,
    )
    html = effects._repr_html_()
    well_formed(html)
    assert "matched (fair)" in html and "+0.50 .. +3.00" in html and "+55.50" in html and "super_weight" in html
    assert "matched is the fair control" in html and "cost: 7 perplexity runs, 5 s" in html and "<script>" not in html
    d = effects.to_dict()
    assert [c["name"] for c in d["controls"]] == ["matched", "paper", "outside_massive", "largest_down_7000"]
    assert d["controls"][0]["spread"]["max"] == 3.0 and d["controls"][2]["ppl"] is None
    assert d["super_weights"][0]["verdict"] == "super_weight" and d["n_super_weights"] == 1


def test_outlier_stats_summary():
    from outliers.analysis.scan import scan

    model = make_model("llama")
    with torch.no_grad():  # dim 7 of every normed input (the hidden space) far above 6
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = layer.post_attention_layernorm.weight[7] = 1000.0
    ids = torch.randint(0, 384, (64,), generator=torch.Generator().manual_seed(0))
    stats = scan(model, ids, max_tokens=64, window=32, progress=False, meta={"model": EVIL})
    html = outlier_stats_html(stats)
    well_formed(html)
    assert "outlier dims</th><td" in html and "&lt;script&gt;" in html and "% positions" in html
    assert "|x| &gt;= 6 in &gt;= 25 % of layers and &gt;= 6 % of positions" in html
    assert "<td>7</td>" in html  # the outlier features table, dim 7 first


def test_study_summary(tmp_path, model_dir, text_file):
    from studies.config import parse_config
    from studies.report import summary
    from studies.runner import run_study
    from studies.store import Store

    study = {"name": "tiny", "models": [str(model_dir("llama")), "no-such-model"], "corpora": [str(text_file)]}
    study |= {"methods": ["absmax"], "thresholds": [6], "window": 32, "max_windows": 2, "batch_size": 2}
    cfg = parse_config({"study": study})
    assert run_study(cfg, tmp_path, progress=False) == {"done": 2, "failed": 2, "skipped": 0, "stale": 0}
    res = summary(tmp_path)
    html = res._repr_html_()
    well_formed(html)
    rows = Store(tmp_path).frame()
    fp32 = rows[(rows.method == "fp32") & (rows.status == "done")].ppl.iloc[0]
    assert f"{fp32:.3f}" in html and "Perplexity (Table-1 layout)" in html and "failed cells" in html
    assert "unknown model 'no-such-model'" in html and res.counts["failed"] == 2
    assert len(res.frame) == 2 and (res.frame.state == "done").all()


@pytest.mark.parametrize("n", [0, 3])
def test_render_html_rows_and_settings(n):
    html = render_html("t", [("a", 1.0, "x")] * n, [("model", "m"), ("stride", None), ("bos", "")])
    well_formed(html)
    assert html.count("<tr>") == n and "model m" in html and "stride" not in html and "bos" not in html


def test_weights_and_kv_channels_show_their_summaries():
    from outliers.analysis.kvcache import kv_channels
    from outliers.analysis.weights import weight_stats

    model = make_model("llama")
    w = weight_stats(model, meta={"model": "<b>tiny</b>"})._repr_html_()
    well_formed(w)
    assert "Weight outliers" in w and "&lt;b&gt;tiny" in w and "layers by kurtosis" in w
    ids = torch.randint(0, 384, (200,), generator=torch.Generator().manual_seed(0))
    kv = kv_channels(model, ids, window=32, max_windows=2, progress=False)._repr_html_()
    well_formed(kv)
    assert "Key and value channels" in kv and "keys_cached" in kv and "per channel" in kv
