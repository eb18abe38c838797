"""GPU benchmark of the Numba LLM.int8() kernels at LLM shapes (needs a CUDA GPU and numba-cuda).

Compares, in one run and per shape: the Numba int8 GEMMs + fused dequant (SIMT tiles
and int8 tensor cores through ``mma``), ``torch._int_mm`` + dequant, fp16 ``nn.Linear`` (cuBLAS), the full Numba
LLM.int8() linear at threshold 6 with real outlier columns, and bitsandbytes'
``Linear8bitLt`` when it is importable. Checks first that both Numba GEMMs give
``torch._int_mm``'s int32 products at every shape. Prints a Markdown table with the
device name; ``--save`` also writes it under ``benchmarks/results/``.

    python benchmarks/gpu_kernels.py --save

``--smoke`` runs the same code on CPU under Numba's CUDA simulator at tiny shapes, one
repetition, no table saved: a check of this script, not a measurement (the tests run it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

TOKENS = (1, 16, 512, 4096)
SHAPES = ((4096, 4096), (4096, 16384), (16384, 4096))  # (in, out)


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events), after a warm-up; one wall-clock run on CPU."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", action="store_true")
    p.add_argument("--outlier-cols", type=int, default=6, help="planted outlier columns (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the simulator (checks the script)")
    args = p.parse_args(argv)
    tokens, shapes = TOKENS, SHAPES
    if args.smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported below
        tokens, shapes, args.save, args.outlier_cols = (1, 17), ((32, 24),), False, 2
    elif not torch.cuda.is_available():
        print(
            "gpu_kernels.py needs a CUDA GPU; none is available here (--smoke runs it in the simulator)",
            file=sys.stderr,
        )
        return 1
    from cuda_kernels import launch as L
    from outliers.quant.int8 import int8_mm_dequant

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    dev = torch.device("cpu" if args.smoke else "cuda")
    name = "the Numba CUDA simulator (smoke run, not a measurement)" if args.smoke else torch.cuda.get_device_name(dev)
    rows, auto, half = [], None, torch.float16  # the Numba kernels write fp16 like nn.Linear
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=True).to(dev, torch.float16)
        cb, scb, _ = L.quantize_rows(lin.weight.detach().float(), 0.0)
        bias = lin.bias.detach().float()
        ref_bnb = None
        if bnb is not None:
            ref_bnb = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0)
            ref_bnb.load_state_dict(lin.state_dict())
            ref_bnb = ref_bnb.to(dev).eval()
        for t in tokens:
            x = torch.randn(t, k, device=dev, dtype=torch.float16)
            x[:, torch.randperm(k, device=dev)[: args.outlier_cols]] *= 8  # real outlier columns at t=6
            codes, rs, _ = L.quantize_rows(x, 0.0)
            auto = auto or L.pick_gemm("auto", codes, cb)
            row = {"tokens": t, "in": k, "out": n}
            with torch.inference_mode():
                row["fp16 nn.Linear"] = timed(lambda: lin(x))
                for gemm in ("simt", "mma"):
                    row[f"numba {gemm}+dequant"] = timed(
                        lambda: L.int8_matmul_dequant(codes, cb, rs, scb, bias, out_dtype=half, gemm=gemm)
                    )
                if t > 16:  # cuBLASLt's int8 path wants m > 16
                    exact = torch._int_mm(codes, cb.t())
                    for gemm in ("simt", "mma"):
                        if not torch.equal(L.int8_matmul(codes, cb, gemm=gemm), exact):
                            raise SystemExit(f"numba {gemm} GEMM differs from torch._int_mm at {t}x{k}x{n}")
                    row["torch._int_mm+dequant"] = timed(
                        lambda: int8_mm_dequant(torch._int_mm(codes, cb.t()), rs, scb, bias)
                    )
                row["numba LLM.int8 t=6"] = timed(lambda: L.llm_int8_linear(x, cb, scb, bias, 6.0, out_dtype=half))
                if ref_bnb is not None:
                    row["bnb Linear8bitLt t=6"] = timed(lambda: ref_bnb(x))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    cols = [
        "fp16 nn.Linear",
        "torch._int_mm+dequant",
        "numba simt+dequant",
        "numba mma+dequant",
        "numba LLM.int8 t=6",
        "bnb Linear8bitLt t=6",
    ]
    lines = [
        f"# Numba LLM.int8() kernels on {name}",
        "",
        f"torch {torch.__version__}, median ms of {1 if args.smoke else 20} runs; "
        f"{args.outlier_cols} outlier columns at t=6; {L.default_tiles()}",
        "",
        f"LLM.int8 uses gemm='auto' ({auto} here). Ratios are throughputs: "
        "_int_mm time / numba mma time, fp16 time / LLM.int8 time (1.00x = as fast). "
        "The Numba epilogues write fp16, torch._int_mm's dequant float32.",
        "",
        "| tokens | in→out | " + " | ".join(cols) + " | numba mma / _int_mm | LLM.int8 / fp16 |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for r in rows:
        vals = [f"{r[c]:.3f}" if c in r else "–" for c in cols]
        ratio = f"{r['torch._int_mm+dequant'] / r['numba mma+dequant']:.2f}x" if "torch._int_mm+dequant" in r else "–"
        lines.append(
            f"| {r['tokens']} | {r['in']}→{r['out']} | "
            + " | ".join(vals)
            + f" | {ratio} | {r['fp16 nn.Linear'] / r['numba LLM.int8 t=6']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        path = Path(__file__).parent / "results" / f"gpu_kernels_{time.strftime('%Y%m%d')}.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
