"""Quantization SNR of the microscaling formats against the crest factor: Gaussian data, built blocks, SmolLM2.

(a) Standard-normal data, per format: the measured QSNR, the noise model's (uniform rounding error over the
grid step at each value, clipping exact) and the closed form's (``outliers.analysis.qsnr``'s docstring).
(a') Blocks of 32 built to a crest factor (31 normal values and a spike): MXINT8 against MXFP8 as it grows.
(b) The inputs of four linear layers of a few SmolLM2 blocks, one 512-token window of the corpus: each
tensor's crest factor and QSNR per format, then their blocks of 32 pooled by crest factor, and where INT and
FP cross (per block: MXINT8 vs MXFP8; per tensor: int8 vs FP8 E4M3, one scale each).

    python benchmarks/qsnr.py
    python benchmarks/qsnr.py --write docs/formats_results.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

from outliers.threads import configure_threads

configure_threads()  # before torch loads, as the CLI does

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_page import run_and_write  # noqa: E402

from outliers.analysis import qsnr  # noqa: E402
from studies.format import markdown  # noqa: E402

PER_TENSOR = ("mxint8", "mxfp8", "mxfp6", "mxfp4", "nvfp4", "int8-tensor", "fp8-tensor")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "none in range" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def fitted_crossing(crest: list[float], a: list[float], b: list[float]) -> float | None:
    """Where a least-squares line of ``a − b`` against log10(crest) crosses 0 (None for a flat or rising one)."""
    slope, icept = np.polyfit(np.log10(crest), np.subtract(a, b), 1)
    return None if slope >= 0 else float(10 ** (-icept / slope))


def measure(args: argparse.Namespace) -> int:
    import psutil

    print(f"# {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    print("\n## (a) Standard-normal data\n")
    print(
        f"# {args.blocks} blocks of 32 values; QSNR in dB. Closed forms: MXINT8 49.59 − 20 log10 c, int8 per "
        "tensor 52.86 − 20 log10 c (c the power-weighted crest), FP 14.47 + 6.02 mbits (none for E2M3, E2M1)."
    )
    print(markdown(qsnr.gaussian_table(args.blocks), ".2f"))

    print("\n## (a') Blocks of 32 built to a crest factor\n")
    print("# 31 standard-normal values and one spike per block, each block times 2^u (u uniform on [0, 1))")
    sweep = qsnr.crest_sweep(n_blocks=args.blocks)
    print(markdown(sweep, ".2f"))
    c = list(sweep["block crest"])
    measured = qsnr.crossing(c, list(sweep["mxint8 dB"]), list(sweep["mxfp8 dB"]))
    closed = 10 ** ((qsnr.closed_form_db("mxint8", 1.0) - qsnr.closed_form_db("mxfp8", 1.0)) / 20)  # type: ignore[operator]
    print(
        f"# MXINT8 vs MXFP8 cross at block crest: measured {_fmt(measured)}; closed forms {closed:.2f} "
        f"(a block of 32 reaches at most {math.sqrt(32):.2f})"
    )

    print("\n## (a'') Tensors built to a crest factor, one scale per tensor\n")
    print("# a (128, 512) standard-normal tensor with one spike; block formats at its blocks' power-weighted crest")
    tsweep = qsnr.tensor_sweep()
    print(markdown(tsweep, ".2f"))
    t = list(tsweep["tensor crest"])
    per_tensor = qsnr.crossing(t, list(tsweep["int8-tensor dB"]), list(tsweep["fp8-tensor dB"]))
    closed_t = 10 ** ((qsnr.closed_form_db("int8-tensor", 1.0) - qsnr.closed_form_db("fp8-tensor", 1.0)) / 20)  # type: ignore[operator]
    print(
        f"# int8 vs FP8 E4M3 per tensor cross at tensor crest: measured {_fmt(per_tensor)}; closed forms {closed_t:.2f}"
    )

    print(f"\n## (b) {args.model}: linear inputs of blocks {', '.join(map(str, args.layers))}\n")
    from outliers.data.corpus import encode_corpus, load_corpus
    from outliers.models.load import load_model

    model, tokenizer, _ = load_model(args.model, progress=False)
    ids = encode_corpus(tokenizer, load_corpus(args.corpus))[: args.tokens].unsqueeze(0)
    tensors = qsnr.capture_inputs(model, ids, args.layers)
    tensors = {k.removeprefix("model.layers."): v for k, v in tensors.items()}
    table = qsnr.tensor_table(tensors, PER_TENSOR)
    print(f"# one window of {ids.shape[1]} tokens of the corpus {args.corpus!r}; QSNR in dB")
    print(markdown(table, ".2f"))
    ordered = table.sort_values("crest (tensor)")
    fp_wins = ordered[ordered["fp8-tensor dB"] > ordered["int8-tensor dB"]]
    cross = fitted_crossing(
        list(ordered["crest (tensor)"]), list(ordered["int8-tensor dB"]), list(ordered["fp8-tensor dB"])
    )
    print(
        f"# per tensor (one scale each): FP8 E4M3 beats int8 on {len(fp_wins)} of {len(table)} tensors; their "
        f"crest factors run from {ordered['crest (tensor)'].min():.1f} to {ordered['crest (tensor)'].max():.0f}; "
        f"a line through int8 − FP8 against log10(crest) crosses 0 at crest {_fmt(cross, '.1f')} "
        f"(closed forms: {closed_t:.1f}). MXINT8 beats MXFP8 on "
        f"{int((table['mxint8 dB'] > table['mxfp8 dB']).sum())} of {len(table)}."
    )
    blocks = qsnr.block_table(tensors)
    print("\n# every tensor's blocks of 32, pooled and binned by their crest factor; QSNR in dB over the bin")
    print(markdown(blocks, ".2f"))
    b = qsnr.crossing(list(blocks["crest (power-weighted)"]), list(blocks["mxint8 dB"]), list(blocks["mxfp8 dB"]))
    share = float((blocks["blocks"] * blocks["mxfp8 better, % of blocks"]).sum() / blocks["blocks"].sum())
    print(
        f"# per block of 32: MXINT8 vs MXFP8 cross at crest {_fmt(b)} (measured, over the bins); MXFP8 is the "
        f"more accurate on {share:.1f} % of all blocks"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 10, 20, 28, 29])
    p.add_argument("--blocks", type=int, default=4096, help="blocks of 32 per synthetic set")
    p.add_argument("--write", metavar="PATH", help="also write the printed tables to this markdown page")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    return run_and_write(
        measure,
        args,
        argv,
        "qsnr.py",
        "Quantization SNR of the microscaling formats, measured",
        "The formats, the noise model and the closed forms: [Microscaling and NVFP4](formats.md). "
        "The model is a 4-bit GGUF dequantized to float32.",
    )


if __name__ == "__main__":
    sys.exit(main())
