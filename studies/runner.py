"""Run a study's grid: plan it, compute every cell not done, store each cell as it finishes.

``studies.planning`` expands the grid and says which cells are done;
``studies.worker`` computes cells (in this process, or on Ray through
``studies.ray_backend``); ``studies.store`` commits each row in its own
transaction. Cells are grouped by model, then corpus, so each model loads
once and each corpus is tokenized once per model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .config import StudyConfig, write_study
from .planning import (
    STATES,
    Fingerprints,
    PlannedCell,
    cell_key,
    cells,
    check_reachable,
    code_commit,
    expand_models,
    plan,
    version,
)
from .store import Store

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["cells", "cell_key", "run_study", "expand_models", "Fingerprints", "plan", "PlannedCell", "STATES"]


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    *,
    progress: bool = True,
    backend: str = "local",
    address: str | None = None,
    recompute_older: bool = False,
    on_cell: Callable[[dict, str], None] | None = None,
    kinds: Collection[str] | None = None,
    worker: Worker | None = None,
    desc: str | None = None,
) -> dict[str, int]:
    """Run every cell that is not done; return counts of ``done``, ``failed``, ``skipped`` and ``stale`` cells.

    Cells done with the same fingerprint are skipped (``skipped``), also when
    another commit computed them, unless ``recompute_older``. Stale cells (their
    inputs changed) are recomputed and counted in ``stale`` as well as in
    ``done``/``failed``. ``backend="local"`` runs in this process; ``"ray"``
    runs one Ray actor per model (on a local cluster started on demand, or the
    one at ``address``; Ray reads ``RAY_AUTH_MODE`` from the environment); either
    way only this process writes to SQLite, one transaction per cell. A cell
    that raises (a model that will not load, NaN perplexity, out of memory) is
    stored as ``failed`` with its error, and the study goes on.

    ``kinds``: run only the cells of these measures (the rest of the grid is left as it stands; the counts
    are of these cells). ``worker``: compute with this ``Worker`` (local backend), which keeps its loaded
    model across calls (``studies.profile`` runs one section at a time). ``desc``: the progress bar's label
    (default: the study's name); the bar shows only when there is a cell to compute.
    """
    from .measures import MEASURES, split_result

    if backend not in ("local", "ray"):
        from outliers.errors import InvalidArgumentError

        raise InvalidArgumentError(f"backend must be 'local' or 'ray', got {backend!r}")
    check_reachable(cfg)  # a hub model out of reach stops the study before any cell, not once per cell
    store = Store(out)
    write_study(cfg, out)
    commit = code_commit()
    fingerprints = Fingerprints(cfg)
    planned = plan(cfg, store, fingerprints, commit)
    if kinds is not None:
        planned = [p for p in planned if p.cell["kind"] in kinds]
    skip = {"done", "older"} if not recompute_older else {"done"}
    todo = [p for p in planned if p.state not in skip]
    counts = {
        "done": 0,
        "failed": 0,
        "skipped": len(planned) - len(todo),
        "stale": sum(p.state == "stale" for p in todo),
    }
    bar = tqdm(total=len(todo), desc=desc or cfg.name, unit="cell", disable=not progress or not todo)
    pairs = [(p.cell, p.key) for p in todo]
    fps = {p.key: p.fingerprint for p in todo}
    results: Iterator[tuple[dict[str, Any], str, tuple[str, dict[str, Any] | None, str | None]]]
    if backend == "local":
        from .worker import Worker

        local = worker or Worker(cfg, progress=progress)
        results = ((cell, key, local.run(cell)) for cell, key in pairs)
    else:
        from .ray_backend import ray_results

        results = ray_results(cfg, pairs, address)
    try:
        for cell, key, (status, result, error) in results:
            result = dict(result or {})
            provenance = result.pop("provenance", None)
            result, columns = split_result(MEASURES[cell["kind"]], result)
            fp = fps[key]
            if fp is None and status == "done":  # a hub model fetched by this run: now it has an identity
                fingerprints.weights.pop(cell["model"], None)
                fp = fingerprints(cell)
            store.record(
                key,
                fp,
                cell,
                status,
                result,
                error=error,
                version=version(),
                commit=commit,
                provenance=provenance,
                columns=columns,
            )
            counts[status] += 1
            if on_cell:
                on_cell(cell, status)
            bar.update(1)
    finally:
        bar.close()
        store.close()
    return counts
