"""Execute every notebook top to bottom on small settings; a failing cell fails the suite."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip(
    "nbclient", reason="the notebooks extra is not installed (pip install -e '.[notebooks]')"
)
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.integration


def test_the_notebooks_exist_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_outlier_features",
        "02_llm_int8_walkthrough",
        "03_threshold_ablation",
        "04_scale_study",
        "05_beyond_llm_int8",
        "06_where_it_breaks",
        "07_formats_tokens_cache",
        "08_lifecycle",
    ]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("OUTLIERS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("OUTLIERS_NOTEBOOK_STUDY", str(tmp_path / "study"))
    monkeypatch.setenv("OUTLIERS_NOTEBOOK_SCALE", str(tmp_path / "scale"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    images = sum(
        1 for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    )
    assert images >= 1, "every notebook shows at least one figure"
    # the documentation site renders the executed copy (mkdocs-jupyter, execute: false); the repository keeps
    # the notebook without outputs
    site = Path(__file__).resolve().parents[2] / "docs" / "notebooks"
    site.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, str(site / path.name))
