"""Running cells on Ray: one actor per model, each a ``studies.worker.Worker`` holding one CPU.

Only the study's own process writes to SQLite: actors return results, and
``ray_results`` yields them as they finish. Without ``address`` a private
local cluster is started for the study and shut down after it. Ray reads its
authentication mode from the environment (``RAY_AUTH_MODE``), which library
code leaves alone: the ``studies`` command line sets it to ``disabled`` for a
private local cluster (``studies.cli``); other callers set it themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .config import StudyConfig

__all__ = ["ray_results"]


def ray_results(
    cfg: StudyConfig, todo: list[tuple[dict, str]], address: str | None
) -> Iterator[tuple[dict[str, Any], str, tuple[str, dict | None, str | None]]]:
    """Yield ``(cell, key, (status, result, error))`` as Ray actors (one per model) finish cells."""
    import ray

    from outliers.threads import thread_env

    from .measures import MEASURES
    from .worker import Worker

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        # an actor holds one CPU: one torch/MKL/Numba thread, and idle OpenMP threads sleep (outliers/threads.py)
        worker_cls: Any = ray.remote(num_cpus=1, runtime_env={"env_vars": thread_env(1)})(Worker)
        measures = {name: MEASURES[name] for name in cfg.measure}
        groups: dict[str, list] = {}
        for cell, key in todo:
            groups.setdefault(cell["model"], []).append((cell, key))
        pending = {}
        for group in groups.values():
            actor = worker_cls.remote(cfg, measures)
            for cell, key in group:  # an actor runs its calls in order: the model loads once
                pending[actor.run.remote(cell)] = (cell, key, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell, key, _actor = pending.pop(ready[0])
            yield cell, key, ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
