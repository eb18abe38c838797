"""One self-contained HTML page (outliers.html_page): escaped, anchored, offline; its tables sort in a browser."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from browser_support import check_page
from matplotlib.figure import Figure as MplFigure

from outliers.display import render_html
from outliers.html_page import Bullets, Code, Figure, Html, Section, Table, inline, render_page, write_page


def _figure() -> MplFigure:
    fig = MplFigure(figsize=(4, 2.5))
    fig.subplots().plot([0, 1, 2], [1, 3, 2], marker="o")
    return fig


def _png(tmp_path) -> bytes:
    path = tmp_path / "f.png"
    _figure().savefig(path, format="png")
    return path.read_bytes()


FRAME = pd.DataFrame(
    {
        "layer": ["layer 10", "layer 2", "layer 1", "<b>", "layer 3"],
        "max |x|": [23_000.0, -1.5, math.nan, 0.25, np.float32(7.0)],
        "change": ["+1.7 % [+1.2, +2.3]", "−2.0 % [−2.5, −1.5]", "", "+10.0 %", "23,000"],
        "n": [3, 12, 1, 7, 5],
    }
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    sections = [
        Section("Numbers & <things>", ["A `code` span & <b>escaped</b>.", Table(FRAME, "per layer", ".2f")]),
        Section("Subsection", [Bullets(["one `a`", "two"]), Code('{"x": <1>}')], level=3),
        Section(
            "Figures",
            [
                Figure(_figure(), "a matplotlib figure", "from a Figure"),
                Figure(_png(tmp), "png bytes"),
                Figure(tmp / "f.png", "a png file"),
            ],
        ),
        Section("A result's own HTML", [Html(render_html("Result", [("ppl", 12.5)], tables=[("t", FRAME)]))]),
        Section("Figures", ["The same title again: its own anchor."], anchor="again"),
    ]
    path = write_page(
        tmp / "page.html",
        "A <page>",
        sections,
        summary=["One outlier feature (dim `247`) in 50 % of layers."],
        provenance=[("weights", "float32 from a 4-bit GGUF"), ("corpus", None), ("window", 512)],
        subtitle="sub & title",
    )
    return path


def test_everything_is_escaped_and_anchored(page):
    html = page.read_text()
    assert "<title>A &lt;page&gt;</title>" in html and "<h1>A &lt;page&gt;</h1>" in html
    assert "A <code>code</code> span &amp; &lt;b&gt;escaped&lt;/b&gt;." in html
    assert "<td>&lt;b&gt;</td>" in html and "<pre>{&quot;x&quot;: &lt;1&gt;}</pre>" in html
    assert "<li>one <code>a</code></li>" in html
    ids = re.findall(r'<h[23] id="([^"]+)"', html)
    assert ids == ["numbers-things", "subsection", "figures", "a-result-s-own-html", "again"]
    assert '<ul><li><a href="#subsection">Subsection</a></li></ul></li>' in html  # nested under its section
    assert html.count('src="data:image/png;base64,') == 3
    assert "corpus" not in html.split("<nav")[0] and '<th scope="row">window</th><td>512</td>' in html
    assert 'data-v="23000.0">23000.00</td>' in html and 'data-v="7.0">7.00</td>' in html and "<td></td>" in html
    assert "http" not in html.replace("http-equiv", "")  # nothing to fetch


def test_inline_and_bad_anchors():
    assert inline("a `<b>` c") == "a <code>&lt;b&gt;</code> c"
    assert inline("odd ` tick <") == "odd ` tick &lt;"
    with pytest.raises(ValueError, match="anchor 'top'"):
        render_page("t", [Section("x", anchor="top")])
    with pytest.raises(ValueError, match="anchor '1x'"):
        render_page("t", [Section("x", anchor="1x")])
    with pytest.raises(ValueError, match="anchor 'a'"):
        render_page("t", [Section("x", anchor="a"), Section("y", anchor="a")])
    assert 'id="s-2024"' in render_page("t", [Section("2024")])


def test_the_page_in_a_browser(page, browser, tmp_path):
    seen = check_page(browser, page, tmp_path / "page.png", headings=["A <page>", "Numbers & <things>", "Subsection"])
    assert seen["images"] == 3 and seen["tables"] == 2  # ours and the result's own DataFrame table
    assert seen["sorted"][0]["column"] == 1 and seen["sorted"][0]["numeric"]  # the first column of numbers

    from selenium.webdriver.common.by import By

    table = browser.find_elements(By.CSS_SELECTOR, "table.sortable")[0]
    column = "return Array.from(arguments[0].tBodies[0].rows, r => r.cells[arguments[1]].textContent);"
    header = table.find_elements(By.CSS_SELECTOR, "thead th")
    header[0].click()  # text, with the numbers inside compared as numbers
    assert browser.execute_script(column, table, 0)[1:] == ["layer 1", "layer 2", "layer 3", "layer 10"]
    header[1].click()  # numbers as numbers, the blank last
    assert browser.execute_script(column, table, 1) == ["-1.50", "0.25", "7.00", "23000.00", ""]
    header[1].click()
    assert browser.execute_script(column, table, 1) == ["23000.00", "7.00", "0.25", "-1.50", ""]
    header[2].click()  # by the number a cell starts with: a minus sign, a thousands comma
    assert browser.execute_script(column, table, 2)[:2] == ["−2.0 % [−2.5, −1.5]", "+1.7 % [+1.2, +2.3]"]
    assert browser.execute_script(column, table, 2)[3:] == ["23,000", ""]
    assert header[2].get_attribute("aria-sort") == "ascending" and header[1].get_attribute("aria-sort") is None
