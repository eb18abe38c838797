"""GGUF files: checked, dequantized by transformers once, and cached as a float32 safetensors folder.

The cache is keyed by the GGUF's SHA-256 and the transformers version: the
second load of SmolLM2 takes a couple of seconds instead of ~25, and the
cached folder is also what bitsandbytes can be handed (transformers refuses
GGUF + bitsandbytes).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from outliers.cache import atomic_dir, cache_dir, heal, sha256_file
from outliers.errors import ModelFileError

__all__ = ["converted_dir", "check_gguf", "convert_gguf", "damage", "quiet_loading"]


def converted_dir(gguf_name: str, sha256: str) -> Path:
    # the installed version from package metadata: importing transformers would cost a study's plan seconds
    from importlib.metadata import version

    stem = Path(gguf_name).stem
    return cache_dir("models") / f"{stem}-{sha256[:16]}-tf{version('transformers')}"


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        GGUFReader(path)  # parses the header and maps every tensor: catches truncation
    except Exception as e:  # the reader raises ValueError, IndexError, struct.error...
        raise ModelFileError(f"GGUF file {path} is corrupt or truncated: {e}") from e


def convert_gguf(path: Path, sha256: str, *, progress: bool) -> Path:
    """Dequantize a GGUF once and save model + tokenizer as a float32 safetensors folder."""
    target = converted_dir(path.name, sha256)
    if target.exists():
        problem = damage(target, sha256)
        if problem is None:
            return target
        heal(target, problem)
    check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_loading(progress=progress, gguf=True):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelFileError(f"transformers could not load GGUF file {path}: {e}") from e
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild the
    # same class from a config without the GGUF quantization_config instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict(), assign=True)
    clean.tie_weights()
    with atomic_dir(target) as scratch, quiet_loading(progress=progress):
        clean.save_pretrained(scratch)
        tok.save_pretrained(scratch)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(scratch.iterdir())}
        manifest = {"gguf": str(path), "sha256": sha256, "files": files}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2))
    from outliers.fingerprint import record_sha256

    for name, facts in files.items():  # checking the folder later costs a stat per file
        if (target / name).exists():
            record_sha256(target / name, str(facts["sha256"]))
    return target


MANIFEST = "outliers_source.json"


def damage(folder: Path, sha256: str) -> str | None:
    """What is wrong with a converted folder, or None: every file its manifest lists, whole and unchanged.

    A file's hash is read from the file-facts cache while its size and mtime are unchanged (a stat),
    and computed again otherwise: a file truncated or overwritten after conversion is found.
    """
    from outliers.fingerprint import file_sha256

    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if "files" not in manifest:
            return "converted by an earlier version, without a list of its files to check"
        files = manifest["files"]
        if manifest.get("sha256") != sha256 or not isinstance(files, dict) or not files:
            return f"{MANIFEST} does not describe this conversion"
        for name, facts in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != facts["size"]:
                return f"{name} has {f.stat().st_size} bytes, {facts['size']} were written"
            if file_sha256(f) != facts["sha256"]:
                return f"{name} changed after conversion (SHA-256 differs)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def quiet_loading(*, progress: bool, gguf: bool = False) -> Iterator[None]:
    """Silence transformers' progress bars and info logs unless progress is wanted.

    ``gguf=True`` is for loads that dequantize a GGUF: transformers' converter
    draws a plain tqdm bar that no transformers setting reaches (tqdm reads
    TQDM_DISABLE once, at import), so while quiet such a load's stderr is
    swallowed; errors still arrive as exceptions. Other loads keep stderr.
    """
    if progress:
        yield
        return
    from transformers.utils import logging as tlog

    bars, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if gguf else contextlib.nullcontext():
            yield
    finally:
        if bars:
            tlog.enable_progress_bar()
        tlog.set_verbosity(verbosity)
