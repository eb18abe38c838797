"""Run a study's grid: load each model once, tokenize each corpus once, store each cell as it finishes.

Cells per (model, corpus): the fp32 baseline, one per (method, threshold)
(one per method for methods without decomposition, whose threshold is moot),
and, when ``"outliers"`` is measured, one outlier scan. Quantized cells start
from a copy of the float model, never from a reload.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from outliers.nn import METHODS

from .config import StudyConfig
from .store import Store

__all__ = ["cells", "cell_key", "run_study", "expand_models"]


def _version() -> str:
    from outliers import __version__

    return __version__


def expand_models(models: tuple[str, ...]) -> list[str]:
    """Replace ``"installed"`` by the installed built-in causal models, smallest first."""
    from outliers.models import list_models

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


def cell_key(cell: dict[str, Any], cfg: StudyConfig) -> str:
    """Hash of everything that determines the cell's number, and the package version."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("name", "models", "corpora", "methods", "thresholds", "description",
                             "expected_runtime", "measure")}
    blob = json.dumps({"cell": {k: v for k, v in cell.items() if k != "study"}, "settings": settings,
                       "version": _version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _perplexity_cell(cfg: StudyConfig, cell, model, ids, progress: bool = False) -> dict[str, Any]:
    from outliers.perplexity import perplexity
    from outliers.qmodel import quantize_model

    target, report = model, None
    if cell["method"] != "fp32":
        target = copy.deepcopy(model)
        report = quantize_model(target, cell["method"], cell["threshold"], outlier_weights=cfg.outlier_weights,
                                round_to=cfg.round_to)
    r = perplexity(target, ids, protocol=cfg.protocol, window=cfg.window, stride=cfg.stride,
                   max_windows=cfg.max_windows, batch_size=cfg.batch_size, progress=progress,
                   model_name=cell["model"], corpus_name=cell["corpus"],
                   method=None if cell["method"] == "fp32" else cell["method"])
    if not math.isfinite(r.ppl):
        raise FloatingPointError(f"perplexity is {r.ppl} (mean NLL {r.nll})")
    result = r.to_dict()
    if report is not None:
        result.update(weight_bytes_before=report.bytes_before, weight_bytes_after=report.bytes_after,
                      replaced=len(report.replaced))
    return result


def _outliers_cell(cfg: StudyConfig, cell, model, ids, info) -> dict[str, Any]:
    from outliers.criteria import Criteria, summary
    from outliers.scan import scan

    st = scan(model, ids, points="attn,ffn", threshold=cell["threshold"], max_tokens=cfg.outlier_tokens,
              window=cfg.window, batch_size=cfg.batch_size, progress=False, meta={"model": cell["model"]})
    rows = {scale: summary(st, Criteria(scale=scale)) for scale in ("absolute", "relative")}
    return {"n_params": info.n_params, "n_tokens": st.meta["tokens_scanned"],
            "absolute": rows["absolute"], "relative": rows["relative"]}


class _Worker:
    """Holds one model (and its corpora's token ids) and computes cells of that model."""

    def __init__(self, cfg: StudyConfig, progress: bool = False):
        self.cfg = cfg
        self.progress = progress  # a bar over each cell's windows (local runs)
        self.loaded: dict[str, Any] = {}
        self.tokens: dict[tuple[str, str], Any] = {}

    def run(self, cell: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
        """Return ``(status, result, error)``; any exception becomes a failed cell."""
        from outliers.corpus import encode_corpus, load_corpus
        from outliers.models import load_model

        try:
            if cell["model"] not in self.loaded:
                self.loaded.clear()  # one model in memory at a time
                self.tokens.clear()
                self.loaded[cell["model"]] = load_model(cell["model"], progress=False)
            model, tok, info = self.loaded[cell["model"]]
            tkey = (cell["model"], cell["corpus"])
            if tkey not in self.tokens:
                self.tokens[tkey] = encode_corpus(tok, load_corpus(cell["corpus"]))
            if cell["kind"] == "perplexity":
                result = _perplexity_cell(self.cfg, cell, model, self.tokens[tkey], self.progress)
            else:
                result = _outliers_cell(self.cfg, cell, model, self.tokens[tkey], info)
            result["n_params"] = info.n_params
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
        worker_cls = ray.remote(num_cpus=1)(_Worker)
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
              address: str | None = None, on_cell: Callable[[dict, str], None] | None = None) -> dict[str, int]:
    """Run every cell not yet done; return counts of ``done``, ``failed`` and ``skipped`` cells.

    ``backend="local"`` runs in this process; ``"ray"`` runs one Ray actor per
    model (on a local cluster started on demand, or the one at ``address``);
    either way only this process writes to SQLite, one transaction per cell.
    A cell that raises (a model that will not load, NaN perplexity, out of
    memory) is stored as ``failed`` with its error, and the study goes on.
    """
    if backend not in ("local", "ray"):
        from outliers.errors import InvalidArgumentError

        raise InvalidArgumentError(f"backend must be 'local' or 'ray', got {backend!r}")
    store = Store(out)
    (Path(out) / "study.json").write_text(json.dumps(asdict(cfg), indent=1))
    done = store.done_keys()
    todo = [(c, cell_key(c, cfg)) for c in cells(cfg)]
    counts = {"done": 0, "failed": 0, "skipped": sum(k in done for _, k in todo)}
    todo = [(c, k) for c, k in todo if k not in done]
    bar = tqdm(total=len(todo), desc=cfg.name, unit="cell", disable=not progress)
    version = _version()
    if backend == "local":
        worker = _Worker(cfg, progress)
        results = ((cell, key, worker.run(cell)) for cell, key in todo)
    else:
        results = _ray_results(cfg, todo, address)
    try:
        for cell, key, (status, result, error) in results:
            store.record(key, cell, status, result, error=error, version=version)
            counts[status] += 1
            if on_cell:
                on_cell(cell, status)
            bar.update(1)
    finally:
        bar.close()
        store.close()
    return counts
