"""Results in SQLite: one row per cell of the grid, each written in its own transaction.

A row is keyed by the cell's *place* in the grid (kind, model, corpus,
method, threshold) and carries the *fingerprint* of what it measured: the
weights' and the corpus' hashes, dtype, device, every setting its measure
says can change it and the package version (``studies.planning``). A row is
reused only while its fingerprint is the one the grid asks for now; a row
whose inputs changed is *stale*, recomputed by the next run and never
reported. The git commit of the code that computed a row is provenance:
it flags rows made by other code without invalidating them.

A study killed at any moment keeps every committed row (SQLite commits are
atomic).

``COLUMNS`` is the table every ``results.sqlite`` has had: the cell's place,
fingerprint, status and provenance, and the built-in measures' columns
(``ppl`` ... ``token_nll``) at their historical places. A measure that
declares other columns (``studies.measures``) gets them added after these,
as an older file gains the columns it lacks (``RESERVED``: the ones the store
fills itself, which no measure may declare). A ``BLOB`` column holds a
float32 array, zlib-compressed (per-token NLLs beside each perplexity).
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .columns import COLUMNS, RESERVED

__all__ = ["Store", "COLUMNS", "RESERVED"]


class Store:
    """``results.sqlite`` in a study's output folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        from .measures import measure_columns

        self.measured = measure_columns()  # filled from each row's measure, NULL where it has none
        self.columns = COLUMNS | {k: v for k, v in self.measured.items() if k not in COLUMNS}
        with self.conn:
            cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS cells ({cols})")
            have = {row[1] for row in self.conn.execute("PRAGMA table_info(cells)")}
            for name, sql_type in self.columns.items():
                if name not in have:
                    self.conn.execute(f"ALTER TABLE cells ADD COLUMN {name} {sql_type.split()[0]}")

    def record(
        self,
        key: str,
        fingerprint: str | None,
        cell: dict[str, Any],
        status: str,
        result: dict[str, Any] | None = None,
        *,
        error: str | None = None,
        version: str = "",
        commit: tuple[str | None, bool] = (None, False),
        provenance: dict[str, Any] | None = None,
        columns: dict[str, Any] | None = None,
    ) -> None:
        """Write one cell in its own transaction, replacing whatever stood at its place.

        ``result`` is stored as JSON; ``columns`` holds the values of its measure's columns (arrays for
        ``BLOB`` columns); every other measure column of the row is NULL.
        """
        values = dict.fromkeys(self.measured)
        for name, value in (columns or {}).items():
            if name not in values:
                raise KeyError(f"{name!r} is not a measure's column of {self.path}")
            if self.measured[name] == "BLOB" and value is not None:
                value = zlib.compress(np.asarray(value, dtype=np.float32).tobytes())
            values[name] = value
        row = {
            "key": key,
            "fingerprint": fingerprint,
            "study": cell["study"],
            "kind": cell["kind"],
            "model": cell["model"],
            "corpus": cell["corpus"],
            "method": cell["method"],
            "threshold": cell.get("threshold"),
            "status": status,
            "result": json.dumps(result or {}, default=str),
            "error": error,
            "version": version,
            "commit_sha": commit[0],
            "dirty": int(commit[1]),
            "provenance": json.dumps(provenance or {}),
            "finished_at": time.time(),
            **values,
        }
        with self.conn:
            self.conn.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )

    def frame(self):
        """Return every row as a pandas DataFrame (``result`` and ``provenance`` parsed; no token NLLs)."""
        import pandas as pd

        cols = [c for c, t in self.columns.items() if t.split()[0] != "BLOB"]
        df = pd.read_sql_query(f"SELECT {', '.join(cols)} FROM cells ORDER BY finished_at", self.conn)
        for col in ("result", "provenance"):
            df[col] = df[col].map(lambda s: json.loads(s) if s else {})
        return df

    def token_nll(self, key: str) -> np.ndarray | None:
        """Return the per-token NLLs stored with a cell, or None."""
        return self.array(key, "token_nll")

    def array(self, key: str, column: str) -> np.ndarray | None:
        """Return the float32 array a cell stored in a ``BLOB`` column, or None."""
        if self.columns.get(column) != "BLOB":
            raise KeyError(f"{column!r} is not a BLOB column of {self.path}")
        row = self.conn.execute(f"SELECT {column} FROM cells WHERE key = ?", (key,)).fetchone()
        if not row or row[0] is None:
            return None
        return np.frombuffer(zlib.decompress(row[0]), dtype=np.float32)

    def close(self) -> None:
        self.conn.close()
