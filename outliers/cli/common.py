"""Helpers the commands share: output paths checked before a long run, aligned tables, intervals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from outliers.errors import OutputPathError

__all__ = ["check_writable", "print_table", "ci", "run_facts"]


def check_writable(path: str) -> Path:
    """Fail before a long run, not after it, when ``--json`` cannot be written."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputPathError(f"--json path {path} is a folder; give a file name")
    if not parent.is_dir():
        raise OutputPathError(f"--json path {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputPathError(f"--json path {path} is not writable")
    return p


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def ci(ci, fmt: str = ".3f", scale: float = 1.0) -> str:
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]" if ci else ""


def run_facts(model: str, info: Any, corpus: Any) -> dict[str, Any]:
    """What an analysis records beside its numbers: the model as named, its weights' provenance, the corpus."""
    return {
        "model": model,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "architecture": info.architecture,
        "n_params": info.n_params,
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
    }
