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

from outliers.cache import atomic_dir, cache_dir
from outliers.errors import ModelFileError

__all__ = ["converted_dir", "check_gguf", "convert_gguf", "quiet_loading"]


def converted_dir(gguf_name: str, sha256: str) -> Path:
    import transformers

    stem = Path(gguf_name).stem
    return cache_dir("models") / f"{stem}-{sha256[:16]}-tf{transformers.__version__}"


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
        return target
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
        (scratch / "outliers_source.json").write_text(json.dumps({"gguf": str(path), "sha256": sha256}, indent=2))
    return target


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
