"""``outliers kvcache``: outlier channels of keys and values, before and after RoPE (KIVI; KVQuant)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from outliers.cli.common import check_out_dir, check_writable, require_causal, run_facts
from outliers.errors import InvalidArgumentError

SHORT = {"keys": "key", "keys_normed": "normed", "keys_cached": "cached", "values": "value"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kvcache", help="key-cache channels: outlier channels of keys and values, pre/post RoPE")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--k",
        type=float,
        default=4.0,
        help="a channel is an outlier at max |x| >= k x its layer's median channel max (default: %(default)s)",
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--out", metavar="DIR", help="write channels.csv, layers.csv, rope.csv and PNG figures here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def layer_table(res: Any) -> Any:
    """One row per layer: per kind the top channel (head:dim), its concentration and outlier count; RoPE overlap."""
    import pandas as pd

    table = pd.DataFrame({"layer": sorted(set(res.layers.layer))})
    for kind, g in res.layers.groupby("kind", sort=False):
        g = g.set_index("layer").reindex(table.layer)
        name = SHORT.get(str(kind), str(kind))
        table[f"{name} top"] = [f"{c // res.head_dim}:{c % res.head_dim}" for c in g.top_channel.astype(int)]
        table[f"{name} conc"] = g.concentration.to_numpy()
        table[f"{name} n"] = g.n_outliers.astype(int).to_numpy()
        if kind == "keys_cached" and len(res.rope):
            rope = res.rope.set_index("layer").reindex(table.layer)
            table["kept"] = rope.overlap.to_numpy()
            table["pairs kept"] = rope.pair_overlap.to_numpy()
        if kind == "values":
            table["value tok conc"] = g.token_concentration.to_numpy()
    return table


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.kvcache import kv_channels
    from outliers.analysis.kvcache_plots import LABELS
    from outliers.data.corpus import encode_corpus, load_corpus
    from outliers.models.load import load_model

    if not args.k > 1:
        raise InvalidArgumentError(f"--k must be > 1, got {args.k}")
    if args.window < 2 or args.max_windows < 1 or args.batch_size < 1:
        raise InvalidArgumentError("--window must be >= 2, --max-windows and --batch-size >= 1")
    json_path = check_writable(args.json) if args.json else None
    out = check_out_dir(args.out) if args.out else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress)
    require_causal(args.model, info, "it keeps no key-value cache")
    res = kv_channels(
        model,
        encode_corpus(tokenizer, corpus),
        window=args.window,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        k=args.k,
        progress=progress,
        meta=run_facts(args.model, info, corpus),
    )
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"{res.n_windows} windows of {res.window}, {res.kv_heads} kv heads x {res.head_dim} dims\n"
    )
    print(
        f"outlier channel: max |x| >= {res.k:g} x the layer's median channel max; conc = top channel max / median; "
        "top = kv_head:dim"
    )
    if res.cached == "projected":
        print("no RoPE and no key norm: the cache holds the projected keys (measured once, as 'key')")
    else:
        print(
            f"cached = keys as they enter the cache (RoPE on {res.rotary_dim} of {res.head_dim} dims per head); "
            "kept = share of pre-RoPE outlier channels still outliers after RoPE, pairs kept = the same over "
            "rotate_half pairs (d, d + r/2)"
        )
    print("value tok conc = largest token max |x| / median token max (per-token outliers)\n")
    with pd.option_context("display.max_rows", None, "display.width", 250):
        print(layer_table(res).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
    print("\nint8 absmax of each window, relative error ||X - X^|| / ||X|| (mean over layers):")
    summary = res.summary()
    quant = pd.DataFrame(
        [
            {"": LABELS.get(kind, kind), "per-token": s["err_per_token"], "per-channel": s["err_per_channel"]}
            for kind, s in summary.items()
        ]
    )
    print(quant.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    shares = ", ".join(f"{SHORT.get(kind, kind)} {s['layers_with_outliers']:.0%}" for kind, s in summary.items())
    print(f"\nlayers with outlier channels: {shares}")
    if json_path:
        from outliers.cache import atomic_write

        atomic_write(json_path, json.dumps(res.to_dict(), indent=1) + "\n")
    if out is not None:
        from outliers.analysis.kvcache_plots import kv_concentration, kv_heatmap
        from outliers.cache import save_csv, save_figure

        save_csv(res.channels, out / "channels.csv")
        save_csv(res.layers, out / "layers.csv")
        save_csv(res.rope, out / "rope.csv")
        kinds = list(summary)
        for kind in kinds:
            save_figure(kv_heatmap(res, kind), out / f"{kind}_heatmap.png")
        save_figure(kv_concentration(res), out / "concentration.png")
        pngs = ", ".join(f"{kind}_heatmap.png" for kind in kinds)
        print(f"\nwrote channels.csv, layers.csv, rope.csv, {pngs} and concentration.png to {out}")
    return 0
