"""Helpers the commands share: output paths checked before a long run, aligned tables, intervals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from outliers.errors import OutputPathError

__all__ = ["check_writable", "check_out_dir", "print_table", "ci", "run_facts", "add_transform_args", "transform_of"]


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


def check_out_dir(path: str) -> Path:
    """Create ``--out`` before a long run and fail then, not after it, when it cannot hold the results."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise OutputPathError(f"--out {out} is not writable")
    return out


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def ci(ci, fmt: str = ".3f", scale: float = 1.0) -> str:
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]" if ci else ""


def run_facts(model: str, info: Any, corpus: Any = None) -> dict[str, Any]:
    """What an analysis records beside its numbers: the model as named, its weights' provenance and, where
    text was run, the corpus (``None``: the weights alone were measured)."""
    text = {} if corpus is None else {"corpus": corpus.name, "corpus_sha256": corpus.sha256}
    return {
        "model": model,
        **text,
        "architecture": info.architecture,
        "n_params": info.n_params,
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
    }


def add_transform_args(p: Any) -> None:
    """``--smooth``, ``--rotate`` and their calibration settings (``outliers.quant.transforms``)."""
    p.add_argument(
        "--smooth",
        type=float,
        metavar="ALPHA",
        help="SmoothQuant: migrate activation scale into the weights with strength ALPHA in [0, 1] before quantizing",
    )
    p.add_argument(
        "--rotate", choices=("hadamard",), help="rotate every quantized linear's input by a randomized Hadamard matrix"
    )
    p.add_argument("--seed", type=int, default=0, help="the rotation's random signs (default: %(default)s)")
    p.add_argument(
        "--calib-windows",
        type=int,
        default=16,
        help="smoothing's calibration windows, from the end of the corpus (default: %(default)s)",
    )
    p.add_argument("--calib-corpus", help="calibrate smoothing on this corpus instead (same forms as --corpus)")


def transform_of(args: Any) -> Any:
    """The ``Transform`` the arguments ask for (validated: bad values fail before a model loads)."""
    from outliers.quant.transforms import Transform

    return Transform(smooth=args.smooth, rotate=args.rotate, seed=args.seed, calib_windows=args.calib_windows)
