"""Place a model over devices with accelerate: GPUs first, then CPU, then disk.

``dispatch(model, device_map)`` puts an already loaded (and, for a quantized
model, already quantized) model over devices: accelerate hooks move each
block's inputs to its device, and the weights of blocks offloaded to ``"disk"``
(or to ``"cpu"`` when the model runs on a GPU) sit on the meta device until the
block's hook loads them for its forward. Quantize *before* dispatch: a layer
swapped in afterwards would have no offloaded copy for the hook to load.

``Int8Linear`` keeps its codes and statistics in buffers, not parameters, so
dispatch always offloads buffers too (``offload_buffers=True``); without it
accelerate would keep every int8 code of an offloaded block resident on the
execution device. The layer itself picks its kernels from its input's device,
so an int8 block placed on a GPU runs the Numba kernels as it would undispatched.

A device map is a strategy name (``"auto"``, ``"balanced"``,
``"balanced_low_0"``, ``"sequential"``: accelerate's ``infer_auto_device_map``
within ``max_memory``) or a dict from module names to a GPU index,
``"cuda:N"``, ``"cpu"`` or ``"disk"``; ``plan_device_map`` turns either into a
checked dict before anything moves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outliers.errors import InvalidArgumentError

__all__ = [
    "STRATEGIES",
    "DeviceMap",
    "parse_device_map",
    "parse_max_memory",
    "plan_device_map",
    "dispatch",
    "dispatched_copy",
    "is_dispatched",
    "input_device",
    "describe_placement",
    "check_offload",
    "offload_subfolder",
    "remove_with",
]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str]


def parse_device_map(text: str) -> DeviceMap:
    """Return a device map from the command line: a strategy name, a JSON object, or a ``.json`` file holding one.

    Raises:
        InvalidArgumentError: anything else.
    """
    if text in STRATEGIES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(
                f"--device-map {text!r} is not one of {', '.join(STRATEGIES)}, a JSON object or a .json file"
            )
        source = path.read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"--device-map {text!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"--device-map must be a JSON object (module -> device), got {type(value).__name__}")
    return value


def parse_max_memory(text: str) -> dict[int | str, str]:
    """Return accelerate's ``max_memory`` from ``"0=20GiB,1=20GiB,cpu=64GiB"`` (GPU index or ``cpu``).

    Raises:
        InvalidArgumentError: an entry that is not ``DEVICE=SIZE``.
    """
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not size or not (device.isdigit() or device == "cpu"):
            raise InvalidArgumentError(f"--max-memory entries are DEVICE=SIZE (0=20GiB, cpu=64GiB), got {part!r}")
        out[int(device) if device.isdigit() else device] = size
    if not out:
        raise InvalidArgumentError("--max-memory is empty")
    return out


def _check_device(key: str, value: Any) -> int | str:
    """A device map value as accelerate takes it; the error names the module and the value."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgumentError(f"device_map[{key!r}] must be a GPU index, 'cuda:N', 'cpu' or 'disk', got {value!r}")
    if value in ("cpu", "disk"):
        return value
    index = value
    if isinstance(value, str):
        kind, _, n = value.partition(":")
        if kind != "cuda" or not (n.isdigit() or n == ""):
            raise InvalidArgumentError(
                f"device_map[{key!r}] must be a GPU index, 'cuda:N', 'cpu' or 'disk', got {value!r}"
            )
        index = int(n or 0)
    assert isinstance(index, int)
    found = torch.cuda.device_count()
    if not 0 <= index < found:
        raise InvalidArgumentError(
            f"device_map[{key!r}] asks for GPU {index}, but {found} GPU(s) are visible; use 'cpu' or 'disk' there"
        )
    return index


def _check_dict(model: nn.Module, device_map: dict[str, Any]) -> dict[str, int | str]:
    """The dict with its values checked; every module name must exist and every tensor be placed exactly once."""
    if not device_map:
        raise InvalidArgumentError("device_map is empty: name at least one module ('' for the whole model)")
    modules = dict(model.named_modules())
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        top = ", ".join(n for n, _ in model.named_children())
        raise InvalidArgumentError(
            f"device_map names no module of {type(model).__name__}: {', '.join(map(repr, unknown))} "
            f"(its top-level modules: {top})"
        )
    keys = sorted(device_map, key=len)
    nested = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if a == "" or b.startswith(a + ".")]
    if nested:
        a, b = nested[0]
        raise InvalidArgumentError(f"device_map places {b!r} twice: it lies inside {a or 'the whole model'!r}")
    placed = [k + "." for k in device_map]
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    missing = [n for n in tensors if "" not in device_map and not any(n.startswith(p) for p in placed)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgumentError(f"device_map leaves {', '.join(missing[:5])}{more} without a device")
    return {k: _check_device(k, v) for k, v in device_map.items()}


def plan_device_map(
    model: nn.Module,
    device_map: DeviceMap = "auto",
    *,
    max_memory: dict[int | str, int | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, int | str]:
    """Return the concrete, checked ``{module: device}`` for a strategy name or a dict.

    A strategy fills the GPUs found (within ``max_memory``), then the CPU,
    then ``"disk"``, never splitting a block (the model's ``_no_split_modules``).
    ``model`` may sit on the meta device (``accelerate.init_empty_weights``).

    Raises:
        InvalidArgumentError: an unknown strategy, a module name the model lacks,
            a tensor left unplaced or placed twice, a GPU that is not there.
    """
    if isinstance(device_map, dict):
        return _check_dict(model, device_map)
    if device_map not in STRATEGIES:
        raise InvalidArgumentError(
            f"device_map must be one of {', '.join(STRATEGIES)} or a dict of module -> device, got {device_map!r}"
        )
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    for k in max_memory or {}:
        if k != "cpu":
            _check_device("max_memory", k)
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory, no_split_module_classes=no_split, dtype=dtype, low_zero=device_map == "balanced_low_0"
        )
    plan = infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    return _check_dict(model, dict(plan))


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place this model (``dispatch`` or transformers' ``device_map``)."""
    return getattr(model, "hf_device_map", None) is not None and any(hasattr(m, "_hf_hook") for m in model.modules())


def offload_subfolder(offload_folder: str | Path) -> Path:
    """A new empty folder under ``offload_folder`` for one model's offloaded weights (see ``remove_with``).

    accelerate reads an offload folder that already holds an ``index.json`` as
    the weights to use: a shared folder would hand one model another's weights.
    """
    root = Path(offload_folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="offload-", dir=root))


def remove_with(model: nn.Module, folder: Path) -> None:
    """Delete ``folder`` when ``model`` is garbage-collected (or at exit)."""
    weakref.finalize(model, shutil.rmtree, folder, True)


def check_offload(plan: dict[str, int | str], offload_folder: str | Path | None) -> None:
    """Refuse a plan with ``"disk"`` entries but no folder to write them to."""
    if offload_folder is None and "disk" in plan.values():
        disk = [k for k, v in plan.items() if v == "disk"]
        raise InvalidArgumentError(
            f"device_map sends {', '.join(disk)} to disk: give an offload folder (--offload-folder)"
        )


def dispatch(
    model: nn.Module,
    device_map: DeviceMap = "auto",
    *,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """Place ``model`` over devices in place and return it (quantize it first, if at all).

    Args:
        device_map: a strategy or a dict (see ``plan_device_map``).
        max_memory: per-device budget for a strategy, e.g. ``{0: "20GiB", "cpu": "64GiB"}``.
        offload_folder: where ``"disk"`` blocks are written; each call writes into
            a fresh folder inside it, removed with the model.

    Raises:
        InvalidArgumentError: a bad device map, ``"disk"`` without ``offload_folder``,
            a model already dispatched or with weights on the meta device.
    """
    if is_dispatched(model):
        raise InvalidArgumentError("model is already dispatched; dispatch a fresh copy (dispatched_copy)")
    if meta := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise InvalidArgumentError(f"model has tensors on the meta device ({meta[0]}, ...); load its weights first")
    dtype = next(model.parameters()).dtype
    plan = plan_device_map(model, device_map, max_memory=max_memory, dtype=dtype)
    check_offload(plan, offload_folder)
    folder = None
    if "disk" in plan.values():
        assert offload_folder is not None  # check_offload
        folder = offload_subfolder(offload_folder)
        remove_with(model, folder)
    from accelerate import dispatch_model

    return dispatch_model(model, plan, offload_dir=folder, offload_buffers=True)


def dispatched_copy(
    model: nn.Module,
    device_map: DeviceMap = "auto",
    *,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """Return a dispatched copy of ``model``; ``model`` stays where it was.

    Only the module tree is copied: the copy starts out sharing every tensor
    with ``model`` (dispatch then moves or offloads the copy's own references),
    so e.g. a float model can stay on the CPU as the source of quantized copies.
    """
    from copy import deepcopy

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy_ = deepcopy(model, memo=shared)
    return dispatch(copy_, device_map, max_memory=max_memory, offload_folder=offload_folder)


def input_device(model: nn.Module) -> torch.device:
    """Where to put ``input_ids``: a dispatched model's main device, else its first parameter's device.

    A dispatched model's first parameter may be offloaded (on the meta device);
    accelerate runs it on the first GPU of its map, or the CPU when it has none.
    """
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        gpus = [v for v in device_map.values() if v not in ("cpu", "disk")]
        return torch.device(f"cuda:{gpus[0]}" if gpus and isinstance(gpus[0], int) else gpus[0] if gpus else "cpu")
    return next(model.parameters()).device


def describe_placement(device_map: dict[str, int | str]) -> str:
    """A short line for a map, e.g. ``"cuda:0 (12 modules) + cpu (3) + disk (4)"``."""
    counts: dict[str, int] = {}
    for v in device_map.values():
        name = f"cuda:{v}" if isinstance(v, int) else str(v)
        counts[name] = counts.get(name, 0) + 1
    return " + ".join(f"{d} ({n} module{'s' * (n != 1)})" for d, n in counts.items())
