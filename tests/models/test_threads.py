"""outliers.threads: the environment entry points set, and torch and Numba agreeing on a pool size."""

import os
import subprocess
import sys

import pytest

from outliers.threads import configure_threads, thread_env

THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def test_thread_env():
    assert thread_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_env(3) == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "NUMBA_NUM_THREADS": "3",
    }
    with pytest.raises(ValueError):
        thread_env(0)


def test_the_environment_wins_without_n(monkeypatch):
    for k in THREAD_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert configure_threads() is None
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "NUMBA_NUM_THREADS" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what Ray gives a one-CPU actor: Numba must follow it
    monkeypatch.setitem(sys.modules, "numba", None)  # not imported yet: only the environment changes
    assert configure_threads() == 2
    assert os.environ["NUMBA_NUM_THREADS"] == "2" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def _child(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()[-1]


# Numba's 'omp' layer shares torch's OpenMP runtime and used to reset its team to every CPU.
AFTER_KERNEL = (
    "import torch; from outliers.quant.cpu_kernels import quantize_rows; "
    "quantize_rows(torch.randn(64, 32), 6.0); print(torch.get_num_threads())"
)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to tell 1 thread from every CPU")
def test_torch_keeps_n_threads_after_a_numba_kernel():
    assert _child(f"from outliers.threads import configure_threads; configure_threads(1); {AFTER_KERNEL}") == "1"
    assert (
        _child(
            f"from outliers.threads import configure_threads; configure_threads(); {AFTER_KERNEL}", OMP_NUM_THREADS="1"
        )
        == "1"
    )


def test_the_command_lines_start_without_torch():
    """Entry points set OMP_WAIT_POLICY before torch loads OpenMP; import outliers must not load torch."""
    import subprocess
    import sys

    code = (
        "import sys, outliers, outliers.cli, studies.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'; outliers.__version__"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_lazy_api_names_stay_functions_after_their_modules_load():
    """outliers.perplexity / outliers.scan are the functions, also after the modules that hold them loaded."""
    import subprocess
    import sys

    code = (
        "import outliers.eval.perplexity, outliers.analysis.scan, outliers; from outliers import perplexity, scan; "
        "assert callable(perplexity) and callable(scan) and callable(outliers.perplexity)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
