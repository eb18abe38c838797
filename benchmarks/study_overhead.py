"""What a study costs beyond its evaluations: one 8-threshold study vs eight single `outliers eval` runs.

Prints, from one run: the study's wall time, the sum of its cells' evaluation
seconds, and the wall time of eight separate `outliers eval --method llm.int8
--threshold T` processes (each loads the model and tokenizes again).
Target: study wall <= 1.1 x (eight single runs' evaluation time), and far below
eight full runs.

    python benchmarks/study_overhead.py             # SmolLM2, 4 windows x 512
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args(argv)
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
        start = time.perf_counter()
        run_study(cfg, tmp, progress=False)
        study_wall = time.perf_counter() - start
        rows = Store(tmp).frame()
        cells = rows[rows.method != "fp32"]
        study_eval = float(cells.seconds.sum())
        singles_wall, singles_eval = 0.0, 0.0
        for t in THRESHOLDS:
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
    print(f"\n{args.model}, llm.int8 at {n} thresholds, {args.windows} windows x 512 each\n")
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| study wall time ({n} cells + fp32 baseline, one load, one tokenization) | {study_wall:.1f} |")
    print(f"| study: evaluation seconds of its {n} int8 cells | {study_eval:.1f} |")
    print(f"| {n} single `outliers eval` runs: evaluation seconds | {singles_eval:.1f} |")
    print(f"| {n} single `outliers eval` runs: wall time | {singles_wall:.1f} |")
    base = float(rows[rows.method == "fp32"].seconds.sum())
    print(
        f"\nstudy wall / single runs' evaluation time: {study_wall / singles_eval:.2f} "
        f"(includes the fp32 baseline's {base:.1f} s, which the single runs do not compute)"
    )
    print(f"study wall without the baseline / single runs' evaluation time: {(study_wall - base) / singles_eval:.2f}")
    print(f"study wall / single runs' wall time: {study_wall / singles_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
