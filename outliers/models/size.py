"""How many weights a model spec has, without loading it: for placement decisions made before a load.

A safetensors folder (a model folder, a cached hub snapshot, a GGUF's cached
float conversion) is read from its headers alone (8 bytes and a JSON table per
file). Anything else is counted on an empty model built on the meta device from
its config (``accelerate.init_empty_weights``): no weight is read or allocated.
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

from outliers.errors import ModelFileError

__all__ = ["weight_count", "float32_bytes"]


def _safetensors_count(folder: Path) -> int | None:
    """Elements over the folder's top-level ``*.safetensors`` headers; None without any."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ModelFileError(f"{path} has no readable safetensors header: {e}") from e
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _config_count(where: str | Path, **kwargs) -> int:
    """Parameters of an empty model built from the config (tied weights once)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from outliers.models.load import _is_causal

    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        with init_empty_weights():
            model = (AutoModelForCausalLM if _is_causal(config) else AutoModel).from_config(config)
    except Exception as e:
        raise ModelFileError(f"could not read the config of {where}: {e}") from e
    return sum(p.numel() for p in model.parameters())


def weight_count(spec: str) -> int:
    """Return the number of weights (parameters and stored buffers) ``spec`` names.

    Raises:
        UnknownModelError, ModelFileError, MissingPackageError: as ``load_model``
            would for the same spec.
    """
    from outliers.cache import sha256_file
    from outliers.models.gguf import converted_dir
    from outliers.models.hub import hub_snapshot
    from outliers.models.source import resolve

    src = resolve(spec)
    if src.folder is not None:
        return _safetensors_count(src.folder) or _config_count(src.folder)
    if src.gguf is not None:
        done = converted_dir(src.gguf.name, src.gguf_sha256 or sha256_file(src.gguf))
        if done.is_dir() and (n := _safetensors_count(done)):
            return n
        return _config_count(src.gguf.parent, gguf_file=src.gguf.name)
    assert src.hub_id is not None  # resolve() sets exactly one of gguf, folder, hub_id
    snapshot = hub_snapshot(src.hub_id)
    if snapshot is not None and (n := _safetensors_count(snapshot)):
        return n
    return _config_count(src.hub_id)


def float32_bytes(spec: str) -> int:
    """Bytes of ``spec``'s weights in float32, the dtype studies and ``load_model`` default to."""
    return 4 * weight_count(spec)
