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


def _perplexity_cell(cfg: StudyConfig, cell, model, ids) -> dict[str, Any]:
    from outliers.perplexity import perplexity
    from outliers.qmodel import quantize_model

    target, report = model, None
    if cell["method"] != "fp32":
        target = copy.deepcopy(model)
        report = quantize_model(target, cell["method"], cell["threshold"], outlier_weights=cfg.outlier_weights,
                                round_to=cfg.round_to)
    r = perplexity(target, ids, protocol=cfg.protocol, window=cfg.window, stride=cfg.stride,
                   max_windows=cfg.max_windows, batch_size=cfg.batch_size, progress=False,
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


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool = True,
              on_cell: Callable[[dict, str], None] | None = None) -> dict[str, int]:
    """Run every cell not yet done; return counts of ``done``, ``failed`` and ``skipped`` cells.

    A cell that raises (a model that will not load, NaN perplexity, out of
    memory) is stored as ``failed`` with its error, and the study goes on.
    """
    from outliers.corpus import encode_corpus, load_corpus
    from outliers.models import load_model

    store = Store(out)
    (Path(out) / "study.json").write_text(json.dumps(asdict(cfg), indent=1))
    grid = cells(cfg)
    done = store.done_keys()
    todo = [(c, cell_key(c, cfg)) for c in grid]
    counts = {"done": 0, "failed": 0, "skipped": sum(k in done for _, k in todo)}
    todo = [(c, k) for c, k in todo if k not in done]
    bar = tqdm(total=len(todo), desc=cfg.name, unit="cell", disable=not progress)
    loaded: dict[str, Any] = {}
    tokens: dict[tuple[str, str], Any] = {}
    version = _version()
    try:
        for cell, key in todo:
            try:
                if cell["model"] not in loaded:
                    loaded.clear()  # one model in memory at a time
                    loaded[cell["model"]] = load_model(cell["model"], progress=False)
                model, tok, info = loaded[cell["model"]]
                tkey = (cell["model"], cell["corpus"])
                if tkey not in tokens:
                    tokens[tkey] = encode_corpus(tok, load_corpus(cell["corpus"]))
                if cell["kind"] == "perplexity":
                    result = _perplexity_cell(cfg, cell, model, tokens[tkey])
                else:
                    result = _outliers_cell(cfg, cell, model, tokens[tkey], info)
                result["n_params"] = info.n_params
                store.record(key, cell, "done", result, version=version)
                counts["done"] += 1
                status = "done"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - any failure is recorded and the study goes on
                store.record(key, cell, "failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}",
                             version=version)
                counts["failed"] += 1
                status = "failed"
            if on_cell:
                on_cell(cell, status)
            bar.update(1)
    finally:
        bar.close()
        store.close()
    return counts
