"""``outliers sinks``: attention sinks per head and the first token's norm (Xiao et al. 2023; Gu et al. 2024)."""

from __future__ import annotations

import argparse
import json

from outliers.cli.common import check_out_dir, check_writable, require_causal, run_facts
from outliers.errors import InvalidArgumentError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sinks", help="attention sinks: each head's mean attention to the first token")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument(
        "--epsilon", type=float, default=0.3, help="a head is a sink above this score (default: %(default)s)"
    )
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)",
    )
    p.add_argument("--show", type=int, default=10, help="top heads to print (default: %(default)s)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--out", metavar="DIR", help="write heads.csv, norms.csv and PNG figures here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.sinks import attention_sinks
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.models.load import load_model

    if not 0 < args.epsilon < 1:
        raise InvalidArgumentError(f"--epsilon must be in (0, 1), got {args.epsilon}")
    if args.window < 2 or args.max_windows < 1 or args.batch_size < 1:
        raise InvalidArgumentError("--window must be >= 2, --max-windows and --batch-size >= 1")
    json_path = check_writable(args.json) if args.json else None
    out = check_out_dir(args.out) if args.out else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress, attn_implementation="eager")
    require_causal(args.model, info, "attention sinks are measured on causal LMs")
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if args.bos == "window" else None
    res = attention_sinks(
        model,
        ids,
        window=args.window,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        bos_token_id=bos_id,
        progress=progress,
        meta=run_facts(args.model, info, corpus),
    )
    d = res.to_dict()
    local = d["local_layers"]
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"{res.n_windows} windows of {res.window}, bos {res.bos}\n"
    )
    print(
        f"sink rate  {res.sink_rate:.4f}  ({d['n_sink_heads']} of {d['n_counted_heads']} heads score > "
        f"{res.epsilon:g}; score = mean attention to the window's first token)"
    )
    if local:
        print(
            f"           {res.sink_rate_all:.4f} over all {d['n_heads']} heads; local (sliding-window) layers "
            f"left out above: {', '.join(map(str, local))}"
        )
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    print(f"\ntop {min(args.show, len(res.heads))} heads:")
    print(res.top(args.show).to_string(**fmt))
    norms = res.norms.assign(ratio=res.norms.first_token_norm / res.norms.other_tokens_norm)
    print("\nblock outputs, mean L2 norm: first token vs the other tokens")
    with pd.option_context("display.max_rows", None):
        print(norms.to_string(**fmt))
    if json_path:
        from outliers.cache import atomic_write

        atomic_write(json_path, json.dumps(d, indent=1) + "\n")
    if out is not None:
        from outliers.analysis.plots import sink_heatmap, sink_norms
        from outliers.cache import save_csv, save_figure

        save_csv(res.heads, out / "heads.csv")
        save_csv(res.norms, out / "norms.csv")
        save_figure(sink_heatmap(res), out / "sink_heatmap.png")
        save_figure(sink_norms(res), out / "norms.png")
        print(f"\nwrote heads.csv, norms.csv, sink_heatmap.png and norms.png to {out}")
    return 0
