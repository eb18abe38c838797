"""Every exact int8 GEMM backend on this machine: exact or not here, GOPS at SmolLM2's shapes, the choice.

Each backend is first checked bit for bit against the int64 product (``outliers.quant.gemm.verify``);
then each shape is timed interleaved over the backends, best of ``--repeats`` after a warm-up, with
fp32 ``torch.mm`` of the same shape as the ceiling of the float32 path. ``--write`` puts the table in
``docs/int8_backends.md`` under a heading for this CPU and environment (replacing that section if it is
there, keeping the others): one results page, one section per processor met.

    python benchmarks/int8_backends.py
    python benchmarks/int8_backends.py --write docs/int8_backends.md
    ONEDNN_MAX_CPU_ISA=AVX2 NUMBA_CPU_NAME=haswell python benchmarks/int8_backends.py --write docs/int8_backends.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from outliers.threads import configure_threads

configure_threads()  # as the CLIs do, before torch loads

import torch  # noqa: E402

from outliers.quant import gemm  # noqa: E402

ROWS = (1, 4, 16, 256, 2048)
SHAPES = gemm.SHAPES  # SmolLM2-135M's MLP: (in, out) = (576, 1536) and (1536, 576)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def measure(repeats: int) -> tuple[list[str], dict]:
    exact = {name: gemm.verify(name) for name in gemm.BACKENDS}
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in ROWS:
        for k, n in SHAPES:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            calls = {"fp32 mm": (torch.mm, x, w.t())}
            calls |= {name: (be.fn, a, b) for name, be in gemm.BACKENDS.items()}
            best = dict.fromkeys(calls, float("inf"))
            for f, p, q in calls.values():
                f(p, q)
            for _ in range(repeats):
                for name, (f, p, q) in calls.items():
                    t0 = time.perf_counter()
                    f(p, q)
                    best[name] = min(best[name], time.perf_counter() - t0)
            ops = 2 * m * k * n
            rows.append((m, k, n, {name: ops / s / 1e9 for name, s in best.items()}))
    return rows, exact


def table(rows: list, exact: dict) -> list[str]:
    names = ["fp32 mm", *gemm.BACKENDS]
    head = "| M | K | N | " + " | ".join(
        n + ("" if n == "fp32 mm" or exact[n] else " (INEXACT here: never chosen)") for n in names
    )
    lines = [head + " |", "|---|---|---|" + "---|" * len(names)]
    for m, k, n, gops in rows:
        lines.append(f"| {m} | {k} | {n} | " + " | ".join(f"{gops[x]:.1f}" for x in names) + " |")
    return lines


def section(rows: list, exact: dict, repeats: int) -> tuple[str, str]:
    facts = gemm.machine_facts()
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "NUMBA_CPU_NAME") if os.environ.get(k))
    title = f"## {facts['cpu']}: {' '.join(facts['flags']) or 'no AVX2/AVX-512/VNNI/AMX'}" + (f"; {env}" if env else "")
    c = gemm.choice(remeasure=True)
    body = [
        title,
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {_commit()}, {facts['threads']} threads, torch "
        f"{facts['torch']} (CPU capability {facts['torch_cpu_capability']}), best of {repeats} interleaved, GOPS "
        "(GFLOPS for fp32 mm), by `python benchmarks/int8_backends.py --write docs/int8_backends.md`"
        + (f" with {env}" if env else "")
        + ":",
        "",
        *table(rows, exact),
        "",
        f"Choice on this machine (`outliers env`): {c['large']} for more than {gemm.SMALL_ROWS} rows, "
        f"{c['small']} for {gemm.SMALL_ROWS} or fewer.",
        "",
    ]
    return title, "\n".join(body)


def write(path: Path, title: str, text: str) -> None:
    head = (
        "# Exact int8 GEMM backends, measured per processor\n\n"
        "Written by `benchmarks/int8_backends.py`; what the backends are and how one is chosen: "
        "[devices.md](devices.md#cpus-exact-int8-gemm-backends-chosen-by-measurement). Shared 2-core "
        "machines swing 2-5x from run to run: compare backends within one section, not across sections.\n\n"
    )
    old = path.read_text(encoding="utf-8") if path.exists() else head
    parts = re.split(r"(?m)^(?=## )", old)
    kept = [p for p in parts[1:] if p.splitlines()[0] != title]
    from outliers.cache import atomic_write

    atomic_write(path, parts[0] + "".join(p.rstrip("\n") + "\n\n" for p in [*kept, text]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", metavar="PATH", help="put this machine's section in this markdown page")
    args = p.parse_args(argv)
    rows, exact = measure(args.repeats)
    title, text = section(rows, exact, args.repeats)
    print(text)
    if args.write:
        write(Path(args.write), title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
