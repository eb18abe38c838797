"""The stage order's import contracts (pyproject.toml [tool.importlinter]) hold, and fail on a cycle or an
upward import built on purpose in a copy of the packages."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def copy(tmp_path):
    """The three packages and the contracts, copied: edits here never touch the repository."""
    for pkg in ("outliers", "studies", "cuda_kernels"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_repository_keeps_every_contract():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    "where, line, broken",
    [
        # a stage importing one after it: quantization reading the analysis
        ("outliers/quant/int8.py", "import outliers.analysis.stats\n", "stages in pipeline order"),
        # a cycle inside one stage: the criteria importing stats back at run time (stats imports criteria)
        ("outliers/analysis/fields.py", "import outliers.analysis.criteria\n", "no import cycles"),
        # the toolkit reaching into the studies built on it
        ("outliers/eval/windows.py", "import studies.store\n", "outliers never imports studies"),
        # the kernels package importing the toolkit
        ("cuda_kernels/errors.py", "import outliers.errors\n", "cuda_kernels stands alone"),
    ],
    ids=["upward", "cycle", "studies", "kernels"],
)
def test_a_broken_contract_fails(copy, where, line, broken):
    path = copy / where
    path.write_text(path.read_text() + "\n" + line)
    out = _lint(copy)
    assert out.returncode != 0
    verdicts = [line for line in out.stdout.splitlines() if line.endswith(("KEPT", "BROKEN"))]
    assert [v for v in verdicts if "BROKEN" in v and broken in v], out.stdout
