"""Whole-model evaluation speed on CPU: fp32 vs our int8 methods vs bitsandbytes, against a measured ceiling.

Every configuration runs on the same windows, warmed up with one batch, then
interleaved over several rounds (shared machines swing 2-5x: only ratios inside
one run mean anything; the table takes each row's best round). Per model it
prints tokens/s and ratios, the **ceiling** (the speed-up over fp32 if every
quantized linear cost only its int8 GEMM; ``benchmarks/speed_parts.py`` says
how each term is timed; one per round, each from one hook-timed fp32 pass, and
their median), llm.int8's share of it (best round, and the median of each
round's pair with the fp32 pass before it), and where llm.int8's time goes.

    python benchmarks/eval_speed.py                        # SmolLM2, 8 windows x 512, 2 rounds
    python benchmarks/eval_speed.py --models installed --rounds 3 --no-transforms
    python benchmarks/eval_speed.py --profile              # plus torch.profiler's table of one batch

The rows after a Hadamard rotation carry its online cost: every quantized linear's
input is rotated on the fly (``outliers.quant.transforms``; no earlier weight absorbs
it), so "fp32 after hadamard" against fp32 is that cost alone.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections import defaultdict
from dataclasses import replace

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as the CLI does: idle OpenMP threads sleep (outliers.threads)

import torch  # noqa: E402
from speed_parts import (  # noqa: E402
    PARTS,
    backend_seconds,
    ceiling,
    int8_parts,
    isolated_gemms,
    machine_facts,
    timed_linears,
)

import outliers  # noqa: E402
from outliers.arch.registry import quantize_skip  # noqa: E402
from outliers.eval.rows import Row, RowEvaluator  # noqa: E402
from outliers.eval.windows import PerplexitySettings  # noqa: E402
from outliers.quant import gemm  # noqa: E402

INT8, HEAD = "ours llm.int8 t=6", "ours llm.int8 t=6, int8 lm_head"


def bnb_model(folder: str, threshold: float):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold),
    )


def model_names(arg: str, max_mb: float) -> list[str]:
    """``installed``: every installed causal built-in of at most ``max_mb`` of packaged weights."""
    if arg != "installed":
        return [n.strip() for n in arg.split(",") if n.strip()]
    from outliers.models.builtin import BUILTIN_MODELS
    from outliers.models.packaged import package_dir

    names = []
    for m in BUILTIN_MODELS.values():
        paths = [(d / f.path) if (d := package_dir(f.module)) else None for f in m.files]
        if m.kind != "causal" or not all(p is not None and p.exists() for p in paths):
            continue
        mb = sum(p.stat().st_size for p in paths if p is not None) / 2**20
        if mb > max_mb:
            print(f"skipping {m.name}: {mb:.0f} MB of packaged weights > --max-mb {max_mb:g}", file=sys.stderr)
            continue
        names.append(m.name)
    return names


def configs_of(model, ids, args) -> tuple[dict, dict[str, list[str]], RowEvaluator, dict[str, Row]]:
    """The models to time, the names of the linears each int8 configuration quantizes, and the row evaluator
    (outliers.eval.rows) that made them, with their rows."""
    from outliers.quant.transforms import Transform

    ev = RowEvaluator(model, ids, settings_of(args), progress=False)  # calibration after the timed windows
    rows = {
        "ours absmax-vector t=0": Row("absmax-vector", threshold=0.0),
        INT8: Row("llm.int8", threshold=6.0),
        HEAD: Row("llm.int8", threshold=6.0, skip=quantize_skip(model, True)),
    }
    if not args.no_transforms:
        rows |= {
            "fp32 after hadamard": Row("fp32", Transform(rotate="hadamard")),
            "ours llm.int8 t=6 after hadamard": Row("llm.int8", Transform(rotate="hadamard"), 6.0),
            "ours smoothquant (absmax-vector after smooth 0.5)": Row("absmax-vector", Transform(smooth=0.5), 0.0),
        }
    configs, replaced = {"fp32": model}, {}
    for name, row in rows.items():  # each kept here past the evaluator's one-at-a-time hold: rounds interleave them
        prepared = ev.prepare(row)
        configs[name] = prepared.model
        if prepared.report is not None:
            replaced[name] = prepared.report.replaced
    if not args.no_bnb:
        try:
            for t in (6.0, 0.0):
                configs[f"bitsandbytes t={t:g}"] = bnb_model(model.name_or_path, t)
        except ImportError:
            print("bitsandbytes not installed: skipping it", file=sys.stderr)
    return configs, replaced, ev, rows


def settings_of(args):
    return PerplexitySettings(window=args.window, max_windows=args.windows, batch_size=args.batch_size)


def bench(name: str, args) -> None:
    model, tok, info = outliers.load_model(name, progress=False)
    ids = outliers.encode_corpus(tok, outliers.load_corpus("builtin"))
    configs, replaced, ev, rows = configs_of(model, ids, args)
    head = next(n for n in replaced[HEAD] if n not in replaced[INT8])

    timed = settings_of(args)

    def run(m, settings=timed):
        return outliers.perplexity(m, ids, settings, progress=False)

    for m in configs.values():  # first calls load kernels and set up GEMMs: not part of any round
        run(m, replace(settings_of(args), max_windows=args.batch_size))
    speeds, seconds, res = defaultdict(list), defaultdict(list), {}
    lin, iso, parts = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in range(args.rounds):
        for cname, m in configs.items():
            res[cname] = run(m)
            speeds[cname].append(res[cname].tokens_per_s)
            seconds[cname].append(res[cname].seconds)
            print(f"{name} round {r + 1}: {cname:<34} {res[cname].tokens_per_s:7.0f} tok/s", file=sys.stderr)
        with timed_linears(model, replaced[HEAD]) as lt:  # the fp32 forward, its linears hook-timed
            fp32_pass = run(model)
        for cname in (INT8, HEAD):
            # F with the T of its own pass: a noisy moment moves both, where the best T of other passes
            # against this pass's F moved the ceiling by 20 % between runs
            lin[cname].append((lt.total(replaced[cname]), fp32_pass.seconds))
            iso[cname].append(isolated_gemms(lt.calls(replaced[cname])))
            with int8_parts(configs[cname]) as shares:
                parts[cname].append(shares(run(configs[cname]).seconds))
    quality = {cname: ev.evaluate(rows[cname]).result for cname in (INT8, HEAD)}  # against fp32, one reference

    best = {k: max(v) for k, v in speeds.items()}
    # one ceiling per round, from that round's hook-timed fp32 pass, and their median
    rounds_ceil = {k: [ceiling(t, f, i) for (f, t), (_, i) in zip(lin[k], iso[k], strict=True)] for k in (INT8, HEAD)}
    ceil = {k: statistics.median(v) for k, v in rounds_ceil.items()}
    ceil_iso = {
        k: statistics.median(ceiling(t, f_iso, i) for (_, t), (f_iso, i) in zip(lin[k], iso[k], strict=True))
        for k in (INT8, HEAD)
    }
    # each round's quantized pass against the fp32 pass just before it, over that round's ceiling
    paired = {
        k: statistics.median(
            s_fp / s_k / c for s_fp, s_k, c in zip(seconds["fp32"], seconds[k], rounds_ceil[k], strict=True)
        )
        for k in (INT8, HEAD)
    }
    print(
        f"\n## {info.name} ({info.n_params / 1e6:.0f}M params), {args.windows} windows x {args.window} tokens, "
        f"batch {args.batch_size}, best of {args.rounds} interleaved rounds\n"
    )
    print("| config | tokens/s (best) | (median) | x fp32 | % of ceiling | x bnb t=6 | perplexity | KL | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cname in configs:
        ratio = best[cname] / best["fp32"]
        own = HEAD if cname == HEAD else INT8 if cname.startswith("ours") and "after" not in cname else None
        pct = f"{100 * ratio / ceil[own]:.0f} %" if own else ""
        vs = f"{best[cname] / best['bitsandbytes t=6']:.2f}" if "bitsandbytes t=6" in best and cname != "fp32" else ""
        q = quality.get(cname)
        kl, top1 = (f"{q.kl_vs_ref:.4f}", f"{100 * q.top1_agreement:.1f} %") if q else ("", "")
        print(
            f"| {cname} | {best[cname]:.0f} | {statistics.median(speeds[cname]):.0f} | {ratio:.2f} | {pct} | {vs} "
            f"| {res[cname].ppl:.3f} | {kl} | {top1} |"
        )
    for k, what in ((INT8, "lm_head float"), (HEAD, "lm_head int8")):
        print(f"| ceiling, {what} | {best['fp32'] * ceil[k]:.0f} | | {ceil[k]:.2f} | 100 % | | | | |")
    for k in (INT8, HEAD):
        f_in, t_in = statistics.median(f for f, _ in lin[k]), statistics.median(t for _, t in lin[k])
        f_iso, i8 = statistics.median(f for f, _ in iso[k]), statistics.median(i for _, i in iso[k])
        print(
            f"\n{k}: quantized linears in the fp32 forward {f_in:.3f} s of {t_in:.3f} s "
            f"({100 * f_in / t_in:.0f} %, hook-timed; medians of {args.rounds} passes); the same calls timed apart: "
            f"fp32 {f_iso:.3f} s, int8 GEMM ({gemm.selected()}) {i8:.3f} s; ceiling {ceil[k]:.2f}x (rounds: "
            f"{', '.join(f'{c:.2f}' for c in rounds_ceil[k])}; with the isolated fp32 time: {ceil_iso[k]:.2f}x); "
            f"llm.int8 at {100 * best[k] / best['fp32'] / ceil[k]:.0f} % of it (best of rounds), "
            f"{100 * paired[k]:.0f} % (median of each round's pair with the fp32 pass before it)"
        )
    calls = lt.calls(replaced[INT8])
    per = backend_seconds(calls)
    ops = sum(2 * m * k * n * c for (m, k, n), c in calls.items())
    print(
        f"\nevery exact int8 GEMM backend over {INT8}'s {sum(calls.values())} calls of one pass "
        f"(best of 3 per shape; the ceiling uses {gemm.selected()}, this machine's choice):\n"
    )
    print("| backend | seconds | GOPS | x fastest |")
    print("|---|---|---|---|")
    fastest = min(per.values())
    for bname, s in sorted(per.items(), key=lambda kv: kv[1]):
        print(f"| {bname} | {s:.3f} | {ops / s / 1e9:.0f} | {s / fastest:.2f} |")
    if "bitsandbytes t=6" in best:
        print(f"llm.int8 t=6 vs bitsandbytes t=6: {best[INT8] / best['bitsandbytes t=6']:.2f}x")
    q0, q1 = quality[INT8], quality[HEAD]
    print(
        f"int8 {head}: perplexity vs fp32 {q0.delta_ppl_pct:+.2f} % -> {q1.delta_ppl_pct:+.2f} % "
        f"({q1.delta_ppl_pct - q0.delta_ppl_pct:+.2f} percentage points), KL {q0.kl_vs_ref:.4f} -> {q1.kl_vs_ref:.4f}, "
        f"top-1 {100 * q0.top1_agreement:.1f} % -> {100 * q1.top1_agreement:.1f} %"
    )
    print(f"\nwhere llm.int8's time goes (the pass with timing wrappers; median of {args.rounds}):\n")
    print("| part | " + " | ".join(f"{k} s | share" for k in (INT8, HEAD)) + " |")
    print("|---|---|---|---|---|")
    for part in PARTS:
        cells = []
        for k in (INT8, HEAD):
            s = statistics.median(p[0][part] for p in parts[k])
            total = statistics.median(sum(p[0].values()) for p in parts[k])
            cells.append(f"{s:.3f} | {100 * s / total:.0f} %")
        print(f"| {part} | " + " | ".join(cells) + " |")
    for note in sorted({n for k in (INT8, HEAD) for p in parts[k] for n in p[1]}):
        print(f"note: {note}; its time is in decompose + glue")
    if "fp32 after hadamard" in best:
        print(
            f"\nonline Hadamard rotation of every quantized linear's input: fp32 after hadamard runs at "
            f"{best['fp32 after hadamard'] / best['fp32']:.2f}x fp32; llm.int8 t=6 after it at "
            f"{best['ours llm.int8 t=6 after hadamard'] / best[INT8]:.2f}x llm.int8 t=6"
        )
    if args.profile:
        from torch.profiler import profile

        x = ids[: args.batch_size * args.window].view(args.batch_size, args.window)
        with torch.inference_mode(), profile() as prof:
            configs[INT8](x)
        print(f"\nwhere one batch of {INT8} spends its time (numba kernels show as the gap):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m", help="comma-separated built-ins or folders, or 'installed'")
    p.add_argument("--max-mb", type=float, default=600, help="'installed' skips models with more packaged MB")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    p.add_argument("--profile", action="store_true", help="torch.profiler's table of one llm.int8 batch")
    p.add_argument("--no-transforms", action="store_true", help="skip the smoothed and rotated rows")
    args = p.parse_args(argv)
    print("\n".join(machine_facts()))
    for name in model_names(args.models, args.max_mb):
        bench(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
