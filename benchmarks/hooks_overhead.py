"""Forward time of a model with and without ``outliers.capture``, interleaved in one run.

    python benchmarks/hooks_overhead.py            # SmolLM2, 4 x 512 tokens, 5 rounds
    python benchmarks/hooks_overhead.py --profile  # plus the top ops inside one captured forward

Targets: the paper's statistics (``moments=False``) add at most 5 % to a forward; the kurtosis and
∞-norm sums (``moments=True``, the default) at most 5 % more. Three estimates, since shared machines
swing 2-5x: best round against best round; the median over rounds of each config's time over the
plain forward's of the same round; and the seconds spent inside the statistics updates of one more
pass, against the rest of that pass (the work the hooks add, whatever the neighbours do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as `outliers scan` does: idle OpenMP threads sleep (outliers.threads)

import torch  # noqa: E402

import outliers  # noqa: E402
from outliers.analysis.hooks import capture  # noqa: E402


@contextmanager
def timed_hooks(spent: list[float] | None) -> Iterator[None]:
    """With a list: time every statistics update and per-forward flush the capture hooks make, into it."""
    if spent is None:
        yield
        return
    from outliers.analysis.stats import OutlierStats

    originals = {name: getattr(OutlierStats, name) for name in ("update", "flush_union")}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(OutlierStats, name, timed(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(OutlierStats, name, fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)

    model, tok, info = outliers.load_model(args.model, progress=False)
    ids = outliers.encode_corpus(tok, outliers.load_corpus("builtin"))
    x = ids[: args.batch * args.window].view(args.batch, args.window)
    configs = {"plain forward": (None, False)}
    for points in ("attn,ffn", "attn,ffn,residual"):
        configs[f"capture {points}, no moments"] = (points, False)
        configs[f"capture {points}, with moments"] = (points, True)

    def run(points, moments, inside=None):
        with torch.inference_mode():
            start = time.perf_counter()
            if points is None:
                model(input_ids=x)
            else:
                with capture(model, points, moments=moments), timed_hooks(inside):
                    model(input_ids=x)
            return time.perf_counter() - start

    for config in configs.values():  # warm-up: kernels compile, caches fill
        run(*config)
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            times[name].append(run(*config))
    base = min(times["plain forward"])
    # the hooks' own seconds inside one more pass per config, against that pass's forward
    inside = {}
    for name, config in configs.items():
        if config[0] is not None:
            spent: list[float] = []
            total = run(*config, inside=spent)
            inside[name] = sum(spent) / (total - sum(spent))
    print(
        f"\n{info.name}, {args.batch} x {args.window} tokens, {torch.get_num_threads()} threads, "
        f"best and median of {args.rounds} interleaved rounds\n"
    )
    print("| config | best s | median s | overhead (best) | (median of paired rounds) | (time in the hooks) |")
    print("|---|---|---|---|---|---|")
    plain = times["plain forward"]
    for name, ts in times.items():
        paired = statistics.median(t / p for t, p in zip(ts, plain, strict=True)) - 1
        hooks = f"{inside[name]:+.1%}" if name in inside else ""
        print(
            f"| {name} | {min(ts):.3f} | {statistics.median(ts):.3f} | {min(ts) / base - 1:+.1%} | {paired:+.1%} "
            f"| {hooks} |"
        )
    if args.profile:
        from torch.profiler import profile

        with torch.inference_mode(), profile() as prof, capture(model, "attn,ffn"):
            model(input_ids=x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
