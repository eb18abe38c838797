"""Where the toolkit keeps what it derives once: converted models, token ids.

``OUTLIERS_CACHE`` moves the whole cache; it is read at call time, never at
import, so tests and users can point it elsewhere per process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["cache_dir", "sha256_file", "atomic_dir"]


def cache_dir(*parts: str) -> Path:
    """Return ``$OUTLIERS_CACHE/parts...`` (default ``~/.cache/outliers``), created."""
    root = os.environ.get("OUTLIERS_CACHE") or Path.home() / ".cache" / "outliers"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``target`` only if the block succeeds.

    A process killed half-way leaves a stray ``.tmp-*`` folder, never a
    half-written ``target`` that a later run would trust.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield scratch
        if target.exists():  # another process finished first; theirs is as good
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
