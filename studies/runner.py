"""Run a study's grid: load each model once, tokenize each corpus once, store each cell as it finishes.

Cells per (model, corpus): the fp32 baseline, one per (method, threshold)
(one per method for methods without decomposition, whose threshold is moot),
and, when ``"outliers"`` is measured, one outlier scan. A quantized cell is
scored against the float model on the same windows (paired delta, KL, top-1
agreement); its model shares every unquantized tensor with the float one
(``outliers.quant.model.quantized_copy``), and the float model's final hidden
states are kept per (model, corpus) so the reference runs once per study.

Each cell has two identities: its place in the grid (``cell_key``) and the
fingerprint of its inputs (``Fingerprints``). ``plan`` compares the store
with the grid: a cell is ``done``, ``stale`` (its inputs changed since it
was computed), ``failed`` or ``pending``; a done cell computed by another
git commit is flagged ``older`` and redone only on request.
"""

from __future__ import annotations

import platform
import traceback
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from outliers.fingerprint import digest, git_commit
from outliers.quant.methods import METHODS

from .config import StudyConfig, write_study
from .store import Store

__all__ = ["cells", "cell_key", "run_study", "expand_models", "Fingerprints", "plan", "PlannedCell", "STATES"]

STATES = ("done", "older", "stale", "failed", "pending")


def _version() -> str:
    from outliers import __version__

    return __version__


def expand_models(models: tuple[str, ...]) -> list[str]:
    """Replace ``"installed"`` by the installed built-in causal models, smallest first."""
    from outliers.models.builtin import list_models

    out: list[str] = []
    for m in models:
        names = [r["name"] for r in list_models() if r["installed"] and r["kind"] == "causal"] \
            if m == "installed" else [m]
        out += [n for n in names if n not in out]
    return out


def cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Return the grid, in the order it runs (grouped by model, then corpus)."""
    out = []
    for model in expand_models(cfg.models):
        for corpus in cfg.corpora:
            base = {"study": cfg.name, "model": model, "corpus": corpus}
            if "perplexity" in cfg.measure:
                out.append({**base, "kind": "perplexity", "method": "fp32", "threshold": None})
                for method in cfg.methods:
                    ts = cfg.thresholds if METHODS[method].decomposition else (0.0,)
                    out += [{**base, "kind": "perplexity", "method": method, "threshold": t} for t in ts]
            if "outliers" in cfg.measure:
                out.append({**base, "kind": "outliers", "method": "fp32", "threshold": cfg.outlier_threshold})
    return out


def cell_key(cell: dict[str, Any]) -> str:
    """Return the cell's place in the grid: a hash of kind, model, corpus, method and threshold."""
    place = {k: cell[k] for k in ("kind", "model", "corpus", "method", "threshold")}
    return digest(place)[:20]


def _settings(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    """Every setting that can change the cell's numbers."""
    s: dict[str, Any] = {"dtype": cfg.dtype, "device": "cpu", "window": cfg.window, "bos": cfg.bos}
    if cell["kind"] == "perplexity":
        s |= {"protocol": cfg.protocol, "stride": cfg.stride, "max_windows": cfg.max_windows,
              "batch_size": cfg.batch_size}  # batching moves float sums in the last bits
        if cell["method"] != "fp32":
            s |= {"outlier_weights": cfg.outlier_weights, "round_to": cfg.round_to}
    else:
        s |= {"outlier_tokens": cfg.outlier_tokens, "batch_size": cfg.batch_size, "points": "attn,ffn"}
    return s


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
        self.corpora: dict[str, str] = {}
        self.version = _version()

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
        return digest({"cell": {k: cell[k] for k in ("kind", "method", "threshold")},
                       "weights": weights["sha256"], "revision": weights.get("revision"), "corpus": text,
                       "settings": _settings(cell, self.cfg), "version": self.version})[:32]


@dataclass(frozen=True)
class PlannedCell:
    cell: dict[str, Any]
    key: str
    fingerprint: str | None
    state: str  # one of STATES


def plan(cfg: StudyConfig, store: Store, fingerprints: Fingerprints | None = None,
         commit: tuple[str | None, bool] | None = None) -> list[PlannedCell]:
    """Return every cell of the grid with its state against what ``store`` holds.

    ``done``: stored with the same fingerprint by this code (the same commit
    and uncommitted changes, or where no commit is known); ``older``: the same
    fingerprint, computed by other code; ``stale``: stored with another fingerprint (its
    inputs changed); ``failed``; ``pending``: never stored.
    """
    fingerprints = fingerprints or Fingerprints(cfg)
    commit = commit if commit is not None else git_commit()
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


def _perplexity_cell(cfg: StudyConfig, cell, model, ids, bos_id, ref_states, progress: bool = False):
    from outliers.eval.perplexity import perplexity
    from outliers.quant.model import quantized_copy

    target, report, reference = model, None, None
    if cell["method"] != "fp32":
        target, report = quantized_copy(model, cell["method"], cell["threshold"],
                                        outlier_weights=cfg.outlier_weights, round_to=cfg.round_to)
        reference = model
    r = perplexity(target, ids, protocol=cfg.protocol, window=cfg.window, stride=cfg.stride,
                   max_windows=cfg.max_windows, batch_size=cfg.batch_size, bos=cfg.bos, bos_token_id=bos_id,
                   reference=reference, reference_states=ref_states, progress=progress,
                   model_name=cell["model"], corpus_name=cell["corpus"],
                   method=None if cell["method"] == "fp32" else cell["method"])
    if not math.isfinite(r.ppl):
        raise FloatingPointError(f"perplexity is {r.ppl} (mean NLL {r.nll})")
    result = r.to_dict()
    if report is not None:
        result.update(weight_bytes_before=report.bytes_before, weight_bytes_after=report.bytes_after,
                      replaced=len(report.replaced))
    return result, r.token_nll


def _outliers_cell(cfg: StudyConfig, cell, model, ids, info, bos_id) -> dict[str, Any]:
    from outliers.analysis.criteria import Criteria, summary
    from outliers.analysis.scan import scan

    st = scan(model, ids, points="attn,ffn", threshold=cell["threshold"], max_tokens=cfg.outlier_tokens,
              window=cfg.window, batch_size=cfg.batch_size, progress=False, meta={"model": cell["model"]},
              bos_token_id=bos_id)
    rows = {scale: summary(st, Criteria(scale=scale)) for scale in ("absolute", "relative")}
    criteria = Criteria()
    return {"n_params": info.n_params, "n_tokens": st.meta["tokens_scanned"], "threshold": cell["threshold"],
            "relative_k": st.relative_k, "layers": criteria.layers, "positions": criteria.positions,
            "absolute": rows["absolute"], "relative": rows["relative"]}


class _Worker:
    """Holds one model (and its corpora's token ids) and computes cells of that model."""

    def __init__(self, cfg: StudyConfig, progress: bool = False):
        self.cfg = cfg
        self.progress = progress  # a bar over each cell's windows (local runs)
        self.loaded: dict[str, Any] = {}
        self.tokens: dict[tuple[str, str], Any] = {}  # (model, corpus) -> (token ids, corpus SHA-256)
        self.ref_states: dict[tuple[str, str], dict] = {}  # the float model's hidden states per batch

    def run(self, cell: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
        """Return ``(status, result, error)``; any exception becomes a failed cell.

        ``result`` holds the numbers, ``provenance`` (weights, libraries, the
        token ids' hash) and, for perplexity, ``token_nll`` (a float32 array).
        """
        import hashlib

        import torch
        import transformers

        from outliers.data.corpus import encode_corpus, load_corpus
        from outliers.models.load import load_model

        try:
            if cell["model"] not in self.loaded:
                self.loaded.clear()  # one model in memory at a time
                self.tokens.clear()
                self.ref_states.clear()
                self.loaded[cell["model"]] = load_model(cell["model"], dtype=self.cfg.dtype, progress=False)
            model, tok, info = self.loaded[cell["model"]]
            tkey = (cell["model"], cell["corpus"])
            if tkey not in self.tokens:
                corpus = load_corpus(cell["corpus"])
                self.tokens[tkey] = encode_corpus(tok, corpus), corpus.sha256
            ids, corpus_sha256 = self.tokens[tkey]
            bos_id = None
            if self.cfg.bos == "window":
                from outliers.data.corpus import bos_token_id

                bos_id = bos_token_id(tok, cell["model"])
            token_nll = None
            if cell["kind"] == "perplexity":
                result, token_nll = _perplexity_cell(self.cfg, cell, model, ids, bos_id,
                                                     self.ref_states.setdefault(tkey, {}), self.progress)
            else:
                result = _outliers_cell(self.cfg, cell, model, ids, info, bos_id)
            result["n_params"] = info.n_params
            result["token_nll"] = token_nll
            result["provenance"] = {
                "weights": info.weights, "weights_sha256": info.weights_sha256, "revision": info.revision,
                "corpus_sha256": corpus_sha256, "token_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
            return "done", result, None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - any failure is recorded and the study goes on
            return "failed", None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def _ray_results(cfg: StudyConfig, todo: list[tuple[dict, str]], address: str | None):
    """Yield ``(cell, key, (status, result, error))`` as Ray actors (one per model) finish cells."""
    import os

    import ray

    started = False
    if not ray.is_initialized():
        if address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token files
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        from outliers.threads import thread_env

        # an actor holds one CPU: one torch/MKL/Numba thread, and idle OpenMP threads sleep (outliers/threads.py)
        worker_cls = ray.remote(num_cpus=1, runtime_env={"env_vars": thread_env(1)})(_Worker)
        groups: dict[str, list] = {}
        for cell, key in todo:
            groups.setdefault(cell["model"], []).append((cell, key))
        pending = {}
        for model, group in groups.items():
            actor = worker_cls.remote(cfg)
            for cell, key in group:  # an actor runs its calls in order: the model loads once
                pending[actor.run.remote(cell)] = (cell, key, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell, key, _actor = pending.pop(ready[0])
            yield cell, key, ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool = True, backend: str = "local",
              address: str | None = None, recompute_older: bool = False,
              on_cell: Callable[[dict, str], None] | None = None) -> dict[str, int]:
    """Run every cell that is not done; return counts of ``done``, ``failed``, ``skipped`` and ``stale`` cells.

    Cells done with the same fingerprint are skipped (``skipped``), also when
    another commit computed them, unless ``recompute_older``. Stale cells (their
    inputs changed) are recomputed and counted in ``stale`` as well as in
    ``done``/``failed``. ``backend="local"`` runs in this process; ``"ray"``
    runs one Ray actor per model (on a local cluster started on demand, or the
    one at ``address``); either way only this process writes to SQLite, one
    transaction per cell. A cell that raises (a model that will not load, NaN
    perplexity, out of memory) is stored as ``failed`` with its error, and the
    study goes on.
    """
    if backend not in ("local", "ray"):
        from outliers.errors import InvalidArgumentError

        raise InvalidArgumentError(f"backend must be 'local' or 'ray', got {backend!r}")
    store = Store(out)
    write_study(cfg, out)
    commit = git_commit()
    fingerprints = Fingerprints(cfg)
    planned = plan(cfg, store, fingerprints, commit)
    skip = {"done", "older"} if not recompute_older else {"done"}
    todo = [p for p in planned if p.state not in skip]
    counts = {"done": 0, "failed": 0, "skipped": len(planned) - len(todo),
              "stale": sum(p.state == "stale" for p in todo)}
    bar = tqdm(total=len(todo), desc=cfg.name, unit="cell", disable=not progress)
    version = _version()
    pairs = [(p.cell, p.key) for p in todo]
    fps = {p.key: p.fingerprint for p in todo}
    if backend == "local":
        worker = _Worker(cfg, progress)
        results = ((cell, key, worker.run(cell)) for cell, key in pairs)
    else:
        results = _ray_results(cfg, pairs, address)
    try:
        for cell, key, (status, result, error) in results:
            result = dict(result or {})
            token_nll, provenance = result.pop("token_nll", None), result.pop("provenance", None)
            fp = fps[key]
            if fp is None and status == "done":  # a hub model fetched by this run: now it has an identity
                fingerprints.weights.pop(cell["model"], None)
                fp = fingerprints(cell)
            store.record(key, fp, cell, status, result, error=error, version=version, commit=commit,
                         provenance=provenance, token_nll=token_nll)
            counts[status] += 1
            if on_cell:
                on_cell(cell, status)
            bar.update(1)
    finally:
        bar.close()
        store.close()
    return counts
