"""``outliers ablate``: zero or mean-fill feature dims and measure the damage (Dettmers et al. 2022, §4)."""

from __future__ import annotations

import argparse

from outliers.cli.common import check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="zero or mean-fill feature dims and measure the damage (paper §4)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--dims", default="auto", help="'auto' (outlier features from a scan) or e.g. 247,507")
    p.add_argument("--mode", choices=("zero", "mean"), default="zero")
    p.add_argument("--points", default="attn_in", help="where to ablate (default: %(default)s)")
    p.add_argument("--controls", type=int, default=3, help="random draws of as many dims (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=6.0)
    p.add_argument("--scan-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.ablate import ablation_study
    from outliers.analysis.criteria import Criteria, outlier_features
    from outliers.analysis.points import parse_kinds
    from outliers.analysis.scan import scan
    from outliers.data.corpus import encode_corpus, load_corpus
    from outliers.errors import InvalidArgumentError
    from outliers.models.load import load_model

    kinds = parse_kinds(args.points)
    dims: list[int] | None = None
    if args.dims != "auto":
        try:
            dims = [int(d) for d in args.dims.split(",") if d.strip()]
        except ValueError:
            raise InvalidArgumentError(
                f"--dims must be 'auto' or a comma list of integers, got {args.dims!r}"
            ) from None
    json_path = check_writable(args.json) if args.json else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress, attn_implementation="eager")
    ids = encode_corpus(tokenizer, corpus)
    stats = None
    if dims is None or args.mode == "mean":
        stats = scan(
            model,
            ids,
            points=kinds,
            threshold=args.threshold,
            max_tokens=args.scan_tokens,
            window=args.window,
            progress=progress,
            meta={"model": args.model},
        )
    if dims is None:
        assert stats is not None  # scanned just above
        dims = outlier_features(stats, Criteria()).dim.tolist()
        if not dims:
            raise InvalidArgumentError(
                f"no outlier features found in {args.model} at threshold {args.threshold}; pass --dims explicitly"
            )
        print(f"outlier dims (paper criteria, {stats.meta['tokens_scanned']} tokens scanned): {dims}")
    df = ablation_study(
        model,
        ids,
        dims,
        points=list(kinds),
        mode=args.mode,
        controls=args.controls,
        seed=args.seed,
        window=args.window,
        max_windows=args.max_windows,
        stats=stats,
        progress=progress,
    )
    print(
        f"{info.name} ({info.weights}): {args.mode} dims at {args.points}, "
        f"{args.max_windows} windows of {args.window}\n"
    )
    with pd.option_context("display.width", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if json_path:
        from outliers.cache import atomic_write

        atomic_write(json_path, df.to_json(orient="records", indent=2))
    return 0
