"""``outliers range``: each capture point's headroom to float16, bfloat16 and FP8, and an emulated float16 run."""

from __future__ import annotations

import argparse
import math
from typing import Any

from outliers.cli.common import check_writable, print_table, require_causal, run_facts, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("range", help="number-format headroom: max |x| against float16/bfloat16, FP8 underflow")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in name, model folder, .gguf file or hub id (default: %(default)s)",
    )
    p.add_argument(
        "--corpus",
        default="builtin",
        help="'builtin', a UTF-8 text file, or hf:NAME[:CONFIG]:SPLIT (default: %(default)s)",
    )
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)",
    )
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (float16 only on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-emulate",
        dest="emulate",
        action="store_false",
        help="skip the emulated float16 run (activations rounded to float16 at every linear's input and "
        "block output): one perplexity pass fewer",
    )
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outliers.analysis.range import format_headroom
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.eval.windows import PerplexitySettings
    from outliers.models.load import load_model

    json_path = check_writable(args.json) if args.json else None
    settings = PerplexitySettings("chunks", args.window, None, args.max_windows, args.batch_size, args.bos)
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    check_causal(args.model, info)
    ids = encode_corpus(tokenizer, corpus)
    res = format_headroom(
        model,
        ids,
        settings,
        bos_token_id=bos_token_id(tokenizer, args.model) if args.bos == "window" else None,
        progress=not args.quiet,
        emulate=args.emulate,
        meta=run_facts(args.model, info, corpus),
    )
    print_table(
        [
            ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights})"),
            ("corpus", f"{corpus.name} ({len(ids)} tokens, sha256 {corpus.sha256[:12]})"),
            ("windows", f"{res.n_windows} windows of {res.window}, bos {res.bos}, {res.n_tokens} tokens"),
        ]
    )
    print()
    print_range(res)
    if json_path:
        write_json(json_path, res.to_dict() | {"model_info": info.to_dict()}, "--json")
    return 0


def check_causal(model: str, info: Any) -> None:
    """The analysis scores its windows (the emulated run's perplexity): an encoder is refused before it runs."""
    require_causal(model, info, "outliers range scores windows and needs a causal LM")


def after_scan(model: Any, ids: Any, args: argparse.Namespace, bos_id: int | None, meta: dict) -> None:
    """``scan --range``: the analysis over the windows the scan read (its window, batch size, BOS and
    ``--max-tokens``), printed as ``outliers range`` prints it."""
    from outliers.analysis.range import format_headroom
    from outliers.eval.windows import PerplexitySettings

    per = args.window - (bos_id is not None)  # corpus tokens per window, as the scan cuts them
    settings = PerplexitySettings(
        "chunks", args.window, None, max(1, args.max_tokens // per), args.batch_size, args.bos
    )
    res = format_headroom(model, ids, settings, bos_token_id=bos_id, progress=not args.quiet, meta=meta)
    print(f"\nnumber-format headroom ({res.n_windows} windows of {res.window}, {res.n_tokens} tokens)\n")
    print_range(res)


def _pct(share: float) -> str:
    if math.isnan(share):
        return "n/a"
    return f"{100 * share:.3g} %"


def _worst(summary: dict, count: str) -> str:
    worst = summary[f"worst_{count}"]
    return f" (worst {worst['point']} {_pct(worst['share'])})" if worst["share"] > 0 else ""


def print_range(res: Any) -> None:
    """The per-block table, the first overflow per format, the underflow shares and the emulated run."""
    import pandas as pd

    from outliers.analysis.range import BFLOAT16, FLOAT16, FP8, SCALES

    table = res.block_table()
    table["margin"] = [-math.log2(h) if h > 0 else math.inf for h in table.pop("fp16_headroom")]
    table = table[[c for c in table.columns if c != "worst"] + ["worst"]]
    print(
        f"max |x| per block and capture point; margin = log2({FLOAT16.max:g} / the block's max |x|), "
        "float16's headroom in bits (negative: past its range), at the worst point"
    )
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    s = res.summary()
    top = s["max_abs"]
    print(f"\nlargest |x|: {top['value']:.4g} at {top['point']} ({top['module']})")
    for fmt in (FLOAT16, BFLOAT16):
        first = res.first_overflow[fmt.name]
        print(f"past {fmt.name}'s range ({fmt.max:.6g}): " + (f"first at {first}" if first else "none"))
    print(
        f"\nbelow the smallest normal, as a share of nonzero values (exact zeros, {_pct(s['zeros'])} of all "
        "values, are representable and not counted):"
    )
    for fmt in (FLOAT16, BFLOAT16):
        share = s[f"below_{fmt.name}_normal"]
        print(
            f"  {fmt.name:<8} ({fmt.smallest_normal:.4g}): {_pct(share)} overall{_worst(s, f'below_{fmt.name}_normal')}"
        )
    print(
        "\nFP8 with max |x| scaled to the format's max: share of nonzero values below its smallest subnormal "
        "(per tensor: one scale per point and window; per token: one per token)"
    )
    for fmt in FP8:
        cells = [f"per {sc} {_pct(s[f'{fmt.name}_{sc}'])}{_worst(s, f'{fmt.name}_{sc}')}" for sc in SCALES]
        sub = f"2^{round(math.log2(fmt.smallest_subnormal))}"
        print(f"  {fmt.name.upper()} (max {fmt.max:g}, subnormal {sub}): " + ", ".join(cells))
    e = res.emulated
    if e is None:
        return
    print(
        "\nemulated float16 (every block linear's input, the output head's input and every block output "
        f"rounded to float16; arithmetic in {res.dtype}):"
    )
    if e.clean:
        change = 100 * (e.ppl / res.ppl - 1)
        print(f"  runs clean; perplexity {e.ppl:.4f} vs {res.dtype} {res.ppl:.4f} ({change:+.3f} %)")
    else:
        where = f"first {e.value} at {e.first_nonfinite}" if e.first_nonfinite else "no tensor went non-finite"
        print(f"  {where}; perplexity {e.ppl:.4g} ({res.dtype}: {res.ppl:.4f})")
