"""How long building a Hadamard matrix takes, as a ratio to one float32 matmul of the same order, this run.

    python benchmarks/hadamard_build.py [--sizes 576,1536,8960] [--repeats 3]

The target (was a wall-clock limit inside a test): building the largest order the built-in models need
(8960, Qwen2.5-Coder-1.5B's MLP) costs less than one (n, n) @ (n, n) float32 matmul, the ceiling measured
beside it on the same machine. Median of ``--repeats`` cold builds (the cache cleared each time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from outliers.quant import hadamard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="576,1536,8960")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| n | construction | build s (median) | matmul s (median) | build / matmul |")
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        builds, mms = [], []
        a = torch.randn(n, n)
        for _ in range(args.repeats):
            hadamard._build.cache_clear()
            start = time.perf_counter()
            _, name = hadamard.hadamard_matrix(n)
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            a @ a
            mms.append(time.perf_counter() - start)
        b, m = statistics.median(builds), statistics.median(mms)
        print(f"| {n} | {name} | {b:.3f} | {m:.3f} | {b / m:.2f}x |")


if __name__ == "__main__":
    main()
