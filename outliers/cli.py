"""``outliers`` command line: a thin front end over the Python API.

Errors the toolkit raises on purpose (``OutliersError``) print one line,
``outliers: error: ...``, and exit 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import OutliersError, OutputPathError

__all__ = ["main", "dispatch"]


def _check_writable(path: str) -> Path:
    """Fail before a long run, not after it, when ``--json`` cannot be written."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputPathError(f"--json path {path} is a folder; give a file name")
    if not parent.is_dir():
        raise OutputPathError(f"--json path {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputPathError(f"--json path {path} is not writable")
    return p


def _print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = list_models()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "installed" if r["installed"] else f"missing: {r['install']}"
        print(f"{r['name']:<{w}}  {r['kind']:<7}  {state}\n{'':<{w}}  {r['description']}")
    return 0


def _ci(ci, fmt: str = ".3f", scale: float = 1.0) -> str:
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]" if ci else ""


def _cmd_eval(args: argparse.Namespace) -> int:
    from .corpus import bos_token_id, encode_corpus, load_corpus
    from .errors import InvalidArgumentError
    from .int8 import check_threshold
    from .intervals import few_windows_note
    from .models import load_model
    from .nn import METHODS, get_method
    from .perplexity import PerplexitySettings, perplexity
    from .qmodel import quantized_copy

    json_path = _check_writable(args.json) if args.json else None
    # Validate everything before spending seconds loading a model.
    settings = PerplexitySettings(args.protocol, args.window, args.stride, args.max_windows, args.batch_size,
                                  args.bos)
    methods = ["fp32", *METHODS] if args.method == "all" else [args.method]
    for m in methods:
        if m != "fp32":
            get_method(m)
    check_threshold(args.threshold)
    progress = not args.quiet
    corpus = load_corpus(args.corpus)  # cheap: its errors come before a model load
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    if info.kind != "causal":
        raise InvalidArgumentError(
            f"model '{args.model}' is an encoder ({info.architecture}); perplexity needs a causal LM")
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if settings.bos == "window" else None
    ref_states: dict | None = {} if len(methods) > 1 else None  # the reference runs once for all methods
    results = []
    for m in methods:
        target, report = model, None
        if m != "fp32":
            target, report = quantized_copy(model, m, args.threshold, outlier_weights=args.outlier_weights,
                                            round_to=args.round_to)
        result = perplexity(target, ids, protocol=settings.protocol, window=settings.window,
                            stride=settings.stride, max_windows=settings.max_windows,
                            batch_size=settings.batch_size, bos=settings.bos, bos_token_id=bos_id,
                            reference=model if report is not None else None, reference_states=ref_states,
                            progress=progress, model_name=args.model, corpus_name=corpus.name,
                            method=m if m != "fp32" else None)
        if report is not None:
            result.extra.update(threshold=report.threshold, outlier_weights=report.outlier_weights,
                                round_to=args.round_to,
                                replaced=len(report.replaced), skipped=report.skipped,
                                weight_bytes_before=report.bytes_before, weight_bytes_after=report.bytes_after)
        results.append(result)
        del target
    r0 = results[0]
    head = [
        ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights})"),
        ("corpus", f"{corpus.name} ({len(ids)} tokens, sha256 {corpus.sha256[:12]})"),
        ("protocol", f"{r0.protocol}, window {r0.window}"
                     + (f", stride {r0.stride}" if r0.protocol == "sliding" else "")
                     + f", bos {r0.bos}, {r0.n_windows} windows, {r0.n_tokens} tokens scored"),
    ]
    if len(results) == 1:
        _print_table(head + _result_rows(r0))
    else:
        _print_table(head)
        print(_method_table(results, args.model, args.threshold))
    if note := few_windows_note(r0.n_windows):
        print(f"note: {note}", file=sys.stderr)
    if json_path:
        from .cache import atomic_write

        payload = [r.to_dict() | {"model_info": info.to_dict(), "corpus_sha256": corpus.sha256} for r in results]
        try:
            atomic_write(json_path, json.dumps(payload[0] if len(payload) == 1 else payload, indent=2) + "\n")
        except OSError as e:  # the numbers are printed above: nothing is lost
            raise OutputPathError(f"could not write --json {json_path}: {e}") from e
    return 0


def _result_rows(r) -> list[tuple[str, Any]]:
    """One result as printed by ``outliers eval``: the number, its interval, and its agreement with the reference."""
    n = f"95 % CI over {r.n_windows} windows"
    method = r.method + (f" (threshold {r.extra['threshold']})" if r.extra.get("threshold") else "")
    rows: list[tuple[str, Any]] = [("method", method), ("perplexity", f"{r.ppl:.4f}  {_ci(r.ppl_ci95)}  {n}"),
                                   ("mean NLL", r.nll), ("tokens scored", r.n_tokens)]
    if r.ref_ppl is not None:
        rows += [("reference", f"{r.ref_dtype} {r.ref_ppl:.4f} (the unquantized model, same windows)"),
                 ("vs reference", f"{r.delta_ppl_pct:+.2f} % {_ci(r.delta_ppl_pct_ci95, '+.2f')}  paired, {n}"),
                 ("KL vs reference", f"{r.kl_vs_ref:.5f} nats/token {_ci(r.kl_vs_ref_ci95, '.5f')}"),
                 ("top-1 agreement", f"{100 * r.top1_agreement:.2f} % {_ci(r.top1_agreement_ci95, '.2f', 100)}")]
    rows += [("seconds", r.seconds), ("tokens/s", r.tokens_per_s)]
    if r.ref_seconds:
        rows.append(("reference s", r.ref_seconds))
    return rows


def _method_table(results: list, model: str, threshold: float) -> str:
    """The paper's Table-1 layout for one model, with intervals and agreement with the float model."""
    from .nn import label

    rows = []
    for r in results:
        delta = "" if r.delta_ppl_pct is None else f"{r.delta_ppl_pct:+.1f} % {_ci(r.delta_ppl_pct_ci95, '+.1f')}"
        agree = "" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f} %"
        kl = "" if r.kl_vs_ref is None else f"{r.kl_vs_ref:.4f}"
        rows.append((label(r.method), f"{r.ppl:.3f} {_ci(r.ppl_ci95)}", delta, kl, agree, f"{r.tokens_per_s:.0f}"))
    head = ("method", model, "vs fp32 (95 % CI)", "KL", "top-1", "tokens/s")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = ["", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    lines.append(f"\nDecomposition threshold {threshold}; lm_head kept in float; {results[0].protocol} "
                 f"windows of {results[0].window}; intervals over {results[0].n_windows} windows, paired "
                 "against fp32 on the same windows; KL(P_fp32 || P_method) in nats/token.")
    return "\n".join(lines)


def _cmd_scan(args: argparse.Namespace) -> int:
    import warnings

    import pandas as pd

    from .corpus import bos_token_id, encode_corpus, load_corpus
    from .criteria import Criteria, massive_activations, outlier_features, per_dim, summary, top_values
    from .models import load_model
    from .points import parse_kinds
    from .scan import scan

    kinds = parse_kinds(args.points)
    base = Criteria(args.layers, args.positions, args.layer_unit, args.position_mode)  # validates early
    if args.threshold <= 0:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"threshold must be > 0, got {args.threshold}")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise OutputPathError(f"--out {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise OutputPathError(f"--out {out} is not writable")
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if args.bos == "window" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = scan(model, ids, points=kinds, threshold=args.threshold, relative_k=args.relative_k,
                     max_tokens=args.max_tokens, window=args.window, batch_size=args.batch_size,
                     progress=progress, bos_token_id=bos_id,
                     meta={"model": args.model, "corpus": corpus.name, "corpus_sha256": corpus.sha256,
                           "architecture": info.architecture, "n_params": info.n_params,
                           "weights": info.weights, "weights_sha256": info.weights_sha256})
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    spaces = [s for s in ("hidden", "heads", "residual") if s in stats.spaces and s != "residual"]
    rows = [summary(stats, Criteria(**{**base.__dict__, "space": s, "scale": scale}))
            for s in spaces for scale in ("absolute", "relative")]
    table = pd.DataFrame(rows, columns=["space", "criterion", "outlier_dims", "pct_layers", "pct_positions",
                                        "tokens"])
    print(f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
          f"{stats.meta['tokens_scanned']} tokens, layer={base.layer_unit}, positions={base.position_mode}, "
          f"criteria >= {100 * base.layers:g} % layers and >= {100 * base.positions:g} % positions\n")
    if len(table):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    feats = {scale: outlier_features(stats, Criteria(**{**base.__dict__, "scale": scale}))
             for scale in ("absolute", "relative")} if "hidden" in spaces else {}
    cols = ["dim", "pct_layers", "pct_positions", "max_abs", "median_layer_max", "mean_outlier_value", "one_sided"]
    for scale, df in feats.items():
        shown = cols if scale == "absolute" else cols[:5]  # sidedness is measured at the absolute threshold
        print(f"\noutlier features, hidden space, {scale} criterion ({len(df)}):")
        print(df[shown].head(args.show).to_string(index=False, float_format=lambda v: f"{v:.2f}")
              if len(df) else "  none")
    massive = massive_activations(stats) if "residual" in kinds else None
    if massive is not None:
        print(f"\nmassive activations (residual stream, |x| > 100 and > 1000x the hidden state's median): "
              f"{len(massive)} (block, dim) pairs" + (f", dims {sorted(set(massive.dim))}" if len(massive) else ""))
    if out is not None:
        from .cache import save_csv, save_figure
        from .plots import layer_dim_heatmap, layers_vs_positions, magnitude_histogram

        stats.save(out)
        save_csv(table, out / "summary.csv")
        for s in spaces:
            save_csv(per_dim(stats, Criteria(**{**base.__dict__, "space": s})), out / f"per_dim_{s}.csv")
        for scale, df in feats.items():
            save_csv(df, out / f"outlier_features_{scale}.csv")
        save_csv(top_values(stats, tokenizer), out / "top_values.csv")
        if massive is not None:
            save_csv(massive, out / "massive_activations.csv")
        for s in stats.spaces:
            save_figure(layer_dim_heatmap(stats, s), out / f"heatmap_{s}.png")
            save_figure(magnitude_histogram(stats, s), out / f"histogram_{s}.png")
        if "hidden" in spaces:
            save_figure(layers_vs_positions(stats, base), out / "layers_vs_positions.png")
            save_figure(layers_vs_positions(stats, Criteria(**{**base.__dict__, "scale": "relative"})),
                        out / "layers_vs_positions_relative.png")
        print(f"\nwrote statistics, CSV tables and figures to {out}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    import pandas as pd

    from .ablate import ablation_study
    from .corpus import encode_corpus, load_corpus
    from .criteria import Criteria, outlier_features
    from .errors import InvalidArgumentError
    from .models import load_model
    from .points import parse_kinds
    from .scan import scan

    kinds = parse_kinds(args.points)
    dims: list[int] | None = None
    if args.dims != "auto":
        try:
            dims = [int(d) for d in args.dims.split(",") if d.strip()]
        except ValueError:
            raise InvalidArgumentError(f"--dims must be 'auto' or a comma list of integers, got {args.dims!r}") from None
    json_path = _check_writable(args.json) if args.json else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress, attn_implementation="eager")
    ids = encode_corpus(tokenizer, corpus)
    stats = None
    if dims is None or args.mode == "mean":
        stats = scan(model, ids, points=kinds, threshold=args.threshold, max_tokens=args.scan_tokens,
                     window=args.window, progress=progress, meta={"model": args.model})
    if dims is None:
        dims = outlier_features(stats, Criteria()).dim.tolist()
        if not dims:
            raise InvalidArgumentError(f"no outlier features found in {args.model} at threshold {args.threshold}; "
                                       "pass --dims explicitly")
        print(f"outlier dims (paper criteria, {stats.meta['tokens_scanned']} tokens scanned): {dims}")
    df = ablation_study(model, ids, dims, points=list(kinds), mode=args.mode, controls=args.controls,
                        seed=args.seed, window=args.window, max_windows=args.max_windows, stats=stats,
                        progress=progress)
    print(f"{info.name} ({info.weights}): {args.mode} dims at {args.points}, {args.max_windows} windows of {args.window}\n")
    with pd.option_context("display.width", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if json_path:
        from .cache import atomic_write

        atomic_write(json_path, df.to_json(orient="records", indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="outliers", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"outliers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the built-in models and whether each is installed")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("eval", help="perplexity of a model on a corpus")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name, model folder, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--corpus", default="builtin",
                   help="'builtin', a UTF-8 text file, or hf:NAME[:CONFIG]:SPLIT (default: %(default)s)")
    p.add_argument("--protocol", choices=("chunks", "sliding"), default="chunks")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="sliding only; default window/2")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (float16 only on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="fp32",
                   help="fp32 (no quantization), one of the Table-1 methods (absmax, zeropoint, absmax-row, "
                        "absmax-vector, zeropoint-vector, absmax-row+decomp, llm.int8, zeropoint-llm.int8), "
                        "or 'all' for the Table-1 layout (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=6.0,
                   help="LLM.int8() decomposition threshold (default: %(default)s; 0 = no decomposition)")
    p.add_argument("--outlier-weights", choices=("int8", "fp"), default="int8",
                   help="outlier columns' weights: dequantized int8 (bitsandbytes) or the float "
                        "originals (the paper) (default: %(default)s)")
    p.add_argument("--round-to", choices=("float16", "bfloat16"), default=None,
                   help="round X and W to this dtype before quantizing; float16 reproduces "
                        "bitsandbytes' arithmetic on a float32 model")
    p.add_argument("--bos", choices=("corpus", "window"), default="corpus",
                   help="corpus: windows are slices of the corpus as tokenized (one BOS at its start, where the "
                        "tokenizer adds one); window: every window is BOS + window-1 corpus tokens, all scored "
                        "(default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("scan", help="outlier-feature statistics by forward hooks")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--points", default="attn,ffn",
                   help="capture points: attn (= attn_in,attn_out), ffn, residual, or kinds (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=6.0, help="magnitude cut-off (default: %(default)s)")
    p.add_argument("--relative-k", type=float, default=6.0,
                   help="scale-relative cut-off: |x| >= k x rms(token) (default: %(default)s)")
    p.add_argument("--layers", type=float, default=0.25, help="fraction of layers (default: %(default)s)")
    p.add_argument("--positions", type=float, default=0.06, help="fraction of positions (default: %(default)s)")
    p.add_argument("--layer-unit", choices=("block", "point"), default="block")
    p.add_argument("--position-mode", choices=("union", "max", "mean"), default="union")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bos", choices=("corpus", "window"), default="corpus",
                   help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)")
    p.add_argument("--show", type=int, default=20, help="rows of the outlier tables to print")
    p.add_argument("--out", metavar="DIR", help="write statistics, CSV tables and PNG figures here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_scan)

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
    p.set_defaults(func=_cmd_ablate)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Run the chosen subcommand; the toolkit's own errors become one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OutliersError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    from .threads import configure_threads

    configure_threads()  # before torch loads: import outliers is lazy
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
