"""Results in SQLite: one row per finished cell, each written in its own transaction.

A study killed at any moment keeps every committed row (SQLite commits are
atomic); a rerun skips the cells whose key is already ``done``. Keys hash the
cell's settings and the package version, so a changed setting or a new
release recomputes instead of reusing a stale number.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    kind TEXT NOT NULL,          -- 'perplexity' or 'outliers'
    model TEXT NOT NULL,
    corpus TEXT NOT NULL,
    method TEXT NOT NULL,        -- 'fp32' for the baseline
    threshold REAL,
    status TEXT NOT NULL,        -- 'done' or 'failed'
    ppl REAL,
    n_tokens INTEGER,
    seconds REAL,
    tokens_per_s REAL,
    result TEXT,                 -- every field of the result, JSON
    error TEXT,
    version TEXT NOT NULL,
    finished_at REAL NOT NULL
)
"""


class Store:
    """``results.sqlite`` in a study's output folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        with self.conn:
            self.conn.execute(SCHEMA)

    def done_keys(self) -> set[str]:
        return {k for (k,) in self.conn.execute("SELECT key FROM cells WHERE status = 'done'")}

    def record(self, key: str, cell: dict[str, Any], status: str, result: dict[str, Any] | None = None,
               error: str | None = None, version: str = "") -> None:
        """Write one cell in its own transaction (replacing an earlier failure of the same key)."""
        r = result or {}
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, cell["study"], cell["kind"], cell["model"], cell["corpus"], cell["method"],
                 cell.get("threshold"), status, r.get("ppl"), r.get("n_tokens"), r.get("seconds"),
                 r.get("tokens_per_s"), json.dumps(r, default=str), error, version, time.time()))

    def frame(self):
        """Return every row as a pandas DataFrame (``result`` parsed)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM cells ORDER BY finished_at", self.conn)
        df["result"] = df["result"].map(lambda s: json.loads(s) if s else {})
        return df

    def close(self) -> None:
        self.conn.close()
