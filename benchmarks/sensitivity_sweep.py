"""What the replayed sensitivity sweep costs against the naive one, measured in one run, with identical numbers.

Three sweeps give the same numbers bit for bit: the replayed one records every block's output once per
batch and runs each unit from its first block (``outliers.analysis.sensitivity``); the naive one runs one
full forward per unit, scored against reference log-probs made once per batch; and the per-row one runs
``perplexity`` per unit, as ``outliers eval`` scores a row, against the float model's kept final states
(its head and log-softmax then run again per unit). Rounds alternate their order (shared machines swing
2-5x: only ratios inside one run mean anything); the ratio per round and its median are printed,
with the per-window sums compared bit for bit, the CPU and its flags. Both wall-clock and CPU seconds
(``time.process_time``, every thread of this process) are kept: beside other jobs on a shared machine the
CPU seconds say what the sweep itself cost, and the ratio is judged by them.

    python benchmarks/sensitivity_sweep.py                      # SmolLM2, absmax, blocks, 8 windows, 2 rounds
    python benchmarks/sensitivity_sweep.py --windows 4 --rounds 1 --write docs/sensitivity_results.md
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as the CLI does

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_page import run_and_write  # noqa: E402

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


def flop_floor(model, window: int) -> tuple[float, float] | None:
    """The least the replayed sweep can cost against each naive one, by counting matmul FLOPs (per block unit).

    Any exact sweep still runs blocks b..L-1 and the output head over the whole vocabulary for the unit that
    starts at block b; the naive one runs all L blocks per unit, and the per-row one also remakes the
    reference's logits per unit. Per token a block costs 2 x its linear weights plus 2 x window x hidden for
    causal attention, the head 2 x vocabulary x hidden; the reference forward made once per batch is counted
    in every sweep. Returns (against naive, against per-row), or None where the config does not say."""
    cfg = getattr(model, "config", None)
    layers, hidden, vocab = (getattr(cfg, k, None) for k in ("num_hidden_layers", "hidden_size", "vocab_size"))
    if not (layers and hidden and vocab):
        return None
    block_w = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and p.dim() == 2)
    block, head = 2 * block_w + 2 * window * hidden, 2 * vocab * hidden
    ref = layers * block + head
    replay = sum(layers - b for b in range(layers)) * block + layers * head + ref
    naive = layers * layers * block + layers * head + ref
    return replay / naive, replay / (naive + layers * head)


def per_row_sweep(model, ids, settings, method: str, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """The sweep as ``outliers eval`` scores rows: one ``perplexity`` call per unit, a full forward of the model
    with that unit quantized, against the float model's kept final states (its head and log-softmax then run
    again for every unit). Returns the per-window KL and NLL sums, units × windows."""
    from copy import deepcopy

    from outliers.analysis.sensitivity import quantization_units, swapped
    from outliers.eval.perplexity import perplexity
    from outliers.quant.model import quantized_copy

    quantized, report = quantized_copy(model, method)
    q_modules = dict(quantized.named_modules())
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    mix = deepcopy(model, memo=shared)
    states: dict = {}
    kl, nll = [], []
    for u in quantization_units(model, report.replaced, unit):
        with swapped(mix, {m: q_modules[m] for m in u.modules}):
            r = perplexity(mix, ids, settings, reference=model, reference_states=states, progress=False)
        assert r.window_kl is not None
        kl.append(r.window_kl)
        nll.append(r.window_nll)
    return np.array(kl), np.array(nll)


def measure(args: argparse.Namespace) -> int:
    model, tokenizer, info = load_model(args.model, progress=False)
    ids = encode_corpus(tokenizer, load_corpus(args.corpus))
    settings = PerplexitySettings(window=args.window, max_windows=args.windows, batch_size=args.batch_size)
    kw = dict(unit=args.unit, predictors=False, mixed=False, progress=False, model_name=args.model)
    print(
        f"# {info.name} ({info.weights}), {args.method}, one {args.unit} at a time, {args.windows} windows of "
        f"{args.window}, batch {args.batch_size}; {_cpu()}"
    )
    sweeps = ("replay", "naive", "per-row")
    times: dict[str, list[float]] = {k: [] for k in sweeps}
    cpu: dict[str, list[float]] = {k: [] for k in sweeps}
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    whole = ""
    for r in range(args.rounds):
        for how in sweeps if r % 2 == 0 else sweeps[::-1]:
            started, started_cpu = time.perf_counter(), time.process_time()
            if how == "per-row":
                results[how] = per_row_sweep(model, ids, settings, args.method, args.unit)
            else:
                res = sensitivity(model, ids, settings, args.method, replay=how == "replay", **kw)
                assert res.window_kl is not None and res.window_nll is not None
                results[how] = (res.window_kl, res.window_nll)
                whole = f"whole-model KL {res.whole['kl_vs_ref']:.5f}; most sensitive: {', '.join(res.ranking[:5])}"
            times[how].append(time.perf_counter() - started)
            cpu[how].append(time.process_time() - started_cpu)
        print(
            f"# round {r + 1}: " + "; ".join(f"{k} {times[k][-1]:.1f} s wall, {cpu[k][-1]:.1f} s CPU" for k in sweeps)
        )
    kl, nll = results["replay"]
    same_naive = bool(np.array_equal(kl, results["naive"][0]) and np.array_equal(nll, results["naive"][1]))
    same_row = bool(np.array_equal(kl, results["per-row"][0]) and np.array_equal(nll, results["per-row"][1]))
    med = statistics.median
    print("")
    print("| sweep | wall s (median) | CPU s (median) | replayed / it, CPU (median; range) | wall |")
    print("|---|---|---|---|---|")
    ratios: dict[str, float] = {}
    labels = {
        "replay": "replayed from each unit's first block",
        "naive": "naive: one full forward per unit, the reference's log-probs made once per batch",
        "per-row": "naive as outliers eval scores a row: perplexity() per unit against kept reference states",
    }
    for k in sweeps:
        cr = [a / b for a, b in zip(cpu["replay"], cpu[k], strict=True)]
        wr = [a / b for a, b in zip(times["replay"], times[k], strict=True)]
        ratios[k] = med(cr)
        print(
            f"| {labels[k]} | {med(times[k]):.1f} | {med(cpu[k]):.1f} | {med(cr):.3f} "
            f"({min(cr):.3f}-{max(cr):.3f}) | {med(wr):.3f} |"
        )
    print("")
    print(
        f"# per-window KL and NLL sums of every unit identical, replayed vs naive: {same_naive}; "
        f"replayed vs per-row: {same_row}"
    )
    print(
        f"# target: the replayed sweep at most {TARGET} of the naive one (CPU): against the per-row naive "
        f"{ratios['per-row']:.3f} ({'met' if ratios['per-row'] <= TARGET else 'NOT met'}), against the naive "
        f"sweep that already shares the reference's log-probs {ratios['naive']:.3f} "
        f"({'met' if ratios['naive'] <= TARGET else 'NOT met'})"
    )
    floor = flop_floor(model, args.window) if args.unit == "block" else None
    if floor is not None:
        print(
            f"# the floor for any exact replay, by matmul FLOPs (the head over the whole vocabulary runs once per "
            f"unit whatever is replayed): {floor[0]:.3f} of the naive sweep, {floor[1]:.3f} of the per-row one"
        )
    print(f"# {whole}")
    return 0 if same_naive and same_row else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--method", default="absmax")
    p.add_argument("--unit", default="block", choices=("block", "linear", "kind"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="rounds, each sweep once, in alternating order")
    p.add_argument("--write", metavar="PATH", help="also write the printed table to this markdown page")
    args = p.parse_args(argv)
    return run_and_write(
        measure,
        args,
        argv,
        "sensitivity_sweep.py",
        "Sensitivity sweep cost, measured",
        "The model is a 4-bit GGUF dequantized to float32. Timings on a shared machine swing 2-5x; "
        "the ratio is measured within one run.",
    )


if __name__ == "__main__":
    sys.exit(main())
