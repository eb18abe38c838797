"""What a number was computed from: file hashes, weights' identity and provenance, the code's commit.

A stored result is only reusable for the very inputs it measured. Hashing a
1.5B model's weights takes seconds, so file hashes are cached in
``$OUTLIERS_CACHE/file_facts.sqlite`` keyed by (real path, size, mtime): a
rerun costs a ``stat`` per file, and a file replaced by another (new size or
mtime) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outliers.cache import cache_dir, heal, sha256_file

__all__ = ["file_sha256", "folder_sha256", "gguf_file_type", "git_commit", "digest", "record_sha256"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS facts (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, name TEXT NOT NULL, value TEXT,
    PRIMARY KEY (path, size, mtime_ns, name))"""


def digest(obj: Any) -> str:
    """Return the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cached(path: str | os.PathLike, name: str, compute: Callable[[Path], str | None]) -> str | None:
    """Return ``compute(path)``, from the cache when the file's path, size and mtime are unchanged.

    A facts file that is not a database (truncated, overwritten, half-written) is moved aside and
    started anew: it only ever saves time.
    """
    key = _key(path, name)
    db = cache_dir() / "file_facts.sqlite"
    try:
        row = _lookup(db, key)
    except sqlite3.DatabaseError as e:
        heal(db, e)
        row = _lookup(db, key)
    if row is not None:
        return row[0]
    value = compute(Path(key[0]))
    remember(db, key, value)
    return value


def _lookup(db: Path, key: tuple) -> tuple[str | None] | None:
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.execute(_SCHEMA)
        return conn.execute("SELECT value FROM facts WHERE path=? AND size=? AND mtime_ns=? AND name=?", key).fetchone()
    finally:
        conn.close()


def remember(db: Path, key: tuple, value: str | None) -> None:
    """Store one fact; a database that fails now is healed and the fact stored in a fresh one."""
    for attempt in (0, 1):
        conn = sqlite3.connect(db, timeout=30)
        try:
            with conn:
                conn.execute(_SCHEMA)
                conn.execute("INSERT OR REPLACE INTO facts VALUES (?,?,?,?,?)", (*key, value))
            return
        except sqlite3.DatabaseError as e:
            if attempt:
                raise
            conn.close()
            heal(db, e)
        finally:
            conn.close()


def record_sha256(path: str | os.PathLike, sha256: str) -> None:
    """Record a file's SHA-256 computed while writing it, so that checking it later costs a ``stat``."""
    remember(cache_dir() / "file_facts.sqlite", _key(path, "sha256"), sha256)


def _key(path: str | os.PathLike, name: str) -> tuple[str, int, int, str]:
    """A fact's key: the file's real path, size and mtime, so a replaced file is never taken for the old one."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns, name)


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file (cached by path, size and mtime)."""
    digest = _cached(path, "sha256", sha256_file)
    assert digest is not None  # sha256_file always returns one
    return digest


def folder_sha256(folder: str | os.PathLike) -> str:
    """Return one hash over a model folder's top-level files (weights, config, tokenizer), by name."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return digest({p.name: file_sha256(p) for p in files})


def gguf_file_type(path: str | os.PathLike) -> str | None:
    """Return a GGUF's quantization type as llama.cpp names it (e.g. ``Q4_1``), or None (cached)."""
    return _cached(path, "gguf_file_type", _read_gguf_file_type)


def _read_gguf_file_type(path: Path) -> str | None:
    from gguf import GGUFReader, LlamaFileType  # parses every tensor's header: seconds for a big file

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def git_commit(where: str | os.PathLike | None = None) -> tuple[str | None, bool]:
    """Return ``(commit, dirty)`` of the git checkout holding ``where`` (this package by default).

    A dirty tree's commit reads ``SHA+dirty.HASH``, HASH being a hash of
    ``git diff HEAD``, so that two different sets of uncommitted changes are
    told apart. ``(None, False)`` when the code is not a git checkout (an
    installed wheel) or git is missing. Provenance only: results are never
    keyed by it.
    """
    where = Path(where or Path(__file__).resolve().parent)
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        diff = git("diff", "HEAD")
        if diff:
            return f"{commit}+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}", True
        return commit, False
    except (OSError, subprocess.SubprocessError):
        return None, False
