"""Where a model spec's weights are, and what they are, without loading them.

A spec is a built-in name, a Hugging Face folder, a ``.gguf`` file or a hub
id. ``weights_identity`` hashes what the weights are (studies key their cells
by it); ``provenance`` is the line printed beside every number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from outliers.cache import cache_dir
from outliers.errors import ModelFileError, UnknownModelError
from outliers.models.builtin import BUILTIN_MODELS, BuiltinModel
from outliers.models.gguf import converted_dir, damage
from outliers.models.hub import hub_snapshot
from outliers.models.packaged import assemble, locate

__all__ = ["Source", "resolve", "identity", "weights_identity", "provenance"]


class Source(NamedTuple):
    folder: Path | None  # a HF folder (config.json inside)
    gguf: Path | None  # a GGUF file
    hub_id: str | None
    gguf_sha256: str | None = None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve(spec: str) -> Source:
    if spec in BUILTIN_MODELS:
        return resolve_builtin(BUILTIN_MODELS[spec])
    if spec.startswith("hf:"):
        return Source(None, None, spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(path, None, None)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"model file {path} is not a .gguf file; pass a GGUF file or a model folder")
        return Source(None, path, None)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return Source(None, None, spec)
    if any(sep in spec for sep in ("/", "\\")) or spec.endswith(".gguf"):
        raise ModelFileError(f"model path {spec} does not exist")
    raise UnknownModelError(
        f"unknown model '{spec}': not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "not an existing folder or .gguf file; for a hub id write ORG/NAME or hf:NAME"
    )


def resolve_builtin(m: BuiltinModel) -> Source:
    paths = locate(m.files, m.name)
    if m.gguf_name is None:
        return Source(paths[0], None, None)
    if len(paths) == 1:
        return Source(None, paths[0], None, m.sha256)
    # Parts of one file: join them once into the cache, checksum-verified.
    if m.sha256 is None:
        raise ModelFileError(f"built-in {m.name} comes in parts but declares no SHA-256 to check them against")
    target = cache_dir("gguf") / m.gguf_name
    converted = converted_dir(m.gguf_name, m.sha256)
    if not converted.exists() or damage(converted, m.sha256) is not None:  # the conversion will need the file
        assemble(paths, target, m.sha256)
    return Source(None, target, None, m.sha256)


def identity(src: Source) -> dict[str, str | None]:
    """Return ``{"sha256", "revision", "format"}`` of a resolved source (see ``weights_identity``)."""
    from outliers.fingerprint import file_sha256, folder_sha256, gguf_file_type

    if src.gguf is not None:
        return {
            "sha256": src.gguf_sha256 or file_sha256(src.gguf),
            "revision": None,
            "format": f"GGUF {gguf_file_type(src.gguf) or ''}".strip(),
        }
    if src.folder is not None:
        return {"sha256": folder_sha256(src.folder), "revision": None, "format": "folder"}
    snapshot = hub_snapshot(src.hub_id) if src.hub_id is not None else None
    if snapshot is None:
        return {"sha256": None, "revision": None, "format": "hub"}
    return {"sha256": folder_sha256(snapshot), "revision": snapshot.name, "format": "hub"}


def weights_identity(spec: str) -> dict[str, str | None]:
    """Return ``{"sha256", "revision", "format"}`` of the weights ``spec`` names, without loading them.

    ``sha256`` hashes the GGUF file (for built-ins made of parts, the
    published checksum of the joined file), or a folder's top-level files
    (weights, config and tokenizer together), or a hub model's cached
    snapshot; file hashes are cached (``outliers.fingerprint``). ``sha256`` is
    None for a hub model that is not in the local cache yet.
    """
    return identity(resolve(spec))


def provenance(ident: dict[str, str | None], dtype: str) -> str:
    """Return the line printed beside every number, e.g. "float32, dequantized from GGUF Q4_1"."""
    fmt = ident["format"] or ""
    if fmt.startswith("GGUF"):
        return f"{dtype}, dequantized from {fmt}"
    if fmt == "hub":
        return f"{dtype}, hub revision {ident['revision'] or 'unknown'}"
    return dtype
