"""Where the toolkit keeps what it derives once: converted models, token ids.

``OUTLIERS_CACHE`` moves the whole cache; it is read at call time, never at
import, so tests and users can point it elsewhere per process.

Everything written to a shared place goes through ``atomic_path``,
``atomic_file``, ``atomic_write`` or ``atomic_dir``: it is written under a
unique ``.tmp-NAME-*`` name in the target's own folder and moved into place
with ``os.replace``, so a reader sees the old target or the whole new one,
never a half-written file, and two processes writing the same target at once
both succeed and leave one valid copy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "cache_dir",
    "sha256_file",
    "atomic_path",
    "atomic_file",
    "atomic_write",
    "atomic_dir",
    "save_csv",
    "save_figure",
    "heal",
]


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


def _scratch(target: Path, *, folder: bool) -> Path:
    """Create and return a new empty file/folder ``.tmp-NAME-RANDOM[SUFFIX]`` next to ``target``.

    Created with mode 0o666/0o777 less the umask (not ``tempfile``'s 0o600/0o700),
    so what is moved into place has the permissions a plain ``open`` would give.
    The file keeps ``target``'s suffix, for writers that go by it (``np.save``,
    ``savefig``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tail = "" if folder else target.suffix
    while True:
        scratch = target.with_name(f".tmp-{target.name}-{secrets.token_hex(6)}{tail}")
        try:
            if folder:
                os.mkdir(scratch, 0o777)
            else:
                os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return scratch
        except FileExistsError:
            continue


def heal(path: str | os.PathLike, problem: object) -> Path | None:
    """Move a cache file or folder that failed to read or verify out of the way; return where it went.

    The damaged copy is kept beside it as ``.damaged-NAME-RANDOM`` (for a bug report; never read
    again; only the latest is kept), so the caller can rebuild ``path`` as if it had never existed.
    One line on stderr names it: a cache that heals silently would hide a failing disk. Returns None when ``path`` was
    already gone (another process healed it first).
    """
    path = Path(path)
    for old in path.parent.glob(f".damaged-{path.name}-*"):  # keep one damaged copy, not one per heal
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    aside: Path | None = path.with_name(f".damaged-{path.name}-{secrets.token_hex(4)}")
    assert aside is not None
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    except OSError:
        # a folder onto a name that exists, a read-only parent...: remove it instead, the rebuild needs the name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        aside = None
    print(
        f"outliers: warning: cache {path} was damaged ({_one_line(problem)}); "
        + (f"moved aside to {aside.name} and rebuilt" if aside else "removed and rebuilt"),
        file=sys.stderr,
        flush=True,
    )
    return aside


def _one_line(problem: object) -> str:
    text = f"{type(problem).__name__}: {problem}" if isinstance(problem, BaseException) else str(problem)
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of a new empty scratch file that replaces ``target`` if the block succeeds.

    For writers that want a path (``np.save``, ``torch.save``, ``savefig``): the
    block writes the yielded path; on normal exit it is moved onto ``target``
    with ``os.replace`` (the last of several concurrent writers wins; each copy is
    whole), on any exception it is removed and ``target`` is left as it was.
    """
    target = Path(target)
    scratch = _scratch(target, folder=False)
    try:
        yield scratch
        os.replace(scratch, target)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Yield an open scratch file (``mode`` "wb" or "w") that replaces ``target`` if the block succeeds.

    ``open_kwargs`` go to ``open`` (e.g. ``encoding="utf-8"`` for "w"). The file
    is closed before it is moved into place, so it is complete when ``target``
    appears; on any exception it is removed and ``target`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(target) as scratch, open(scratch, mode, **open_kwargs) as f:
        yield f


def atomic_write(target: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (str is encoded with ``encoding``) to ``target`` atomically; return ``target``."""
    with atomic_file(target, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(target)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``target`` only if the block succeeds.

    A process killed half-way leaves a stray ``.tmp-*`` folder, never a
    half-written ``target`` that a later run would trust. ``os.replace`` cannot
    move a folder onto a non-empty one: when another process put ``target``
    there first, it was complete (it got there the same way), so ours is
    discarded and the block still ends normally; theirs is as good.
    """
    target = Path(target)
    scratch = _scratch(target, folder=True)
    try:
        yield scratch
        try:
            os.replace(scratch, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
            shutil.rmtree(scratch, ignore_errors=True)  # lost the race
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def save_csv(df: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame to ``path`` as CSV (no index), atomically; return the path."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure to ``path`` (format from its suffix), atomically; return the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)
