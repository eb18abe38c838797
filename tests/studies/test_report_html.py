"""``studies report`` writes ``report.html`` beside ``report.md``, from the same tables and figures: one
self-contained page with a table of contents and sortable tables, checked in a real browser."""

import re
from html import unescape

import pytest
from browser_support import check_page

from studies.config import parse_config
from studies.report import write_report
from studies.runner import run_study


@pytest.fixture(scope="module")
def report(tmp_path_factory, model_dir, text_file):
    """A small study's folder after ``studies report``: perplexity at two thresholds, the scan, sinks, weights."""
    cfg = parse_config(
        {
            "study": {
                "name": "tiny",
                "description": "A <tiny> study & its `report.html`",
                "models": [str(model_dir("llama"))],
                "corpora": [str(text_file)],
                "methods": ["llm.int8", "absmax"],
                "thresholds": [0, 6],
                "measure": ["perplexity", "outliers", "sinks", "weights"],
                "window": 32,
                "max_windows": 2,
                "batch_size": 2,
                "outlier_tokens": 64,
            }
        }
    )
    out = tmp_path_factory.mktemp("report-html")
    assert run_study(cfg, out, progress=False)["failed"] == 0
    write_report(out)
    return out


def _md_headings(text: str) -> list[str]:
    return re.findall(r"^#{2,3} (.+)$", text, re.M)


def test_the_page_holds_the_reports_sections_tables_and_figures(report):
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for heading in _md_headings(md):
        assert re.search(rf'<h[23] id="[\w-]+">{re.escape(heading)}</h[23]>', unescape(html)), heading
        assert f">{heading}</a>" in unescape(html)  # in the table of contents
    n_tables = len(re.findall(r"^\|---", md, re.M))
    assert html.count('<table class="sortable">') == n_tables > 3
    figures = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", md)
    assert figures and html.count('src="data:image/png;base64,') == len(figures)
    assert "&lt;tiny&gt; study &amp; its <code>report.html</code>" in html  # escaped, code spans kept
    assert "<tiny>" not in html and "http://" not in html and "https://" not in html
    assert "weights of " in html and "computed by" in html  # the provenance in the page's header
    assert '<pre>{\n "study"' in unescape(html)  # the settings, as report.md shows them


def test_the_report_opens_in_a_browser(report, browser, tmp_path):
    headings = ["Study: tiny", *_md_headings((report / "report.md").read_text())]
    seen = check_page(browser, report / "report.html", tmp_path / "report.png", headings=headings)
    assert seen["images"] >= 1 and seen["tables"] > 3
    assert any(s and s["numeric"] for s in seen["sorted"])  # a numeric column sorted as numbers
    assert seen["size"][0] == 1280 and seen["size"][1] > 1500  # the whole page, at a laptop's width
