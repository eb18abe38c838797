"""``outliers scan``: outlier-feature statistics by forward hooks, tables and figures."""

from __future__ import annotations

import argparse
import sys

from outliers.cli.common import (
    add_device_map_args,
    add_transform_args,
    check_out_dir,
    placement_of,
    run_facts,
    transform_of,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="outlier-feature statistics by forward hooks")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--points",
        default="attn,ffn",
        help="capture points: attn (= attn_in,attn_out), ffn, residual, down_in (the MLP's output projection's "
        "input: where massive activations are born), or kinds (default: %(default)s)",
    )
    p.add_argument("--threshold", type=float, default=6.0, help="magnitude cut-off (default: %(default)s)")
    p.add_argument(
        "--relative-k",
        type=float,
        default=6.0,
        help="scale-relative cut-off: |x| >= k x rms(token) (default: %(default)s)",
    )
    p.add_argument("--layers", type=float, default=0.25, help="fraction of layers (default: %(default)s)")
    p.add_argument("--positions", type=float, default=0.06, help="fraction of positions (default: %(default)s)")
    p.add_argument("--layer-unit", choices=("block", "point"), default="block")
    p.add_argument("--position-mode", choices=("union", "max", "mean"), default="union")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    add_device_map_args(p)
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)",
    )
    p.add_argument(
        "--no-moments",
        dest="moments",
        action="store_false",
        help="leave out kurtosis and ∞-norms (Bondarenko et al. 2023); a little faster",
    )
    add_transform_args(p)
    p.add_argument("--show", type=int, default=20, help="rows of the outlier tables to print")
    p.add_argument("--out", metavar="DIR", help="write statistics, CSV tables and PNG figures here")
    p.add_argument(
        "--range",
        action="store_true",
        help="then measure number-format headroom on the same windows and print it as outliers range does",
    )
    p.add_argument("--quiet", action="store_true")

    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    import pandas as pd

    from outliers.analysis.criteria import Criteria, massive_activations, outlier_features, per_dim, summary, top_values
    from outliers.analysis.points import parse_kinds
    from outliers.analysis.scan import scan
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.models.load import load_model

    kinds = parse_kinds(args.points)
    transform = transform_of(args)  # validated before the model loads
    base = Criteria(args.layers, args.positions, args.layer_unit, args.position_mode)  # validates early
    if args.threshold <= 0:
        from outliers.errors import InvalidArgumentError

        raise InvalidArgumentError(f"threshold must be > 0, got {args.threshold}")
    place = placement_of(args)
    out = check_out_dir(args.out) if args.out else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    streamed = {} if transform else place.load_kwargs()  # a transform needs the float model whole first
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress, **streamed)
    if args.range:  # refused before the scan, not after it
        from outliers.cli.range import check_causal

        check_causal(args.model, info)
    ids = encode_corpus(tokenizer, corpus)
    applied: dict = {}
    bos_id = bos_token_id(tokenizer, args.model) if args.bos == "window" else None
    if transform:  # measure what the quantizer would see
        from outliers.quant.calibration import transformed_copy

        calib_corpus = load_corpus(args.calib_corpus) if args.calib_corpus else corpus
        calib = encode_corpus(tokenizer, calib_corpus) if args.calib_corpus else ids
        # the scanned text (a BOS per window reads one token more) is never calibrated on, under any name
        read = min(len(ids), args.max_tokens + (bos_id is not None))
        model, applied = transformed_copy(
            model,
            transform,
            calib,
            window=args.window,
            reserved=read if calib_corpus.sha256 == corpus.sha256 else 0,
            batch_size=args.batch_size,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = scan(
            place(model),
            ids,
            points=kinds,
            threshold=args.threshold,
            relative_k=args.relative_k,
            max_tokens=args.max_tokens,
            window=args.window,
            batch_size=args.batch_size,
            progress=progress,
            bos_token_id=bos_id,
            meta=run_facts(args.model, info, corpus) | applied,
            moments=args.moments,
        )
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    spaces: list[str] = [s for s in ("hidden", "heads", "intermediate") if s in stats.spaces]
    rows = [
        summary(stats, Criteria(**{**base.__dict__, "space": s, "scale": scale}))
        for s in spaces
        for scale in ("absolute", "relative")
    ]
    table = pd.DataFrame(rows, columns=["space", "criterion", "outlier_dims", "pct_layers", "pct_positions", "tokens"])
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"{stats.meta['tokens_scanned']} tokens, layer={base.layer_unit}, positions={base.position_mode}, "
        f"criteria >= {100 * base.layers:g} % layers and >= {100 * base.positions:g} % positions\n"
    )
    if applied:
        print(f"after {_describe(applied)}: the inputs the quantizer sees\n")
    if len(table):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    feats = (
        {
            scale: outlier_features(stats, Criteria(**{**base.__dict__, "scale": scale}))
            for scale in ("absolute", "relative")
        }
        if "hidden" in spaces
        else {}
    )
    cols = ["dim", "pct_layers", "pct_positions", "max_abs", "median_layer_max", "mean_outlier_value", "one_sided"]
    for scale, df in feats.items():
        shown = cols if scale == "absolute" else cols[:5]  # sidedness is measured at the absolute threshold
        print(f"\noutlier features, hidden space, {scale} criterion ({len(df)}):")
        print(
            df[shown].head(args.show).to_string(index=False, float_format=lambda v: f"{v:.2f}") if len(df) else "  none"
        )
    massive = massive_activations(stats) if "residual" in kinds else None
    if massive is not None:
        print(
            f"\nmassive activations (residual stream, |x| > 100 and > 1000x the hidden state's median): "
            f"{len(massive)} (block, dim) pairs" + (f", dims {sorted(set(massive.dim))}" if len(massive) else "")
        )
    if "down_in" in kinds:
        _print_down_in(stats)
    if stats.moments:
        _print_moments(stats)
    if out is not None:
        from outliers.analysis.plots import (
            kurtosis_by_block,
            layer_dim_heatmap,
            layers_vs_positions,
            magnitude_histogram,
        )
        from outliers.cache import save_csv, save_figure

        stats.save(out)
        save_csv(table, out / "summary.csv")
        for s in spaces:
            save_csv(per_dim(stats, Criteria(**{**base.__dict__, "space": s})), out / f"per_dim_{s}.csv")
        for scale, df in feats.items():
            save_csv(df, out / f"outlier_features_{scale}.csv")
        save_csv(top_values(stats, tokenizer), out / "top_values.csv")
        if stats.moments:
            from outliers.analysis.moments import moments_table

            save_csv(moments_table(stats), out / "moments.csv")
            save_figure(kurtosis_by_block(stats), out / "kurtosis.png")
        if massive is not None:
            save_csv(massive, out / "massive_activations.csv")
        for s in stats.spaces:
            save_figure(layer_dim_heatmap(stats, s), out / f"heatmap_{s}.png")
            save_figure(magnitude_histogram(stats, s), out / f"histogram_{s}.png")
        if "hidden" in spaces:
            save_figure(layers_vs_positions(stats, base), out / "layers_vs_positions.png")
            save_figure(
                layers_vs_positions(stats, Criteria(**{**base.__dict__, "scale": "relative"})),
                out / "layers_vs_positions_relative.png",
            )
        print(f"\nwrote statistics, CSV tables and figures to {out}")
    if args.range:
        from outliers.cli.range import after_scan

        after_scan(place(model), ids, args, bos_id, run_facts(args.model, info, corpus) | applied)
    return 0


def _print_down_in(stats) -> None:
    """Where the MLP's down projection reads its largest input: the birth of a massive activation."""
    from outliers.analysis.stats import Stat

    rows = [(float(stats.get(p.name, Stat.ABSMAX).max()), p) for p in stats.points if p.kind == "down_in"]
    value, point = max(rows, key=lambda r: r[0])
    dim = int(stats.get(point.name, Stat.ABSMAX).argmax())
    print(
        f"\ndown-projection input (the MLP's hidden activation, {point.dims} dims): largest |x| {value:.1f} "
        f"in block {point.layer}, dim {dim}; median over blocks of the block max "
        f"{sorted(r[0] for r in rows)[len(rows) // 2]:.1f}"
    )


def _print_moments(stats) -> None:
    """The quantizability summary (Bondarenko et al. 2023) and the per-block kurtosis table."""
    import pandas as pd

    from outliers.analysis.moments import layer_table, quantizability

    q = quantizability(stats)
    print("\nkurtosis (Pearson's: a normal distribution has 3) and ∞-norm (Bondarenko et al. 2023)")
    if q["max_inf_norm"] is not None:
        print(
            f"  block outputs: max ∞-norm {q['max_inf_norm']:.1f} (block {q['max_inf_norm_layer']}), "
            f"mean kurtosis {q['avg_kurtosis']:.1f} over {q['layers']} blocks (per sequence, all its values)"
        )
    else:
        print("  block outputs: not scanned (add --points residual for the paper's two numbers)")
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in q["token_kurtosis"].items())
    print(f"  token kurtosis (per token across dims), mean over blocks: {kinds}")
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(layer_table(stats).to_string(index=False, float_format=lambda v: f"{v:.1f}"))


def _describe(applied: dict) -> str:
    """One line on the transform a scan measured after."""
    parts = []
    if applied.get("smooth") is not None:
        parts.append(
            f"smoothing (alpha {applied['smooth']:g}, {applied['calib_tokens']} calibration tokens; "
            f"{applied['smoothed_into_norm']} groups folded into their norm, "
            f"{applied['smoothed_by_module']} by a module)"
        )
    if applied.get("rotate"):
        parts.append(f"{applied['rotate']} rotation (seed {applied['seed']}; {', '.join(applied['hadamard'])})")
    return " and ".join(parts)
