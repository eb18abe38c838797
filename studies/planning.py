"""A study's grid and what the store already holds of it: cells, their identities and their states.

The grid: per model (``"installed"`` expanded), per corpus, the cells of
each measure the study takes (``studies.measures``, in registration order).
Each cell has two identities: its place in the grid (``cell_key``) and the
fingerprint of its inputs (``Fingerprints``): the weights' and the corpus'
hashes, dtype, device, the settings its measure says can change its numbers,
and the package version. ``plan`` compares the store with the grid: a cell
is ``done``, ``stale`` (its inputs changed since it was computed), ``failed``
or ``pending``; a done cell computed by another git commit is flagged
``older`` and redone only on request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outliers.fingerprint import digest, git_commit

from .config import StudyConfig

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "cells",
    "cell_key",
    "check_reachable",
    "expand_models",
    "Fingerprints",
    "plan",
    "PlannedCell",
    "STATES",
    "code_commit",
    "version",
]

STATES = ("done", "older", "stale", "failed", "pending")


def version() -> str:
    """The package version, part of every fingerprint."""
    from outliers import __version__

    return __version__


def code_commit() -> tuple[str | None, bool]:
    """The git commit (and whether the checkout is dirty) whose cells count as ``done``, not ``older``."""
    return git_commit()


def expand_models(models: tuple[str, ...]) -> list[str]:
    """Replace ``"installed"`` by the installed built-in causal models, smallest first."""
    from outliers.models.builtin import list_models

    out: list[str] = []
    for m in models:
        names = (
            [r["name"] for r in list_models() if r["installed"] and r["kind"] == "causal"] if m == "installed" else [m]
        )
        out += [n for n in names if n not in out]
    return out


def check_reachable(cfg: StudyConfig) -> None:
    """Raise before any cell runs when a hub model of the study can be had neither from the cache nor the hub.

    Without this, each of its cells would fail on its own (and wait on the
    network); the hub is probed once, and only if some hub id is not cached.
    Other specs are left to the cells: a bad name or path fails its cells and
    says why.

    Raises:
        HubUnavailableError: naming the first such model and why the hub is out of reach.
    """
    from outliers.errors import HubUnavailableError, OutliersError
    from outliers.models.hub import hub_snapshot, hub_unreachable
    from outliers.models.source import resolve

    why: str | None = ""  # "": not probed yet
    for name in expand_models(cfg.models):
        try:
            hub_id = resolve(name).hub_id
        except OutliersError:
            continue
        if hub_id is None or hub_snapshot(hub_id) is not None:
            continue
        if why == "":
            why = hub_unreachable()
        if why is not None:
            raise HubUnavailableError(
                f"{hub_id} cannot be reached: no Hugging Face hub and not in the local cache ({why}); "
                "run where the hub is reachable, copy its snapshot into the Hugging Face cache, or name a "
                "local folder instead"
            )


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Return the grid, in the order it runs (grouped by model, then corpus, then measure)."""
    from .measures import MEASURES

    taken = [m for m in MEASURES.values() if m.name in cfg.measure]
    out = []
    for model in expand_models(cfg.models):
        for corpus in cfg.corpora:
            base = {"study": cfg.name, "model": model, "corpus": corpus}
            for measure in taken:
                out += [
                    {**base, "kind": measure.name, "method": c["method"], "threshold": c["threshold"]}
                    for c in measure.cells(cfg)
                ]
    return out


def cell_key(cell: dict[str, Any]) -> str:
    """Return the cell's place in the grid: a hash of kind, model, corpus, method and threshold."""
    place = {k: cell[k] for k in ("kind", "model", "corpus", "method", "threshold")}
    return digest(place)[:20]


def _settings(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    """Every setting that can change the cell's numbers: how the model is loaded and fed, and its measure's."""
    from .measures import MEASURES

    s: dict[str, Any] = {"dtype": cfg.dtype, "device": "cpu", "window": cfg.window, "bos": cfg.bos}
    return s | MEASURES[cell["kind"]].settings_of(cell, cfg)


class Fingerprints:
    """Fingerprints of cells' inputs, hashing each model's files and each corpus' text once.

    Weights are identified by ``outliers.models.source.weights_identity`` (file
    hashes cached by path, size and mtime: a rerun costs a ``stat``), corpora
    by the SHA-256 of their text; the tokenizer is part of the model's files.
    A hub model not in the local cache has no fingerprint yet (None): its
    cells always run.
    """

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.weights: dict[str, dict[str, Any]] = {}
        self.corpora: dict[str, str | None] = {}
        self.version = version()

    def model(self, name: str) -> dict[str, Any]:
        """Return the weights' identity, or ``{"sha256": None, "error": ...}`` when it cannot be had."""
        if name not in self.weights:
            from outliers.errors import OutliersError
            from outliers.models.source import weights_identity

            try:
                self.weights[name] = weights_identity(name)
            except OutliersError as e:  # a missing package or path: the cell will fail and say why
                self.weights[name] = {"sha256": None, "error": str(e)}
        return self.weights[name]

    def corpus(self, spec: str) -> str | None:
        if spec not in self.corpora:
            from outliers.data.corpus import load_corpus
            from outliers.errors import OutliersError

            try:
                self.corpora[spec] = load_corpus(spec).sha256
            except OutliersError:
                self.corpora[spec] = None
        return self.corpora[spec]

    def __call__(self, cell: dict[str, Any]) -> str | None:
        weights, text = self.model(cell["model"]), self.corpus(cell["corpus"])
        if weights.get("sha256") is None or text is None:
            return None
        return digest(
            {
                "cell": {k: cell[k] for k in ("kind", "method", "threshold")},
                "weights": weights["sha256"],
                "revision": weights.get("revision"),
                "corpus": text,
                "settings": _settings(cell, self.cfg),
                "version": self.version,
            }
        )[:32]


@dataclass(frozen=True)
class PlannedCell:
    cell: dict[str, Any]
    key: str
    fingerprint: str | None
    state: str  # one of STATES


def plan(
    cfg: StudyConfig,
    store: Store,
    fingerprints: Fingerprints | None = None,
    commit: tuple[str | None, bool] | None = None,
) -> list[PlannedCell]:
    """Return every cell of the grid with its state against what ``store`` holds.

    ``done``: stored with the same fingerprint by this code (the same commit
    and uncommitted changes, or where no commit is known); ``older``: the same
    fingerprint, computed by other code; ``stale``: stored with another fingerprint (its
    inputs changed); ``failed``; ``pending``: never stored.
    """
    fingerprints = fingerprints or Fingerprints(cfg)
    commit = commit if commit is not None else code_commit()
    df = store.frame()
    stored = {r.key: r for r in df.itertuples()}
    out = []
    for cell in cells(cfg):
        key = cell_key(cell)
        fp = fingerprints(cell)
        row = stored.get(key)
        if row is None:
            state = "pending"
        elif row.status != "done":
            state = "failed"
        elif fp is None or row.fingerprint != fp:
            state = "stale"
        elif commit[0] is not None and row.commit_sha != commit[0]:
            state = "older"
        else:
            state = "done"
        out.append(PlannedCell(cell, key, fp, state))
    return out
