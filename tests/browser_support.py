"""A page in a real browser: headless Chromium from the system packages, driven with Selenium.

``browser_missing()`` says why no browser can run here (None: one can); the ``browser`` fixture
(tests/conftest.py, one per test module) skips with that reason. ``check_page(driver, page, screenshot)``
opens a self-contained HTML page (``outliers.html_page``) and asserts what every such page must do:
no console errors, nothing fetched from outside the file, every image loaded, every contents link
landing on a heading, every table sorting by a header click, and a full-page screenshot that is a real
picture. It returns what it saw, for a test's own checks (its headings, say).

Chromium and chromedriver come from Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them); Playwright's own browser download cannot work offline. Set ``OUTLIERS_REQUIRE_BROWSER=1`` (CI does)
to fail instead of skipping where they are absent.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH = 1280  # a laptop's width, in CSS pixels
MAX_HEIGHT = 30_000  # screenshot height cap: Chromium draws no taller surface


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; it is in the dev extra)"
    if not CHROMEDRIVER.exists():
        return f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (apt-get install chromium)"
    return None


def start_browser() -> Any:
    """A headless Chromium at a laptop's width, logging the console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},900")
    options.add_argument("--force-device-scale-factor=1")
    options.add_argument("--hide-scrollbars")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


# what the page holds, read in one script each (a WebDriver call per element is slow)
_IMAGES = "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
_HEADINGS = "return Array.from(document.querySelectorAll('h1,h2,h3')).map(h => [h.tagName, h.id, h.textContent]);"
_LINKS = """return Array.from(document.querySelectorAll('nav.toc a')).map(a => a.getAttribute('href'))
  .filter(h => !document.getElementById(h.slice(1)));"""
_OUTSIDE = """return Array.from(document.querySelectorAll('[src],[href]'))
  .map(e => e.getAttribute('src') ?? e.getAttribute('href'))
  .filter(u => !u.startsWith('data:') && !u.startsWith('#'));"""
_TABLES = "return document.querySelectorAll('table.sortable').length;"
# a table's column: each cell's sort text (data-v or text) and the number it starts with (null: none)
_COLUMN = """const t = document.querySelectorAll('table.sortable')[arguments[0]];
return Array.from(t.tBodies[0].rows).map(r => {
  const c = r.cells[arguments[1]], s = c ? (c.dataset.v ?? c.textContent).trim() : '';
  const n = parseFloat(s.replace('\\u2212', '-').replace(/(\\d),(?=\\d{3}(\\D|$))/g, '$1'));  // as the page reads it
  return [s, isNaN(n) ? null : n, r.textContent];
});"""
_WIDTHS = "const t = document.querySelectorAll('table.sortable')[arguments[0]]; return t.tHead.rows[0].cells.length;"


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _ordered(values: Sequence[Any], up: bool) -> bool:
    pairs = list(zip(values, values[1:], strict=False))
    return all(a <= b for a, b in pairs) if up else all(a >= b for a, b in pairs)


def _check_sort(driver, index: int) -> dict[str, Any] | None:
    """Click the header of the table's first column with two different values, twice; check the order.

    A column of numbers must come out ascending, then descending, blanks last both times; any other
    column must come out reversed by the second click (where its values differ) and keep its rows.
    Returns what was clicked (None: no column has two different values).
    """
    from selenium.webdriver.common.by import By

    n_cols = driver.execute_script(_WIDTHS, index)
    columns = [driver.execute_script(_COLUMN, index, i) for i in range(n_cols)]
    candidates = [i for i, col in enumerate(columns) if len({s for s, _, _ in col if s}) > 1]
    if not candidates:
        return None
    numeric = [i for i in candidates if all(n is not None for s, n, _ in columns[i] if s)]
    col = (numeric or candidates)[0]
    before = columns[col]
    header = driver.find_elements(By.CSS_SELECTOR, "table.sortable")[index].find_elements(By.CSS_SELECTOR, "thead th")
    header[col].click()
    up = driver.execute_script(_COLUMN, index, col)
    header[col].click()
    down = driver.execute_script(_COLUMN, index, col)
    rows = sorted(r for _, _, r in before)
    assert sorted(r for _, _, r in up) == rows == sorted(r for _, _, r in down), f"table {index}: rows changed"
    for order, is_up in ((up, True), (down, False)):
        filled = [s for s, _, _ in order if s]
        assert all(s for s, _, _ in order[: len(filled)]), f"table {index}: a blank cell before a filled one"
        if col in numeric:
            numbers = [n for s, n, _ in order if s]
            assert _ordered(numbers, is_up), f"table {index} column {col}: not sorted ({numbers})"
    if col not in numeric and len({s for s, _, _ in before if s}) == len([s for s, _, _ in before if s]):
        assert [s for s, _, _ in up if s] == [s for s, _, _ in down if s][::-1], f"table {index}: not reversed"
    return {"column": col, "numeric": col in numeric, "ascending": [s for s, _, _ in up]}


def _pixels(path: Path) -> tuple[int, int, float]:
    """Width, height and the standard deviation of the screenshot's grey levels (0 for a blank picture)."""
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        grey = image.convert("L")
        return image.width, image.height, float(ImageStat.Stat(grey).stddev[0])


def check_page(
    driver,
    page: str | os.PathLike,
    screenshot: str | os.PathLike,
    *,
    headings: Sequence[str] = (),
    min_screenshot_bytes: int = 20_000,
) -> dict[str, Any]:
    """Open ``page`` and assert what every self-contained page must do; save a full-page screenshot.

    Asserts: no SEVERE console entry (a script error, a blocked load); no ``src``/``href`` outside the file
    but data URIs and anchors; every image loaded (natural width > 0); every contents link lands on an
    element; each of ``headings`` is the text of an h1/h2/h3; each sortable table with two different
    values in a column sorts by a click on its header (``_check_sort``); the screenshot (the window as
    tall as the document, ``WIDTH`` wide) is over ``min_screenshot_bytes`` and not blank; the page prints to
    a PDF (saved beside the screenshot).

    Returns ``{"headings": [(tag, id, text)], "images": n, "tables": n, "sorted": [per table],
    "screenshot": Path, "screenshot_bytes": n, "size": (w, h), "grey_std": float, "page_bytes": n,
    "pdf": Path}``.
    """
    page, screenshot = Path(page).resolve(), Path(screenshot)
    driver.set_window_size(WIDTH, 900)
    driver.get(page.as_uri())
    errors = _severe(driver)
    assert not errors, f"console errors on {page.name}: {errors}"
    outside = driver.execute_script(_OUTSIDE)
    assert not outside, f"{page.name} refers outside itself: {outside}"
    images = driver.execute_script(_IMAGES)
    broken = [alt for alt, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images not loaded on {page.name}: {broken}"
    found = [tuple(h) for h in driver.execute_script(_HEADINGS)]
    texts = {text.strip() for _, _, text in found}
    missing = [h for h in headings if h not in texts]
    assert not missing, f"headings missing on {page.name}: {missing} (it has {sorted(texts)})"
    dangling = driver.execute_script(_LINKS)
    assert not dangling, f"contents links to nothing on {page.name}: {dangling}"
    n_tables = driver.execute_script(_TABLES)
    sorted_ = [_check_sort(driver, i) for i in range(n_tables)]
    errors = _severe(driver)
    assert not errors, f"console errors after sorting on {page.name}: {errors}"

    driver.execute_script("window.scrollTo(0, 0);")
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(WIDTH, min(int(height), MAX_HEIGHT))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot)), f"no screenshot of {page.name}"
    driver.set_window_size(WIDTH, 900)
    pdf = screenshot.with_suffix(".pdf")
    pdf.write_bytes(base64.b64decode(driver.print_page()))  # as a reader's "print to PDF" makes it
    pdf_bytes = pdf.read_bytes()
    assert pdf_bytes.startswith(b"%PDF") and len(pdf_bytes) > 10_000, f"{page.name} printed to {len(pdf_bytes)} bytes"
    size = screenshot.stat().st_size
    width, tall, std = _pixels(screenshot)
    assert size > min_screenshot_bytes, f"screenshot {screenshot} is {size} bytes: blank?"
    assert std > 5 and not math.isnan(std), f"screenshot {screenshot} is blank (grey std {std:.2f})"
    return {
        "headings": found,
        "images": len(images),
        "tables": n_tables,
        "sorted": sorted_,
        "screenshot": screenshot,
        "screenshot_bytes": size,
        "size": (width, tall),
        "grey_std": std,
        "page_bytes": page.stat().st_size,
        "pdf": pdf,
    }
