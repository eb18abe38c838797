"""``outliers tokens``: the tokens that carry massive activations (Sun et al. 2024; PrefixQuant, Chen et al. 2024)."""

from __future__ import annotations

import argparse

from outliers.cli.common import check_writable, require_causal, run_facts, write_json
from outliers.errors import InvalidArgumentError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="outlier tokens: which tokens carry massive activations, where, how often")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8192, help="corpus tokens to read (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)",
    )
    p.add_argument("--top", type=int, default=20, help="outlier tokens to print and write (default: %(default)s)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="PATH", help="also write the records, criteria and counts to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.tokens import outlier_tokens, token_table
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.models.load import load_model
    from outliers.quant.prefix import CRITERIA

    if args.window < 2 or args.batch_size < 1 or args.max_tokens < 1 or args.top < 1:
        raise InvalidArgumentError("--window must be >= 2; --batch-size, --max-tokens and --top >= 1")
    if args.max_windows is not None and args.max_windows < 1:
        raise InvalidArgumentError(f"--max-windows must be >= 1, got {args.max_windows}")
    json_path = check_writable(args.json) if args.json else None
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    require_causal(args.model, info, "outlier tokens need a causal LM")
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if args.bos == "window" else None
    report = outlier_tokens(
        model,
        ids,
        window=args.window,
        max_tokens=args.max_tokens,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        bos_token_id=bos_id,
        first_token=getattr(tokenizer, "bos_token_id", None),
        progress=not args.quiet,
    )
    records = report.records(tokenizer, args.top)
    n = report.windows
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"{n} windows of {args.window} ({report.tokens} tokens, bos {report.bos}), {report.counts.blocks} blocks"
    )
    for name, words in CRITERIA.items():
        print(f"  {name}: {words}")
    first = report.first_position()
    print(
        f"\nthe window's first position: an outlier token in {first['sun']}/{n} windows (sun), "
        f"{first['prefixquant']}/{n} (prefixquant); flagged positions per window: "
        + ", ".join(f"{k} {v / max(n, 1):.1f}" for k, v in sorted(report.counts.flagged_positions.items()))
    )
    total = len(report.counts.flagged)
    print(f"\noutlier tokens ({total} token ids; the first {len(records)}):")
    if records:
        with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 40):
            print(token_table(records).to_string(index=False))
    else:
        print("  none")
    prefix = report.prefix()
    print(f"\nPrefixQuant's prefix from this text: {[tokenizer.decode([t]) for t in prefix]} (ids {prefix})")
    if json_path:
        payload = run_facts(args.model, info, corpus) | report.to_dict(tokenizer, args.top)
        write_json(json_path, payload, "--json")
    return 0
