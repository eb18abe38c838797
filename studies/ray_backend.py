"""Running cells on Ray: one actor per model, each a ``studies.worker.Worker`` holding one CPU.

Only the study's own process writes to SQLite: actors return results, and
``ray_results`` yields them as they finish. Without ``address`` a private
local cluster is started for the study and shut down after it. Ray reads its
authentication mode from the environment (``RAY_AUTH_MODE``), which library
code leaves alone: the ``studies`` command line sets it to ``disabled`` for a
private local cluster (``studies.cli``); other callers set it themselves.

Placement: each actor asks Ray for ``memory`` sized from its model
(``actor_request``): the float32 weight bytes, read from the files' headers or
config before anything loads (``outliers.models.size``), times
``MEMORY_FACTOR`` plus ``PROCESS_BYTES``. The factor 2.0 covers the float model
plus what a cell adds: a quantized copy's int8 codes (a quarter of the float
bytes), a transformed copy's own float weights for the linears it rescales,
and activations; the scale study measured 2.2x before quantized copies shared
the float tensors and targets 1.5x (``benchmarks/memory.py``). ``PROCESS_BYTES``
is the worker's Python, torch and Numba before any model (about 1 GiB). A
study's ``actor_memory_gib`` and ``actor_gpus`` replace the computed numbers.
A request that no node of the cluster can ever hold is refused before any
actor starts (Ray would otherwise leave it pending forever); one model per
actor holds on an existing cluster (``address``) as on a private one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from outliers.errors import InvalidArgumentError

from .config import StudyConfig

__all__ = ["ray_results", "ActorRequest", "actor_request", "check_schedulable", "MEMORY_FACTOR", "PROCESS_BYTES"]

MEMORY_FACTOR = 2.0  # x float32 weight bytes: the float model and one cell's copies and activations (see above)
PROCESS_BYTES = 2**30  # a worker's interpreter, torch and Numba before any model
GIB = 2**30


@dataclass(frozen=True)
class ActorRequest:
    """What one model's actor asks Ray for."""

    model: str
    weight_bytes: int  # float32 weights
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int = 0  # bytes

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``ActorClass.options``."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": self.memory}

    def __str__(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{self.num_cpus:g} CPU{gpus}, {self.memory / GIB:.1f} GiB memory"


def actor_request(
    model: str,
    weight_bytes: int,
    *,
    memory_gib: float | None = None,
    num_gpus: float | None = None,
    factor: float = MEMORY_FACTOR,
) -> ActorRequest:
    """Return the request for an actor holding ``model`` (``weight_bytes`` of float32 weights).

    ``memory_gib`` and ``num_gpus`` (a study's ``actor_memory_gib`` and
    ``actor_gpus``) replace the computed memory and the default of no GPU.

    Raises:
        InvalidArgumentError: a negative override or factor.
    """
    if factor <= 0 or (memory_gib is not None and memory_gib <= 0) or (num_gpus is not None and num_gpus < 0):
        raise InvalidArgumentError(
            f"actor placement for {model}: factor and memory must be > 0 and GPUs >= 0, "
            f"got factor {factor}, memory {memory_gib} GiB, {num_gpus} GPUs"
        )
    memory = int(memory_gib * GIB) if memory_gib is not None else int(factor * weight_bytes) + PROCESS_BYTES
    return ActorRequest(model, weight_bytes, num_gpus=float(num_gpus or 0.0), memory=memory)


def check_schedulable(requests: list[ActorRequest], nodes: list[dict[str, float]]) -> None:
    """Refuse a request no node can hold: Ray would keep such an actor pending forever.

    ``nodes`` holds each live node's total resources (``ray.nodes()``'s
    ``Resources``: ``CPU``, ``GPU``, ``memory`` in bytes). One node must hold a
    whole actor: the cluster's sum is not enough.

    Raises:
        InvalidArgumentError: naming the model, what it asks for and the largest node.
    """
    if not nodes:
        raise InvalidArgumentError("the Ray cluster has no live node")
    for r in requests:
        if any(
            n.get("CPU", 0) >= r.num_cpus and n.get("GPU", 0) >= r.num_gpus and n.get("memory", 0) >= r.memory
            for n in nodes
        ):
            continue
        big = max(nodes, key=lambda n: (n.get("memory", 0), n.get("GPU", 0)))
        raise InvalidArgumentError(
            f"model {r.model} ({r.weight_bytes / GIB:.2f} GiB of float32 weights) needs an actor with {r}, "
            f"but no node of the Ray cluster has that (the largest: {big.get('CPU', 0):g} CPU, "
            f"{big.get('GPU', 0):g} GPU, {big.get('memory', 0) / GIB:.1f} GiB memory); "
            "set actor_memory_gib / actor_gpus in the study or give the cluster more"
        )


def _requests(cfg: StudyConfig, models: list[str]) -> list[ActorRequest]:
    from outliers.models.size import float32_bytes

    return [
        actor_request(m, float32_bytes(m), memory_gib=cfg.actor_memory_gib, num_gpus=cfg.actor_gpus) for m in models
    ]


def ray_results(
    cfg: StudyConfig, todo: list[tuple[dict, str]], address: str | None
) -> Iterator[tuple[dict[str, Any], str, tuple[str, dict | None, str | None]]]:
    """Yield ``(cell, key, (status, result, error))`` as Ray actors (one per model) finish cells."""
    import ray

    from outliers.threads import thread_env

    from .measures import MEASURES
    from .worker import Worker

    groups: dict[str, list] = {}
    for cell, key in todo:
        groups.setdefault(cell["model"], []).append((cell, key))
    requests = _requests(cfg, list(groups))  # sized before Ray starts: a bad spec fails here
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        check_schedulable(requests, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        # an actor holds one CPU: one torch/MKL/Numba thread, and idle OpenMP threads sleep (outliers/threads.py)
        worker_cls: Any = ray.remote(num_cpus=1, runtime_env={"env_vars": thread_env(1)})(Worker)
        measures = {name: MEASURES[name] for name in cfg.measure}
        pending = {}
        for request, group in zip(requests, groups.values(), strict=True):
            actor = worker_cls.options(**request.options()).remote(cfg, measures)
            for cell, key in group:  # an actor runs its calls in order: the model loads once
                pending[actor.run.remote(cell)] = (cell, key, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell, key, _actor = pending.pop(ready[0])
            yield cell, key, ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
