"""``outliers weights``: weight outliers per linear layer and their int8 reconstruction error (Dettmers et al. 2022)."""

from __future__ import annotations

import argparse
import json

from outliers.cli.common import check_out_dir, check_writable, run_facts
from outliers.errors import InvalidArgumentError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="weight outliers: max |w|, kurtosis, 6-sigma share and int8 error per layer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--layer", metavar="NAME", help="the layer to histogram (default: the one with the largest kurtosis)"
    )
    p.add_argument("--show", type=int, default=5, help="layers to print per ranking (default: %(default)s)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--out", metavar="DIR", help="write weights.csv and PNG figures here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.weights import N_CODES, weight_histogram, weight_stats
    from outliers.models.load import load_model

    if args.show < 0:
        raise InvalidArgumentError(f"--show must be >= 0, got {args.show}")
    json_path = check_writable(args.json) if args.json else None
    out = check_out_dir(args.out) if args.out else None
    progress = not args.quiet
    model, _, info = load_model(args.model, progress=progress)
    facts = run_facts(args.model, info)
    res = weight_stats(model, progress=progress, meta=facts)
    if not len(res.layers):
        raise InvalidArgumentError(f"model '{args.model}' has no linear layer that quantize_model would replace")
    s = res.summary()
    layer = args.layer or s["max_kurtosis_layer"]
    hist = weight_histogram(model, layer, meta=facts)
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}): "
        f"{s['n_layers']} linear layers, {s['n_weights'] / 1e6:.1f}M weights, as quantize_model replaces them "
        f"(left in float: {', '.join(res.skipped) or 'none'})\n"
    )
    print(
        f"max |w|          {s['max_abs']:.4g} in {s['max_abs_layer']}\n"
        f"kurtosis         mean {s['mean_kurtosis']:.3g}, median {s['median_kurtosis']:.3g}, "
        f"max {s['max_kurtosis']:.4g} in {s['max_kurtosis_layer']} (normal = 3)\n"
        f"beyond 6 sigma   {s['beyond_6sigma']:.3e} of all weights ({s['n_beyond_6sigma']}), "
        f"in {s['layers_beyond_6sigma']} of {s['n_layers']} layers"
    )
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    cols = ["name", "max_abs", "row", "col", "std", "kurtosis", "beyond_6sigma"]
    for column, title in (("max_abs", "largest max |w|"), ("kurtosis", "largest kurtosis")):
        if args.show:
            print(f"\n{title}:")
            print(res.top(column, args.show)[cols].to_string(**fmt))
    errors = pd.DataFrame(
        [
            {
                "method": m,
                "mean_rel_err": s[f"mean_rel_err_{m.replace('-', '_')}"],
                "max_rel_err": s[f"max_rel_err_{m.replace('-', '_')}"],
                "max_abs_err": s[f"max_err_{m.replace('-', '_')}"],
                "worst layer": s[f"max_rel_err_{m.replace('-', '_')}_layer"],
            }
            for m in res.methods
        ]
    )
    print(f"\nint8 reconstruction of W: relative error ||W - Ŵ||_F / ||W||_F over the {s['n_layers']} layers")
    print(errors.to_string(**fmt))
    codes = ", ".join(f"{m} {n} of {N_CODES[m]} (error {hist.rel_err[m]:.2%})" for m, n in hist.codes_used.items())
    why = "--layer" if args.layer else "largest kurtosis"
    print(f"\nhistogram of {hist.name} ({why}), int8 codes used: {codes}")
    if json_path:
        from outliers.cache import atomic_write

        d = res.to_dict() | {"histogram": hist.to_dict()}
        atomic_write(json_path, json.dumps(d, indent=1) + "\n")
    if out is not None:
        from outliers.analysis.plots import weight_layers, weight_reconstructions
        from outliers.cache import save_csv, save_figure

        save_csv(res.layers, out / "weights.csv")
        save_figure(weight_layers(res), out / "weight_layers.png")
        save_figure(weight_reconstructions(hist), out / "weight_histogram.png")
        print(f"\nwrote weights.csv, weight_layers.png and weight_histogram.png to {out}")
    return 0
