"""Run a benchmark's ``measure(args)`` and, with ``--write PATH``, keep what it printed as a results page.

The page gives the command (without ``--write``), the commit and the date above the printed text: ``# ``
notes become paragraphs and runs of table lines stay tables.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["run_and_write"]


def run_and_write(
    measure: Callable[[Any], int], args: Any, argv: list[str] | None, script: str, title: str, intro: str
) -> int:
    """``measure(args)``; where ``args.write`` names a page, also write its printed text there."""
    if not args.write:
        return measure(args)
    buffer, terminal = io.StringIO(), sys.stdout

    class Tee(io.StringIO):
        def write(self, s: str) -> int:
            terminal.write(s)
            return buffer.write(s)

    with contextlib.redirect_stdout(Tee()):
        code = measure(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([f"python benchmarks/{script}", *(a for a in given if a not in ("--write", args.write))])
    lines = [line[2:] if line.startswith("# ") else line for line in buffer.getvalue().splitlines()]
    page = (
        f"# {title}\n\nWritten by `{command}` at commit {commit or 'unknown'} on {time.strftime('%Y-%m-%d')}. "
        f"{intro}\n\n" + "\n\n".join(_paragraphs(lines)) + "\n"
    )
    from outliers.cache import atomic_write

    atomic_write(args.write, page)
    return code


def _paragraphs(lines: list[str]) -> list[str]:
    """Table lines together, every other line its own paragraph."""
    out: list[str] = []
    for line in lines:
        if not line:
            continue
        if line.startswith("|") and out and out[-1].startswith("|"):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out
