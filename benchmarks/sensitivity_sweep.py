"""What the replayed sensitivity sweep costs against the naive one, measured in one run, with identical numbers.

The naive sweep runs one full forward per unit; the replayed one records every
block's output once per batch and runs each unit from its first block
(``outliers.analysis.sensitivity``). Both score against reference log-probs made
once per batch. Rounds alternate the two (shared machines swing 2-5x: only ratios
inside one run mean anything); the ratio per round and its median are printed,
with the per-window sums compared bit for bit, the CPU and its flags. Both wall-clock and CPU seconds
(``time.process_time``, every thread of this process) are kept: beside other jobs on a shared machine the
CPU seconds say what the sweep itself cost, and the ratio is judged by them.

    python benchmarks/sensitivity_sweep.py                      # SmolLM2, absmax, blocks, 8 windows, 2 rounds
    python benchmarks/sensitivity_sweep.py --windows 4 --rounds 1 --write docs/sensitivity_results.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as the CLI does

import numpy as np  # noqa: E402
import torch  # noqa: E402

from outliers.analysis.sensitivity import sensitivity  # noqa: E402
from outliers.data.corpus import encode_corpus, load_corpus  # noqa: E402
from outliers.eval.windows import PerplexitySettings  # noqa: E402
from outliers.models.load import load_model  # noqa: E402

TARGET = 0.6  # the replayed sweep should cost at most this share of the naive one


def _cpu() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name}; {', '.join(shown) or 'no AVX2'}; {torch.get_num_threads()} torch threads"


def measure(args: argparse.Namespace) -> int:
    model, tokenizer, info = load_model(args.model, progress=False)
    ids = encode_corpus(tokenizer, load_corpus(args.corpus))
    settings = PerplexitySettings(window=args.window, max_windows=args.windows, batch_size=args.batch_size)
    kw = dict(unit=args.unit, predictors=False, mixed=False, progress=False, model_name=args.model)
    print(
        f"# {info.name} ({info.weights}), {args.method}, one {args.unit} at a time, {args.windows} windows of "
        f"{args.window}, batch {args.batch_size}; {_cpu()}"
    )
    times: dict[str, list[float]] = {"replay": [], "naive": []}
    cpu: dict[str, list[float]] = {"replay": [], "naive": []}
    results = {}
    for r in range(args.rounds):
        for how in ("replay", "naive") if r % 2 == 0 else ("naive", "replay"):
            started, started_cpu = time.perf_counter(), time.process_time()
            results[how] = sensitivity(model, ids, settings, args.method, replay=how == "replay", **kw)
            times[how].append(time.perf_counter() - started)
            cpu[how].append(time.process_time() - started_cpu)
        print(
            f"# round {r + 1}: replayed {times['replay'][-1]:.1f} s wall, {cpu['replay'][-1]:.1f} s CPU; "
            f"naive {times['naive'][-1]:.1f} s wall, {cpu['naive'][-1]:.1f} s CPU"
        )
    a, b = results["replay"], results["naive"]
    assert a.window_kl is not None and b.window_kl is not None
    assert a.window_nll is not None and b.window_nll is not None
    same = bool(np.array_equal(a.window_kl, b.window_kl) and np.array_equal(a.window_nll, b.window_nll))
    wall = [x / y for x, y in zip(times["replay"], times["naive"], strict=True)]
    cpu_ratios = [x / y for x, y in zip(cpu["replay"], cpu["naive"], strict=True)]
    median = statistics.median(cpu_ratios)
    med = statistics.median
    print("")
    print(
        "| sweep | batch forwards | wall s (median) | CPU s (median) | CPU ratio to naive (median; range) "
        "| wall ratio |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| naive: one full forward per unit | {b.seconds['forwards']} | {med(times['naive']):.1f} | "
        f"{med(cpu['naive']):.1f} | 1 | 1 |"
    )
    print(
        f"| replayed from each unit's first block | {a.seconds['forwards']} | {med(times['replay']):.1f} | "
        f"{med(cpu['replay']):.1f} | {median:.3f} ({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}) | {med(wall):.3f} |"
    )
    print("")
    print(
        f"# per-window KL and NLL sums of every unit identical between the two: {same}; "
        f"target: CPU ratio <= {TARGET} ({'met' if median <= TARGET else 'NOT met'})"
    )
    print(f"# whole-model KL {a.whole['kl_vs_ref']:.5f}; most sensitive: {', '.join(a.ranking[:5])}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--method", default="absmax")
    p.add_argument("--unit", default="block", choices=("block", "linear", "kind"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write", metavar="PATH", help="also write the printed table to this markdown page")
    args = p.parse_args(argv)
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
    command = " ".join(["python benchmarks/sensitivity_sweep.py", *(a for a in (argv or sys.argv[1:]))])
    lines = [line[2:] if line.startswith("# ") else line for line in buffer.getvalue().splitlines()]
    page = (
        "# Sensitivity sweep cost, measured\n\n"
        f"Written by `{command}` at commit {commit or 'unknown'} on {time.strftime('%Y-%m-%d')}. "
        "The model is a 4-bit GGUF dequantized to float32. Timings on a shared machine swing 2-5x; "
        "the ratio is measured within one run.\n\n" + "\n\n".join(_paragraphs(lines)) + "\n"
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


if __name__ == "__main__":
    sys.exit(main())
