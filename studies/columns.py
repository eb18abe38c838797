"""The columns every ``results.sqlite`` has (``studies.store``), apart so that measures can read them.

``COLUMNS``: the cell's place, fingerprint, status and provenance, and the
built-in measures' columns at their historical places. ``RESERVED``: the ones
the store fills itself, which no measure may declare (``studies.measures``).
This module imports nothing from the studies package.
"""

from __future__ import annotations

__all__ = ["COLUMNS", "RESERVED"]

COLUMNS = {  # name -> SQL type; a store from an older version gains the missing ones (NULL: stale)
    "key": "TEXT PRIMARY KEY",  # place in the grid
    "fingerprint": "TEXT",  # what the cell measured
    "study": "TEXT NOT NULL",
    "kind": "TEXT NOT NULL",  # the measure (studies.measures): 'perplexity', 'outliers', ...
    "model": "TEXT NOT NULL",
    "corpus": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",  # 'fp32' for the baseline
    "threshold": "REAL",
    "status": "TEXT NOT NULL",  # 'done' or 'failed'
    "ppl": "REAL",  # the built-in measures' columns (studies.measures)
    "n_tokens": "INTEGER",
    "seconds": "REAL",
    "tokens_per_s": "REAL",
    "result": "TEXT",  # every field of the result, JSON
    "error": "TEXT",
    "version": "TEXT NOT NULL",
    "commit_sha": "TEXT",  # git commit of the code that computed the row (None outside a checkout)
    "dirty": "INTEGER",  # 1 when that checkout had uncommitted changes
    "provenance": "TEXT",  # weights' provenance, library versions, token ids' hash: JSON
    "finished_at": "REAL NOT NULL",
    "token_nll": "BLOB",  # per-token NLLs, float32, zlib
}
RESERVED = tuple(c for c in COLUMNS if c not in ("ppl", "n_tokens", "seconds", "tokens_per_s", "token_nll"))
