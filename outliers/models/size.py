"""How big a model spec is, without loading it: for placement and memory estimates made before a load.

The weight count is read where it is exact: a safetensors folder's headers
(8 bytes and a JSON table per file) hold every tensor ``load_model`` will
hold, tied weights once. Without safetensors (a config-only folder, a hub id
whose weights are not cached) the parameters of an empty model built from the
config on the meta device are counted: nothing is read or allocated. The
architecture facts (hidden size, layers, heads, vocabulary) come from the
config. A GGUF that has not been converted yet is read from its header alone.

A hub id that is neither cached nor reachable has no size here ("size unknown
(offline)"): nothing but one reachability probe (``outliers.models.hub``)
touches the network.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from outliers.errors import HubUnavailableError, ModelFileError

__all__ = ["ModelSize", "OFFLINE", "model_size", "float32_bytes"]

OFFLINE = "size unknown (offline)"


@dataclass(frozen=True)
class ModelSize:
    """A model's weight count and the shapes its activations take."""

    n_params: int  # tied weights counted once
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    model_type: str
    source: str  # where the numbers were read: "config.json + safetensors headers", "GGUF header", ...


def _safetensors_count(folder: Path) -> int | None:
    """Elements over the folder's ``*.safetensors`` headers; None without them or with a shard missing."""
    index = folder / "model.safetensors.index.json"
    if index.exists():  # a partly downloaded snapshot would be undercounted from the shards present
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ModelFileError(f"{index} is not a readable safetensors index: {e}") from e
        files = [folder / name for name in names]
        if not all(f.exists() for f in files):
            return None
    else:
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


def _config(where: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where)
    except Exception as e:  # no config.json, an unknown model_type, a hub id that is not there
        raise ModelFileError(f"could not read the config of {where}: {e}") from e


def _empty_count(config: Any) -> int:
    """Parameters of an empty model built from ``config`` (tied weights once)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from outliers.models.load import _is_causal

    # torch.device("meta"), not accelerate.init_empty_weights: under the latter (accelerate 1.15,
    # transformers 5) an output layer tied to the embeddings comes out untied and counts twice
    with torch.device("meta"):
        model = (AutoModelForCausalLM if _is_causal(config) else AutoModel).from_config(config)
    return sum(p.numel() for p in model.parameters())


def _config_size(config: Any, n_params: int | None, source: str) -> ModelSize:
    """The ``ModelSize`` of a transformers config; ``n_params`` None: counted on an empty model."""
    text = config.get_text_config()  # a multimodal config keeps its language model's shapes here
    return ModelSize(
        n_params=_empty_count(config) if n_params is None else n_params,
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        num_heads=int(text.num_attention_heads),
        vocab_size=int(text.vocab_size),
        model_type=str(config.model_type),
        source=source,
    )


_PLAIN = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}


def _plain_config(folder: Path) -> dict[str, Any] | None:
    """``config.json``'s sizes read as JSON, where they sit at its top level under transformers' standard names
    (the built-in models' folders): no transformers import for a plan. None: let transformers read it."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    keys = [*_PLAIN, "vocab_size"]
    if "text_config" in config or not all(isinstance(config.get(k), int) for k in keys):
        return None
    return config if isinstance(config.get("model_type"), str) else None


def _folder_size(folder: Path, where: str = "") -> ModelSize:
    n = _safetensors_count(folder)
    source = f"{where}config.json" + (" + safetensors headers" if n else "")
    if n and (plain := _plain_config(folder)) is not None:
        sizes = {field: int(plain[key]) for key, field in _PLAIN.items()}
        return ModelSize(n, **sizes, vocab_size=int(plain["vocab_size"]), model_type=plain["model_type"], source=source)
    return _config_size(_config(folder), n, source)


def _gguf_size(path: Path) -> ModelSize:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)

        def field(key: str) -> Any:
            f = reader.fields[key]
            return f.parts[f.data[0]]

        arch = bytes(field("general.architecture")).decode()
        return ModelSize(
            n_params=sum(int(t.n_elements) for t in reader.tensors),
            hidden_size=int(field(f"{arch}.embedding_length")[0]),
            num_layers=int(field(f"{arch}.block_count")[0]),
            num_heads=int(field(f"{arch}.attention.head_count")[0]),
            vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
            model_type=arch,
            source="GGUF header",
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"{path} has no readable GGUF header: {e}") from e


def model_size(spec: str, *, online: bool | None = None) -> tuple[ModelSize | None, str]:
    """Return ``(size, "")`` for a model spec, or ``(None, OFFLINE)`` for a hub id neither cached nor reachable.

    ``online``: whether the hub may be asked for a config.json (None: probe it
    once, only if an uncached hub id needs it).

    Raises:
        UnknownModelError, ModelFileError, MissingPackageError: as ``load_model``
            would for the same spec, or for a config or header that cannot be read.
    """
    from outliers.fingerprint import file_sha256
    from outliers.models.gguf import converted_dir
    from outliers.models.hub import hub_reachable, hub_snapshot
    from outliers.models.source import resolve

    src = resolve(spec)
    if src.folder is not None:
        return _folder_size(src.folder), ""
    if src.gguf is not None:
        converted = converted_dir(src.gguf.name, src.gguf_sha256 or file_sha256(src.gguf))
        if (converted / "config.json").exists():  # what load_model loads once converted
            return _folder_size(converted), ""
        return _gguf_size(src.gguf), ""
    assert src.hub_id is not None  # resolve() sets exactly one of gguf, folder, hub_id
    snapshot = hub_snapshot(src.hub_id)
    if snapshot is not None and (snapshot / "config.json").exists():
        return _folder_size(snapshot, "cached "), ""
    if not (hub_reachable() if online is None else online):
        return None, OFFLINE
    return _config_size(_config(src.hub_id), None, "hub config.json"), ""


def float32_bytes(spec: str, *, online: bool | None = None) -> int:
    """Return the bytes of ``spec``'s weights in float32, the dtype studies and ``load_model`` default to.

    Raises:
        HubUnavailableError: a hub id neither cached nor reachable.
        UnknownModelError, ModelFileError, MissingPackageError: as ``model_size``.
    """
    size, why = model_size(spec, online=online)
    if size is None:
        raise HubUnavailableError(f"{spec}: {why}: not in the local Hugging Face cache and the hub is not reachable")
    return 4 * size.n_params
