"""``outliers profile`` on a tiny in-process model: one self-contained page, checked in a real browser, made from
the cells of a study that resumes: a rerun computes nothing, an interrupted run finishes only what is missing,
and a section added computes only that section."""

import json
import re
from html import unescape

import pytest
from browser_support import check_page

from studies.measures import MEASURES
from studies.profile import SECTIONS, chosen_sections, profile_config, run_profile
from studies.store import Store

# every measure on 2 windows of 32 tokens: seconds on a 2-core CPU
TINY = {
    "window": 32,
    "batch_size": 2,
    "max_windows": 2,
    "outlier_tokens": 64,
    "sink_windows": 2,
    "superweight_windows": 2,
    "superweight_seeds": 2,
    "superweight_control_k": 16,
    "kvcache_windows": 2,
    "range_windows": 1,
    "sensitivity_windows": 2,
    "lifecycle_windows": 2,
}


def _config(model_dir, text_file, sections=None):
    return profile_config(str(model_dir("llama")), str(text_file), quick=True, sections=sections, settings=TINY)


@pytest.fixture(scope="module")
def profile(tmp_path_factory, model_dir, text_file):
    out = tmp_path_factory.mktemp("profile")
    lines: list[str] = []
    page, costs = run_profile(
        _config(model_dir, text_file), out, progress=False, echo=lines.append, command="outliers profile --tiny"
    )
    return out, page, costs, lines


def test_the_page_holds_every_section_made_from_the_analyses(profile):
    out, page, costs, lines = profile
    html = unescape(page.read_text())
    assert page == out / "index.html" and page.stat().st_size < 5_000_000
    for s in SECTIONS:
        assert re.search(rf'<h[23] id="{s.key}">{re.escape(s.title)}</h[23]>', html), s.title
    assert "Unavailable" not in html and "Not computed yet" not in html
    # the analyses' own tables (_repr_html_) and figures, embedded
    for own in ("Outlier statistics", "Attention sinks ·", "Weight outliers ·", "Sensitivity ·"):
        assert own in html, own
    assert html.count('src="data:image/png;base64,') >= 12 and "http://" not in html and "https://" not in html
    # what every number was measured on, and the provenance in the header
    assert "Measured on 2 windows of 32 tokens" in html and "(64 tokens)" in html
    for fact in ("weights SHA-256", "corpus SHA-256", "computed by", "outliers profile --tiny"):
        assert fact in html, fact
    summary = html.split('id="summary"')[1].split("</div>")[0]
    assert "outlier feature" in summary and "Attention sinks:" in summary and "Perplexity against fp32" in summary
    # one line per section with its cost, every cell computed once
    assert len(lines) == len(SECTIONS) and all("s wall" in x or "same cells" in x for x in lines)
    assert {c.key: c.computed for c in costs}["table1"] == 4 and not any(c.failed for c in costs)
    data = json.loads((out / "profile.json").read_text())
    assert set(data["sections"]) == {s.key for s in SECTIONS} and data["summary"]
    scan = data["sections"]["features"]["cells"][0]["result"]
    assert scan["measured_on"]["tokens"] == 64 and "html" not in scan and "figures" not in scan


def test_the_page_opens_in_a_browser(profile, browser, tmp_path):
    out, page, _, _ = profile
    headings = [f"Outlier profile: {profile_config_model(out)}", *(s.title for s in SECTIONS), "How this page was made"]
    seen = check_page(browser, page, tmp_path / "profile.png", headings=headings)
    assert seen["images"] >= 12 and seen["tables"] >= 15
    assert any(s and s["numeric"] for s in seen["sorted"])


def profile_config_model(out):
    return json.loads((out / "study.json").read_text())["study"]["models"][0]


def test_a_rerun_computes_nothing(profile, model_dir, text_file):
    out, _, _, _ = profile
    before = Store(out).frame().set_index("key").finished_at
    _, costs = run_profile(_config(model_dir, text_file), out, progress=False, echo=None)
    assert sum(c.computed for c in costs) == 0 and {c.key: c.stored for c in costs}["table1"] == 4
    assert Store(out).frame().set_index("key").finished_at.equals(before)


def test_an_interrupted_profile_resumes_and_a_section_added_computes_only_itself(
    tmp_path, model_dir, text_file, monkeypatch
):
    out = tmp_path / "p"
    sinks = MEASURES["profile_sinks"]

    def interrupted(cell, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(MEASURES, "profile_sinks", type(sinks)(**{**sinks.__dict__, "compute": interrupted}))
    cfg = _config(model_dir, text_file, ["weights", "sinks"])
    with pytest.raises(KeyboardInterrupt):
        run_profile(cfg, out, progress=False, echo=None)
    assert list(Store(out).frame().kind) == ["profile_facts"]  # the section before the interruption is kept
    monkeypatch.setitem(MEASURES, "profile_sinks", sinks)
    _, costs = run_profile(cfg, out, progress=False, echo=None)
    assert {c.key: (c.computed, c.stored) for c in costs} == {"facts": (0, 1), "sinks": (1, 0), "weights": (1, 0)}
    kept = Store(out).frame().set_index("kind").finished_at
    _, costs = run_profile(
        _config(model_dir, text_file, ["weights", "sinks", "kvcache"]), out, progress=False, echo=None
    )
    assert {c.key: c.computed for c in costs} == {"facts": 0, "sinks": 0, "weights": 0, "kvcache": 1}
    after = Store(out).frame().set_index("kind").finished_at
    assert all(after[k] == t for k, t in kept.items())  # nothing recomputed
    html = (out / "index.html").read_text()
    assert 'id="kvcache"' in html and 'id="table1"' not in html


def test_a_section_that_cannot_run_says_why(tmp_path, model_dir, text_file, monkeypatch):
    sinks = MEASURES["profile_sinks"]

    def broken(cell, ctx):
        raise RuntimeError("no attention weights here")

    monkeypatch.setitem(MEASURES, "profile_sinks", type(sinks)(**{**sinks.__dict__, "compute": broken}))
    monkeypatch.delitem(MEASURES, "lifecycle")  # as in a version without the lifecycle trace
    names = ["sinks", "lifecycle"]
    cfg = _config(model_dir, text_file, names)
    page, costs = run_profile(cfg, tmp_path / "p", sections=chosen_sections(names), progress=False, echo=None)
    html = unescape(page.read_text())
    assert "Unavailable for this model: the analysis could not run (RuntimeError: no attention weights here)" in html
    assert "this version of outliers has no `lifecycle` measure" in html.replace("<code>", "`").replace("</code>", "`")
    assert {c.key: c.available for c in costs}["lifecycle"] is False


def test_outliers_profile_is_a_command_of_both_command_lines(tmp_path, capsys):
    from outliers.cli import build_parser, main
    from studies.cli import build_parser as studies_parser

    for parser in (build_parser(), studies_parser()):
        args = parser.parse_args(["profile", "--model", "smollm2-135m", "--quick", "--sections", "sinks,table1"])
        assert args.quick and args.sections == "sinks,table1" and callable(args.func)
    assert main(["profile", "--model", "no-such-model", "--out", str(tmp_path / "p")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["profile", "--model", "smollm2-135m", "--sections", "sinks,nope"]) == 2
    assert "unknown profile section(s) ['nope']" in capsys.readouterr().err
