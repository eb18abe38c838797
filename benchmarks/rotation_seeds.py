"""How much a randomized Hadamard rotation's seed moves a method's error: KL vs the float model over seeds.

Each seed draws the rotation's random signs (``Transform(rotate="hadamard", seed=...)``); every row is scored
against the unrotated float model on the same windows (``outliers.eval.rows``), the float model's forward
run once. Per method: the KL without rotation, then over the seeds the mean, standard deviation, minimum and
maximum, a 95 % t interval and a 95 % bootstrap interval (10,000 resamples of the seeds) for the mean, and
beside them the 95 % interval over windows of seed 0 alone (what one run reports).

The rotation is ``Q = diag(signs) · H / sqrt(n)`` (``outliers.quant.transforms.Rotation``; QuaRot's order):
the seed changes which channels each rotated feature mixes. (Until this benchmark found it, the signs came
after the Hadamard, ``H · diag(signs)``: they then only flipped the signs of the rotated input's and weight's
columns together, which every symmetric quantizer undoes, and every seed gave the same numbers bit for bit.)

    python benchmarks/rotation_seeds.py                                  # SmolLM2, 8 windows of 512, 10 seeds
    python benchmarks/rotation_seeds.py --windows 4 --write docs/rotation_seeds_results.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as the CLI does

import numpy as np  # noqa: E402
from results_page import run_and_write  # noqa: E402
from scipy import stats  # noqa: E402

from outliers.data.corpus import encode_corpus, load_corpus  # noqa: E402
from outliers.eval.rows import Row, RowEvaluator, row_label  # noqa: E402
from outliers.eval.windows import PerplexitySettings  # noqa: E402
from outliers.models.load import load_model  # noqa: E402
from outliers.quant.transform_spec import Transform  # noqa: E402


def intervals(v: list[float], resamples: int = 10_000) -> tuple[tuple[float, float], tuple[float, float]]:
    """The mean's 95 % t interval and its 95 % bootstrap (percentile) interval over ``v``."""
    a = np.asarray(v, dtype=float)
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
    means = np.random.default_rng(0).choice(a, size=(resamples, len(a))).mean(1)
    return (a.mean() - half, a.mean() + half), tuple(np.percentile(means, [2.5, 97.5]))  # type: ignore[return-value]


def measure(args: argparse.Namespace) -> int:
    import psutil

    print(f"# {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    model, tokenizer, _ = load_model(args.model, progress=False)
    ids = encode_corpus(tokenizer, load_corpus(args.corpus))
    settings = PerplexitySettings(window=args.window, max_windows=args.windows, batch_size=args.batch_size)
    ev = RowEvaluator(model, ids, settings, progress=False, model_name=args.model, corpus_name=args.corpus)
    methods, seeds = args.methods.split(","), list(range(args.seeds))
    started = time.perf_counter()
    plain = {m: ev.evaluate(Row(m)).result for m in methods}
    kl: dict[str, list[float]] = {m: [] for m in methods}
    dppl: dict[str, list[float]] = {m: [] for m in methods}
    first_ci: dict[str, tuple[float, float] | None] = {}
    for seed in seeds:  # one rotated copy per seed, held for its methods
        for m in methods:
            r = ev.evaluate(Row(m, Transform(rotate="hadamard", seed=seed))).result
            kl[m].append(r.kl_vs_ref)  # type: ignore[arg-type]
            dppl[m].append(r.delta_ppl_pct)  # type: ignore[arg-type]
            first_ci.setdefault(m, r.kl_vs_ref_ci95)
        print(f"# seed {seed} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    ev.release()
    elapsed = time.perf_counter() - started
    n_tokens = next(iter(plain.values())).n_tokens
    print(
        f"# {args.model}, {args.windows} windows of {args.window} tokens ({n_tokens} scored) of {args.corpus!r}; "
        f"seeds {seeds[0]}..{seeds[-1]}; {len(methods) * (len(seeds) + 1) + 1} rows in {elapsed:.0f} s"
    )
    print("# KL(float || row) in nats per token; Δppl: the perplexity change against the float model, %")
    print(
        "| method | KL, no rotation | KL mean over seeds | sd | min | max | mean 95 % t | mean 95 % bootstrap "
        "| seed 0: 95 % over windows | sd / mean | Δppl % mean | Δppl % sd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        v = kl[m]
        (tlo, thi), (blo, bhi) = intervals(v)
        ci = first_ci[m]
        window = f"[{ci[0]:.5f}, {ci[1]:.5f}]" if ci else ""
        mean, sd = statistics.fmean(v), statistics.stdev(v)
        print(
            f"| {row_label(Row(m))} | {plain[m].kl_vs_ref:.5f} | {mean:.5f} | {sd:.5f} | {min(v):.5f} | {max(v):.5f} "
            f"| [{tlo:.5f}, {thi:.5f}] | [{blo:.5f}, {bhi:.5f}] | {window} | {sd / mean:.3f} "
            f"| {statistics.fmean(dppl[m]):.3f} | {statistics.stdev(dppl[m]):.3f} |"
        )
    print("\n# KL per seed")
    print("| seed | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for i, seed in enumerate(seeds):
        print(f"| {seed} | " + " | ".join(f"{kl[m][i]:.5f}" for m in methods) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--methods", default="llm.int8,absmax-vector,mxfp4", help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--write", metavar="PATH", help="also write the printed tables to this markdown page")
    args = p.parse_args(argv)
    return run_and_write(
        measure,
        args,
        argv,
        "rotation_seeds.py",
        "Rotation seeds, measured",
        "What the seed is and how to cross seeds in a study: [Microscaling and NVFP4](formats.md#rotation-seeds). "
        "The model is a 4-bit GGUF dequantized to float32.",
    )


if __name__ == "__main__":
    sys.exit(main())
