"""What a study costs beyond its evaluations: one 8-threshold study against the sum of its cells' work.

Prints, from one run: the study's wall time; the evaluation seconds of its
cells (the fp32 baseline and the eight llm.int8 cells) and of the reference
work their agreement metrics need (the float model's head over its kept
states, and the KL / top-1 sums: ``ref_seconds``), counted as cells; what is
left (imports, one load, one tokenization, one quantization re-thresholded per
cell, fingerprints, SQLite), with the imports the study made timed apart in a
fresh interpreter (a process pays them once, whatever it runs); and, for
comparison, eight separate `outliers eval --method llm.int8 --threshold T`
processes (each loads the model and tokenizes again). Target (issue 18): study
wall <= 1.05 x (cells + reference work).

    python benchmarks/study_overhead.py             # SmolLM2, 4 windows x 512
    python benchmarks/study_overhead.py --windows 8 --no-singles
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THRESHOLDS = (0, 1, 2, 3, 4, 6, 8, 16)


def cold_import_seconds(modules: list[str]) -> float:
    """Seconds a fresh interpreter takes to import ``modules`` (those the study imported: torch, transformers...).

    Any evaluation in a fresh process pays them once; the study's own cost is what is left beside them.
    """
    names = [m for m in modules if not m.startswith("_") and "." not in m or m.startswith("transformers.models.")]
    code = (
        "import importlib, sys, time\n"
        "start = time.perf_counter()\n"
        f"for m in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception:\n"  # a module that only imports inside its package's context
        "        pass\n"
        "print(time.perf_counter() - start)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--no-singles", action="store_true", help="skip the eight single `outliers eval` runs")
    args = p.parse_args(argv)
    from outliers.threads import configure_threads

    configure_threads()  # as the command lines do, before torch loads
    from studies.config import parse_config
    from studies.runner import run_study
    from studies.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            {
                "study": {
                    "name": "overhead",
                    "models": [args.model],
                    "methods": ["llm.int8"],
                    "thresholds": list(THRESHOLDS),
                    "window": 512,
                    "max_windows": args.windows,
                }
            }
        )
        before = set(sys.modules)
        start = time.perf_counter()
        run_study(cfg, tmp, progress=False)
        study_wall = time.perf_counter() - start
        imports = cold_import_seconds(sorted(set(sys.modules) - before))
        rows = Store(tmp).frame()
        cells = rows[rows.method != "fp32"]
        study_eval = float(cells.seconds.sum())
        base = float(rows[rows.method == "fp32"].seconds.sum())
        ref = float(sum(r.get("ref_seconds") or 0.0 for r in rows.result))
        singles_wall, singles_eval = 0.0, 0.0
        for t in () if args.no_singles else THRESHOLDS:
            out = Path(tmp) / f"t{t}.json"
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "outliers.cli",
                    "eval",
                    "--model",
                    args.model,
                    "--method",
                    "llm.int8",
                    "--threshold",
                    str(t),
                    "--max-windows",
                    str(args.windows),
                    "--quiet",
                    "--json",
                    str(out),
                ],
                check=True,
                capture_output=True,
            )
            singles_wall += time.perf_counter() - start
            singles_eval += json.loads(out.read_text())["seconds"]
    n = len(THRESHOLDS)
    work = study_eval + base + ref
    print(f"\n{args.model}, llm.int8 at {n} thresholds, {args.windows} windows x 512 each\n")
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| study wall time ({n} cells + fp32 baseline, one load, one tokenization) | {study_wall:.1f} |")
    print(f"| evaluation: fp32 baseline | {base:.1f} |")
    print(f"| evaluation: {n} int8 cells | {study_eval:.1f} |")
    print(f"| reference work for the agreement metrics (head over kept states, KL, top-1) | {ref:.1f} |")
    print(f"| the rest: imports, load, tokenization, quantization, fingerprints, SQLite | {study_wall - work:.1f} |")
    print(f"| of which the imports (torch, transformers, ...: cold, in a fresh process) | {imports:.1f} |")
    if not args.no_singles:
        print(f"| {n} single `outliers eval` runs: evaluation seconds | {singles_eval:.1f} |")
        print(f"| {n} single `outliers eval` runs: wall time | {singles_wall:.1f} |")
    print(f"\nstudy wall / (cells + reference work): {study_wall / work:.3f} (target <= 1.05)")
    print(
        f"the same without the process's imports, which any evaluation pays once: {(study_wall - imports) / work:.3f}"
    )
    if not args.no_singles:
        print(f"study wall / single runs' wall time: {study_wall / singles_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
