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

__all__ = ["main"]


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


def _cmd_eval(args: argparse.Namespace) -> int:
    import copy

    from .corpus import encode_corpus, load_corpus
    from .errors import InvalidArgumentError
    from .int8 import check_threshold
    from .models import load_model
    from .nn import METHODS, get_method
    from .perplexity import PerplexitySettings, perplexity
    from .qmodel import quantize_model

    json_path = _check_writable(args.json) if args.json else None
    # Validate everything before spending seconds loading a model.
    settings = PerplexitySettings(args.protocol, args.window, args.stride, args.max_windows, args.batch_size)
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
    results, reports = [], []
    for m in methods:
        target, report = model, None
        if m != "fp32":
            # One float model loaded, one copy per method: quantize_model works in place.
            target = copy.deepcopy(model) if len(methods) > 1 else model
            report = quantize_model(target, m, args.threshold, outlier_weights=args.outlier_weights,
                                    round_to=args.round_to)
        result = perplexity(target, ids, protocol=settings.protocol, window=settings.window,
                            stride=settings.stride, max_windows=settings.max_windows,
                            batch_size=settings.batch_size, progress=progress,
                            model_name=args.model, corpus_name=corpus.name,
                            method=m if m != "fp32" else None)
        if report is not None:
            result.extra.update(threshold=report.threshold, outlier_weights=report.outlier_weights,
                                round_to=args.round_to,
                                replaced=len(report.replaced), skipped=report.skipped,
                                weight_bytes_before=report.bytes_before, weight_bytes_after=report.bytes_after)
        results.append(result)
        del target
    head = [
        ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params, {info.dtype})"),
        ("corpus", f"{corpus.name} ({len(ids)} tokens)"),
        ("protocol", f"{results[0].protocol}, window {results[0].window}"
                     + (f", stride {results[0].stride}" if results[0].protocol == "sliding" else "")
                     + f", {results[0].n_windows} windows, {results[0].n_tokens} tokens scored"),
    ]
    if len(results) == 1:
        r = results[0]
        method = r.method + (f" (threshold {r.extra['threshold']})" if r.extra.get("threshold") else "")
        _print_table(head + [("method", method), ("perplexity", r.ppl), ("mean NLL", r.nll),
                             ("tokens scored", r.n_tokens), ("seconds", r.seconds), ("tokens/s", r.tokens_per_s)])
    else:
        _print_table(head)
        print(_method_table(results, args.model, args.threshold))
    if json_path:
        payload = [r.to_dict() | {"model_info": info.to_dict(), "corpus_sha256": corpus.sha256} for r in results]
        try:
            json_path.write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2) + "\n")
        except OSError as e:  # the numbers are printed above: nothing is lost
            raise OutputPathError(f"could not write --json {json_path}: {e}") from e
    return 0


def _method_table(results: list, model: str, threshold: float) -> str:
    """The paper's Table-1 layout: one row per method, one perplexity column per model."""
    names = {"fp32": "32-bit float"}
    width = max(len(names.get(r.method, r.method)) for r in results)
    lines = [f"\n| {'method':<{width}} | {model} | tokens/s |", f"|{'-' * (width + 2)}|{'-' * (len(model) + 2)}|---|"]
    for r in results:
        label = names.get(r.method, r.method)
        lines.append(f"| {label:<{width}} | {r.ppl:>{len(model)}.3f} | {r.tokens_per_s:.0f} |")
    lines.append(f"\nDecomposition threshold {threshold}; lm_head kept in float; {results[0].protocol} "
                 f"windows of {results[0].window}.")
    return "\n".join(lines)


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
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OutliersError as e:
        print(f"outliers: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
