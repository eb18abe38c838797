"""Every kernel builds for real GPUs (sm_80, sm_90), checked on CPU.

The simulator skips Numba's CUDA type checks; ``python -m cuda_kernels.check`` compiles
and links each kernel as numba-cuda would at first launch, no GPU needed. It needs the
``cuda`` extra (numba-cuda and the CUDA 12 toolkit wheels), which CI installs. It builds
``PRODUCTION_TILES``, the tiling a GPU runs.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_kernels
from cuda_kernels import PRODUCTION_TILES
from cuda_kernels.check import MISSING


def test_every_kernel_builds_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run(
        [sys.executable, "-m", "cuda_kernels.check", "--cc", "8.0", "9.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode == MISSING:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all kernels built for sm_80, sm_90" in r.stdout
    assert f"building {PRODUCTION_TILES}" in r.stdout
    mma = re.findall(r"int8_gemm_mma_kernel.*: (\d+) registers, (\d+) B stack", r.stdout)
    assert len(mma) == 6  # 2 architectures x float32/float16/bfloat16 outputs
    # the accumulators stay in registers (a regression to local memory costs a GPU run to notice)
    assert all(int(stack) == 0 for _, stack in mma), r.stdout


def test_cuda_kernels_imports_nothing_from_outliers():
    # the package stands alone (numba, numpy, torch): usable, and testable, apart from the toolkit
    for path in sorted(Path(cuda_kernels.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not [n for n in names if n.split(".")[0] in ("outliers", "studies")], (path.name, names)
