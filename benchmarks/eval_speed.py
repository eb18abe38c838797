"""Whole-model evaluation speed on CPU: fp32 vs our int8 methods vs bitsandbytes.

Runs every configuration on the same windows, interleaved over several rounds
(shared machines swing 2-5x: only ratios inside one run mean anything), and
prints tokens/s, perplexity and the ratios to fp32 and to bitsandbytes.

    python benchmarks/eval_speed.py                 # SmolLM2, 8 windows x 512, 2 rounds
    python benchmarks/eval_speed.py --profile       # plus where llm.int8's time goes
    python benchmarks/eval_speed.py --no-transforms # without the smoothed and rotated rows

The rows after a Hadamard rotation carry its online cost: every quantized linear's
input is rotated on the fly (``outliers.quant.transforms``; no earlier weight absorbs
it), so "fp32 after hadamard" against fp32 is that cost alone.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys

import torch

import outliers
from outliers.quant.model import quantize_model


def bnb_model(folder: str, threshold: float):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    p.add_argument("--profile", action="store_true", help="profile one batch of our llm.int8")
    p.add_argument("--no-transforms", action="store_true", help="skip the smoothed and rotated rows")
    args = p.parse_args(argv)

    model, tok, info = outliers.load_model(args.model, progress=False)
    ids = outliers.encode_corpus(tok, outliers.load_corpus("builtin"))
    configs = {"fp32": model}
    for name, method, t in [("ours llm.int8 t=6", "llm.int8", 6.0), ("ours absmax-vector t=0", "absmax-vector", 0.0)]:
        configs[name] = copy.deepcopy(model)
        quantize_model(configs[name], method, t)
    if not args.no_transforms:
        from outliers.quant.calibration import transformed_copy
        from outliers.quant.transforms import Transform

        reserved = args.windows * args.window  # calibration from the corpus end, apart from the timed windows
        rotated, _ = transformed_copy(model, Transform(rotate="hadamard"), window=args.window)
        smoothed, _ = transformed_copy(model, Transform(smooth=0.5), ids, window=args.window, reserved=reserved)
        configs["fp32 after hadamard"] = rotated
        configs["ours llm.int8 t=6 after hadamard"] = copy.deepcopy(rotated)
        quantize_model(configs["ours llm.int8 t=6 after hadamard"], "llm.int8", 6.0)
        configs["ours smoothquant (absmax-vector after smooth 0.5)"] = smoothed
        quantize_model(smoothed, "absmax-vector", 0.0)
    if not args.no_bnb:
        try:
            for t in (6.0, 0.0):
                configs[f"bitsandbytes t={t:g}"] = bnb_model(model.name_or_path, t)
        except ImportError:
            print("bitsandbytes not installed: skipping it", file=sys.stderr)

    speeds: dict[str, list[float]] = {k: [] for k in configs}
    ppl: dict[str, float] = {}
    for r in range(args.rounds):
        for name, m in configs.items():
            res = outliers.perplexity(
                m, ids, window=args.window, max_windows=args.windows, batch_size=args.batch_size, progress=False
            )
            speeds[name].append(res.tokens_per_s)
            ppl[name] = res.ppl
            print(f"round {r + 1}: {name:<24} {res.tokens_per_s:7.0f} tok/s", file=sys.stderr, flush=True)

    best = {k: max(v) for k, v in speeds.items()}
    print(
        f"\n{info.name}, {args.windows} windows x {args.window} tokens, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds\n"
    )
    print("| config | tokens/s (best) | tokens/s (median) | x fp32 | x bitsandbytes, same t | perplexity |")
    print("|---|---|---|---|---|---|")
    for name in configs:
        peer = "bitsandbytes t=6" if "t=6" in name else "bitsandbytes t=0"
        vs_bnb = f"{best[name] / best[peer]:.2f}" if peer in best and name.startswith("ours") else ""
        print(
            f"| {name} | {best[name]:.0f} | {statistics.median(speeds[name]):.0f} | "
            f"{best[name] / best['fp32']:.2f} | {vs_bnb} | {ppl[name]:.3f} |"
        )

    if "fp32 after hadamard" in best:
        print(
            f"\nonline Hadamard rotation of every quantized linear's input: fp32 after hadamard runs at "
            f"{best['fp32 after hadamard'] / best['fp32']:.2f}x fp32; llm.int8 t=6 after it at "
            f"{best['ours llm.int8 t=6 after hadamard'] / best['ours llm.int8 t=6']:.2f}x llm.int8 t=6"
        )

    if args.profile:
        from torch.profiler import profile

        x = ids[: args.batch_size * args.window].view(args.batch_size, args.window)
        m = configs["ours llm.int8 t=6"]
        with torch.inference_mode():
            m(x)
            with profile() as prof:
                m(x)
        print("\nwhere one batch of ours llm.int8 t=6 spends its time (numba kernels show as the gap):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
