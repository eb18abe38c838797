"""``outliers generate``: the float and a quantized model continue one prompt, side by side."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import textwrap

from outliers.cli.common import add_int8_gemm_arg, check_writable, require_causal, run_facts
from outliers.errors import InvalidArgumentError

# The built-in corpus is Python's pydoc topics: a line in their voice, which the packaged models continue.
DEFAULT_PROMPT = 'The "for" statement is used to'


def register(sub: argparse._SubParsersAction) -> None:
    from outliers.quant.methods import METHODS

    p = sub.add_parser("generate", help="greedy continuations of one prompt by the float and a quantized model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--method",
        default="llm.int8",
        help=f"one of the registered methods ({', '.join(METHODS)}) (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=6.0,
        help="LLM.int8() decomposition threshold (default: %(default)s; 0 = no decomposition)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text both models continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="per continuation (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_int8_gemm_arg(p)
    p.set_defaults(func=run)


def _columns(left: str, right: str, width: int) -> list[str]:
    """Two texts wrapped to ``width`` each, line by line, with a bar between them; their own newlines are kept."""

    def wrap(text: str) -> list[str]:
        return [piece for line in text.split("\n") for piece in (textwrap.wrap(line, width) or [""])]

    pairs = itertools.zip_longest(wrap(left), wrap(right), fillvalue="")
    return [f"{a:<{width}} | {b}".rstrip() for a, b in pairs]


def run(args: argparse.Namespace) -> int:
    from outliers.eval.generate import side_by_side
    from outliers.models.load import load_model
    from outliers.quant.int8 import check_threshold
    from outliers.quant.methods import get_method
    from outliers.quant.model import quantized_copy

    # Validate everything before spending seconds loading a model.
    get_method(args.method)
    check_threshold(args.threshold)
    if args.max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise InvalidArgumentError("--prompt is empty: give the text both models continue")
    json_path = check_writable(args.json) if args.json else None
    model, tokenizer, info = load_model(args.model, progress=not args.quiet)
    require_causal(args.model, info, "generation needs a causal LM")
    quantized, report = quantized_copy(model, args.method, args.threshold)
    res = side_by_side(model, quantized, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, method=args.method)

    ref, quant = res.reference, res.quantized
    method = args.method + (f" (threshold {report.threshold:g})" if report.threshold else "")
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}), "
        f"float vs {method}: greedy, at most {res.max_new_tokens} new tokens\n"
    )
    print(f"prompt: {res.prompt!r} ({len(res.prompt_ids)} tokens)\n")
    width = max(20, (shutil.get_terminal_size((100, 24)).columns - 3) // 2)
    print("\n".join(_columns(f"float ({info.dtype})", f"{res.method}: {res.label}", width)))
    print(f"{'-' * width}-+-{'-' * width}")
    eos = tokenizer.decode([res.eos_token_id]) if res.eos_token_id is not None else ""

    def shown(c) -> str:
        return f"{c.text}\n[stopped at EOS {eos!r}]" if c.stopped_at_eos else c.text

    print("\n".join(_columns(shown(ref), shown(quant), width)) + "\n")
    if res.diverge_tokens is None:
        print(f"identical: all {len(ref.ids)} new tokens agree")
    else:
        a, b = res.diverge_tokens
        print(f"diverge at new token {res.diverge_at}: {a!r} (float) vs {b!r} ({res.method})")
    print(
        f"perplexity under the float model: float {ref.ppl:.3f} ({len(ref.ids)} tokens), "
        f"{res.method} {quant.ppl:.3f} ({len(quant.ids)} tokens)"
    )
    if json_path:
        from outliers.cache import atomic_write

        record = res.to_dict() | run_facts(args.model, info)  # the prompt is in the record itself
        record |= {"threshold": report.threshold, "replaced": len(report.replaced), "skipped": report.skipped}
        atomic_write(json_path, json.dumps(record, indent=1) + "\n")
    return 0
