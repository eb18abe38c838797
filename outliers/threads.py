"""Thread pools, set by entry points only: the CLIs, the tests' conftest, the notebooks' first cell, Ray workers.

Library code never calls this: how many threads a process may use is the
caller's decision, and the settings that matter most must be in place before
torch is imported.

What it fixes (measured on a 2-core machine shared with other jobs):

* torch runs its CPU ops in GNU OpenMP parallel regions. Between regions an
  idle OpenMP thread spins (``OMP_WAIT_POLICY`` unset: up to ~300,000 polls)
  and the thread that opens a region spins at its barrier for the others.
  When another job holds the cores, the thread being waited for is not
  running, the spinning ones burn the time slices it needs, and SmolLM2's
  forward passes ran 2.5-6x slower (perf: ~74% of the process's CPU samples
  inside libgomp's spin loops). ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep
  instead. libgomp reads it once, when torch loads it: it must be in the
  environment before ``import torch``. ``import outliers`` does not import
  torch (its API loads on first use), so the command lines call this first;
  it is also inherited by child processes (Jupyter kernels, Ray workers,
  subprocesses).
* Numba's ``omp`` threading layer shares torch's OpenMP runtime and sets the
  team size to ``NUMBA_NUM_THREADS`` (default: every CPU) on the calling
  thread, so a process limited to ``n`` torch threads silently went back to
  every CPU after its first int8 kernel. ``NUMBA_NUM_THREADS`` follows ``n``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["configure_threads", "thread_env"]


def thread_env(n: int | None = None) -> dict[str, str]:
    """Return the environment variables for a process that should use ``n`` threads (``None``: every CPU)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        env.update({k: str(int(n)) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    return env


def configure_threads(n: int | None = None) -> int | None:
    """Set up this process's thread pools (and its children's) for ``n`` threads; return the pool size.

    Call it at the top of an entry point, before torch is imported where that
    is possible. Without ``n`` the environment's own settings win, and the
    pool size stays the libraries' default, or ``OMP_NUM_THREADS`` when that
    is set (Numba then follows it too). With ``n`` (an explicit choice) the
    thread counts are overridden, and torch and Numba, if already imported,
    change at once. Returns the pool size in effect (``None``: every CPU).
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    size = int(n) if n is not None else (int(omp) if omp.isdigit() and int(omp) > 0 else None)
    for k, v in thread_env(size).items():
        if n is not None and k != "OMP_WAIT_POLICY":
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    torch = sys.modules.get("torch")
    if n is not None and torch is not None:
        torch.set_num_threads(size)
    numba = sys.modules.get("numba")
    if size is not None and numba is not None:
        numba.set_num_threads(min(size, numba.config.NUMBA_NUM_THREADS))
    return size
