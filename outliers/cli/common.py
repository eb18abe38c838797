"""Helpers the commands share: output paths checked before a long run, aligned tables, intervals."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outliers.display import fmt_interval as ci  # the commands print intervals as results draw them
from outliers.errors import InvalidArgumentError, OutputPathError

__all__ = [
    "check_writable",
    "check_out_dir",
    "require_causal",
    "print_table",
    "ci",
    "run_facts",
    "add_transform_args",
    "transform_of",
    "add_device_map_args",
    "Placement",
    "placement_of",
    "add_int8_gemm_arg",
    "apply_int8_gemm",
]


def require_causal(model: str, info: Any, why: str) -> None:
    """Refuse an encoder before any analysis runs: ``why`` says what the command needs a causal LM for."""
    if info.kind != "causal":
        raise InvalidArgumentError(f"model '{model}' is an encoder ({info.architecture}); {why}")


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


def write_json(path: Any, obj: Any, flag: str) -> None:
    """Write ``obj`` as JSON, atomically; the numbers were printed first, so a failure loses nothing computed.

    Raises:
        OutputPathError: the file could not be written (named with the ``flag`` that asked for it).
    """
    import json

    from outliers.cache import atomic_write
    from outliers.errors import OutputPathError

    try:
        atomic_write(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise OutputPathError(f"could not write {flag} {path}: {e}") from e


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


def add_int8_gemm_arg(p: Any) -> None:
    """``--int8-gemm NAME``: force one exact CPU int8 GEMM backend (``outliers.quant.gemm``)."""
    p.add_argument(
        "--int8-gemm",
        metavar="NAME",
        default=None,
        help="CPU int8 GEMM backend: int_mm, float32 or int16 (default: $OUTLIERS_INT8_GEMM, else the "
        "fastest exact one on this machine, measured once and cached; every backend gives the same numbers)",
    )


def apply_int8_gemm(args: Any) -> None:
    """Check ``--int8-gemm`` before any work and pin it for this process and its children."""
    name = getattr(args, "int8_gemm", None)
    if name:
        from outliers.quant.gemm import ENV, get_backend

        get_backend(name)  # an unknown name fails here, listing the available ones
        os.environ[ENV] = name


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
    from outliers.quant.transform_spec import Transform

    return Transform(smooth=args.smooth, rotate=args.rotate, seed=args.seed, calib_windows=args.calib_windows)


def add_device_map_args(p: Any) -> None:
    """``--device-map``, ``--max-memory`` and ``--offload-folder`` (``outliers.models.dispatch``)."""
    p.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread the model over devices with accelerate: auto (the GPUs found, then CPU, then disk), balanced, "
        "balanced_low_0, sequential, a JSON object {module: GPU index | cpu | disk} or a .json file holding one",
    )
    p.add_argument(
        "--max-memory", metavar="DEV=SIZE,...", help="budget per device for --device-map, e.g. 0=20GiB,cpu=64GiB"
    )
    p.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="where --device-map puts blocks offloaded to disk (a fresh folder inside DIR, removed at exit)",
    )


@dataclass(frozen=True)
class Placement:
    """Where a command's models run: as loaded (no map), or dispatched over devices.

    Calling it on a model returns the model itself, or a dispatched copy that
    shares its tensors (the same copy for the same model), so the float model
    can stay on the CPU as the source of quantized and transformed copies:
    quantization happens before dispatch.
    """

    device_map: Any = None  # None, a strategy name or a dict (outliers.models.dispatch)
    max_memory: dict | None = None
    offload_folder: str | None = None
    _copies: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)

    def load_kwargs(self) -> dict[str, Any]:
        """``load_model``'s placement arguments: empty without a map."""
        if self.device_map is None:
            return {}
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    def __call__(self, model: Any) -> Any:
        from outliers.models.dispatch import dispatched_copy, is_dispatched

        if self.device_map is None or is_dispatched(model):
            return model
        if model not in self._copies:
            self._copies[model] = dispatched_copy(
                model, self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder
            )
        return self._copies[model]


def placement_of(args: Any) -> Placement:
    """The ``Placement`` the arguments ask for, checked before a model loads."""
    from outliers.models.dispatch import parse_device_map, parse_max_memory

    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise InvalidArgumentError("--max-memory and --offload-folder only apply with --device-map")
        return Placement()
    if args.device != "cpu":
        raise InvalidArgumentError(f"give --device ({args.device}) or --device-map, not both")
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    return Placement(parse_device_map(args.device_map), max_memory, args.offload_folder)
