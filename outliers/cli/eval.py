"""``outliers eval``: perplexity of a model on a corpus, one method or the Table-1 layout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from outliers.cli.common import (
    add_device_map_args,
    add_int8_gemm_arg,
    add_transform_args,
    check_writable,
    ci,
    placement_of,
    print_table,
    transform_of,
)
from outliers.errors import OutputPathError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a corpus")
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
    p.add_argument("--protocol", choices=("chunks", "sliding"), default="chunks")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="sliding only; default window/2")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (float16 only on CUDA)")
    p.add_argument("--device", default="cpu")
    add_device_map_args(p)
    from outliers.quant.methods import METHODS

    p.add_argument(
        "--method",
        default="fp32",
        help=f"fp32 (no quantization), one of the methods ({', '.join(METHODS)}), smoothquant "
        "(absmax-vector after smoothing, alpha --smooth or 0.5), a row name with its transform "
        "(llm.int8@hadamard, absmax-vector@smooth=0.5), a comma-separated list of them, or 'all' "
        "for the Table-1 layout (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=6.0,
        help="LLM.int8() decomposition threshold (default: %(default)s; 0 = no decomposition)",
    )
    p.add_argument(
        "--outlier-weights",
        choices=("int8", "fp"),
        default="int8",
        help="outlier columns' weights: dequantized int8 (bitsandbytes) or the float "
        "originals (the paper) (default: %(default)s)",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the output head too (kept in float by default, as bitsandbytes and the paper do); "
        "a head tied to the input embedding stays tied in the float model, the lookup unchanged",
    )
    p.add_argument(
        "--round-to",
        choices=("float16", "bfloat16"),
        default=None,
        help="round X and W to this dtype before quantizing; float16 reproduces "
        "bitsandbytes' arithmetic on a float32 model",
    )
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="corpus: windows are slices of the corpus as tokenized (one BOS at its start, where the "
        "tokenizer adds one); window: every window is BOS + window-1 corpus tokens, all scored "
        "(default: %(default)s)",
    )
    add_transform_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    add_int8_gemm_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.errors import InvalidArgumentError
    from outliers.eval.intervals import few_windows_note
    from outliers.eval.perplexity import PerplexitySettings, perplexity
    from outliers.models.load import load_model
    from outliers.quant.int8 import check_threshold
    from outliers.quant.methods import get_method
    from outliers.quant.model import quantized_copy

    json_path = check_writable(args.json) if args.json else None
    # Validate everything before spending seconds loading a model.
    settings = PerplexitySettings(args.protocol, args.window, args.stride, args.max_windows, args.batch_size, args.bos)
    rows = _rows(args.method, transform_of(args))
    for m, _ in rows:
        if m != "fp32":
            get_method(m)
    check_threshold(args.threshold)
    place = placement_of(args)  # with a map the float model stays on the CPU; each row runs dispatched
    progress = not args.quiet
    corpus = load_corpus(args.corpus)  # cheap: its errors come before a model load
    started = time.perf_counter()
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    load_s = time.perf_counter() - started
    if info.kind != "causal":
        raise InvalidArgumentError(
            f"model '{args.model}' is an encoder ({info.architecture}); perplexity needs a causal LM"
        )
    skip = quantize_skip(model, args.quantize_lm_head)
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if settings.bos == "window" else None
    calib_corpus = load_corpus(args.calib_corpus) if args.calib_corpus else corpus
    calib = encode_corpus(tokenizer, calib_corpus) if args.calib_corpus else ids
    # the evaluated text itself, under another name, must not calibrate on what it evaluates either
    reserved = _evaluated_tokens(len(ids), settings) if calib_corpus.sha256 == corpus.sha256 else 0
    rows = _calibratable(rows, calib, settings.window, reserved, optional=args.method == "all" and not args.smooth)
    gemm_line = None  # which exact int8 GEMM the quantized rows ran on: a set-up fact, not a result
    ref_states: dict | None = {} if len(rows) > 1 else None  # the reference runs once for all methods
    results, labels = [], []
    made: tuple[Any, Any, dict[str, Any]] | None = None  # one transformed copy at a time, for its rows
    for m, transform in rows:
        source, applied = model, dict[str, Any]()
        setup = {"load_seconds": load_s}  # one-time costs, reported apart from tokens/s
        if transform:
            from outliers.quant.calibration import transformed_copy

            if made is None or made[0] != transform:
                made = None  # the previous copy goes before the next is made
                started = time.perf_counter()
                copy_, done = transformed_copy(
                    model, transform, calib, window=settings.window, reserved=reserved, batch_size=settings.batch_size
                )
                setup["transform_seconds"] = time.perf_counter() - started
                made = (transform, copy_, done)
            _, source, applied = made
        target, report = source, None
        if m != "fp32":
            started = time.perf_counter()
            target, report = quantized_copy(
                source, m, args.threshold, skip=skip, outlier_weights=args.outlier_weights, round_to=args.round_to
            )
            setup["quantize_seconds"] = time.perf_counter() - started
        result = perplexity(
            place(target),
            ids,
            protocol=settings.protocol,
            window=settings.window,
            stride=settings.stride,
            max_windows=settings.max_windows,
            batch_size=settings.batch_size,
            bos=settings.bos,
            bos_token_id=bos_id,
            reference=place(model) if report is not None or transform else None,
            reference_states=ref_states,
            progress=progress,
            model_name=args.model,
            corpus_name=corpus.name,
            method=m if m != "fp32" else None,
        )
        if report is not None:
            result.extra.update(
                threshold=report.threshold,
                outlier_weights=report.outlier_weights,
                round_to=args.round_to,
                replaced=len(report.replaced),
                skipped=report.skipped,
                weight_bytes_before=report.bytes_before,
                weight_bytes_after=report.bytes_after,
            )
        result.extra.update(applied)
        result.extra.update(setup)
        if report is not None and device_is_cpu(target):
            from outliers.quant.gemm import describe_choice, record

            result.extra["int8_gemm"] = record()
            gemm_line = describe_choice()
        results.append(result)
        labels.append(_label(m, transform, result.dtype))
        del target, source
    r0 = results[0]
    head = [
        ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights})"),
        ("corpus", f"{corpus.name} ({len(ids)} tokens, sha256 {corpus.sha256[:12]})"),
        (
            "protocol",
            f"{r0.protocol}, window {r0.window}"
            + (f", stride {r0.stride}" if r0.protocol == "sliding" else "")
            + f", bos {r0.bos}, {r0.n_windows} windows, {r0.n_tokens} tokens scored",
        ),
    ]
    if len(results) == 1:
        m, transform = rows[0]
        name = r0.dtype if m == "fp32" else m  # the unquantized model as loaded: bf16 is not fp32
        gemm_row = [("int8 GEMM", gemm_line)] if gemm_line else []
        print_table(head + _result_rows(r0, name + (f" after {transform.label}" if transform else "")) + gemm_row)
    else:
        print_table(head)
        print(_method_table(results, labels, args.model, args.threshold, head_quantized=skip is not None))
        if gemm_line:
            print(f"int8 GEMM: {gemm_line}")
    if note := few_windows_note(r0.n_windows):
        print(f"note: {note}", file=sys.stderr)
    if json_path:
        from outliers.cache import atomic_write

        payload = [r.to_dict() | {"model_info": info.to_dict(), "corpus_sha256": corpus.sha256} for r in results]
        try:
            atomic_write(json_path, json.dumps(payload[0] if len(payload) == 1 else payload, indent=2) + "\n")
        except OSError as e:  # the numbers are printed above: nothing is lost
            raise OutputPathError(f"could not write --json {json_path}: {e}") from e
    return 0


def device_is_cpu(model: Any) -> bool:
    """Whether the model's first parameter is on the CPU, where ``outliers.quant.gemm`` runs its products."""
    first = next(iter(model.parameters()), None)
    return first is None or first.device.type == "cpu"


def _rows(method: str, transform: Any) -> list[tuple[str, Any]]:
    """The (method, transform) pairs to evaluate: one, or the Table-1 layout with a SmoothQuant row."""
    from dataclasses import replace

    from outliers.quant.methods import METHODS

    smoothquant = ("absmax-vector", replace(transform, smooth=0.5 if transform.smooth is None else transform.smooth))
    if method == "all":
        rows = [("fp32", type(transform)()), *((m, transform) for m in METHODS)]
        return rows + ([smoothquant] if transform.smooth is None else [])
    from outliers.errors import InvalidArgumentError
    from outliers.quant.transforms import parse_row

    names = [n.strip() for n in method.split(",") if n.strip()]
    if transform and any("@" in n for n in names):
        raise InvalidArgumentError("give a transform in the row name (llm.int8@hadamard) or by flags, not both")
    rows = [
        smoothquant
        if n == "smoothquant"
        else parse_row(n, seed=transform.seed, calib_windows=transform.calib_windows)
        if "@" in n
        else (n, transform)
        for n in names
    ]
    if len(names) > 1 and "fp32" not in names:
        rows.insert(0, ("fp32", type(transform)()))  # a table starts from its baseline, the float model as it is
    return rows


_FLOAT_LABELS = {"bf16": "bfloat16", "fp16": "16-bit float"}  # the unquantized row of a model loaded so


def _label(method: str, transform: Any, dtype: str = "fp32") -> str:
    """A row's name: the method's label and the transform before it (``smooth 0.5 + hadamard``); the
    unquantized row names the dtype the model was loaded in."""
    from outliers.quant.methods import label

    if method == "absmax-vector" and transform.smooth is not None and not transform.rotate:
        return f"SmoothQuant (smooth {transform.smooth:g}, absmax vector-wise)"
    base = _FLOAT_LABELS.get(dtype, label(method)) if method == "fp32" else label(method)
    return base + (f" after {transform.label}" if transform else "")


def _calibratable(rows: list, ids: Any, window: int, reserved: int, *, optional: bool) -> list:
    """The rows whose smoothing can calibrate apart from the evaluated tokens; checked before any is scored.

    ``optional``: a row that cannot is left out with a note (the SmoothQuant row ``--method all`` adds),
    else its ``CorpusError`` stops the command before the first row.
    """
    from outliers.errors import CorpusError
    from outliers.quant.calibration import calibration_windows

    out = []
    for m, transform in rows:
        if transform.smooth is not None:
            try:
                calibration_windows(ids, window, transform.calib_windows, reserved=reserved)
            except CorpusError as e:
                if not optional:
                    raise CorpusError(f"{e}; or evaluate fewer tokens (--max-windows)") from None
                print(f"note: no SmoothQuant row: {e}; or evaluate fewer tokens (--max-windows)", file=sys.stderr)
                continue
        out.append((m, transform))
    return out


def _evaluated_tokens(n: int, settings: Any) -> int:
    """How many tokens from the corpus' start evaluation reads: calibration must start after them."""
    if settings.max_windows is None:
        return n
    step = settings.window if settings.protocol == "chunks" else (settings.stride or settings.window // 2)
    return min(n, settings.window + (settings.max_windows - 1) * step)


def _result_rows(r, name: str) -> list[tuple[str, Any]]:
    """One result as printed by ``outliers eval``: the number, its interval, and its agreement with the reference."""
    n = f"95 % CI over {r.n_windows} windows"
    method = name + (f" (threshold {r.extra['threshold']})" if r.extra.get("threshold") else "")
    rows: list[tuple[str, Any]] = [
        ("method", method),
        ("perplexity", f"{r.ppl:.4f}  {ci(r.ppl_ci95)}  {n}"),
        ("mean NLL", r.nll),
        ("tokens scored", r.n_tokens),
    ]
    if r.ref_ppl is not None:
        rows += [
            ("reference", f"{r.ref_dtype} {r.ref_ppl:.4f} (the unquantized model, same windows)"),
            ("vs reference", f"{r.delta_ppl_pct:+.2f} % {ci(r.delta_ppl_pct_ci95, '+.2f')}  paired, {n}"),
            ("KL vs reference", f"{r.kl_vs_ref:.5f} nats/token {ci(r.kl_vs_ref_ci95, '.5f')}"),
            ("top-1 agreement", f"{100 * r.top1_agreement:.2f} % {ci(r.top1_agreement_ci95, '.2f', 100)}"),
        ]
    rows += _speed_rows(r)
    if r.ref_seconds:
        rows.append(("reference s", r.ref_seconds))
    return rows


def _speed_rows(r) -> list[tuple[str, Any]]:
    """Steady-state speed, and the one-time costs apart: load, transform, quantize, the first batch's warm-up.

    The first batch loads the int8 kernels from their cache and sets up the int8 GEMM; counting it
    would make a short run's ratio to fp32 a measure of set-up.
    """
    if r.steady_tokens_per_s is not None:
        steady = f"{r.steady_tokens_per_s:.1f}  steady state, after the first batch"
    else:
        steady = f"{r.tokens_per_s:.1f}  one batch: includes its warm-up"
    setup = [
        f"{what} {r.extra[key]:.2f} s"
        for what, key in (
            ("load", "load_seconds"),
            ("transform", "transform_seconds"),
            ("quantize", "quantize_seconds"),
        )
        if key in r.extra
    ]
    if r.warmup_seconds is not None:
        setup.append(f"first batch {r.warmup_seconds:.2f} s")
    return [
        ("tokens/s", steady),
        ("seconds", f"{r.seconds:.3f}  all batches, {r.tokens_per_s:.1f} tokens/s with the first"),
        ("set-up", ", ".join(setup)),
    ]


def _method_table(
    results: list, labels: list[str], model: str, threshold: float, *, head_quantized: bool = False
) -> str:
    """The paper's Table-1 layout for one model, with intervals and agreement with the float model."""
    rows = []
    for r, name in zip(results, labels, strict=True):
        delta = "" if r.delta_ppl_pct is None else f"{r.delta_ppl_pct:+.1f} % {ci(r.delta_ppl_pct_ci95, '+.1f')}"
        agree = "" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f} %"
        kl = "" if r.kl_vs_ref is None else f"{r.kl_vs_ref:.4f}"
        speed = r.steady_tokens_per_s if r.steady_tokens_per_s is not None else r.tokens_per_s
        first = f"{r.warmup_seconds:.2f}" if r.warmup_seconds is not None else ""
        setup = r.extra.get("quantize_seconds", 0.0) + r.extra.get("transform_seconds", 0.0)
        rows.append((name, f"{r.ppl:.3f} {ci(r.ppl_ci95)}", delta, kl, agree, f"{speed:.0f}", first, f"{setup:.2f}"))
    base = results[0].dtype  # the unquantized model as loaded: fp32, or bf16
    head = ("method", model, f"vs {base} (95 % CI)", "KL", "top-1", "tokens/s", "first batch s", "set-up s")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    lines = ["", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    r0 = results[0]
    steady = "after the first batch" if r0.steady_tokens_per_s is not None else "one batch, warm-up included"
    lines.append(
        f"\nDecomposition threshold {threshold}; lm_head {'quantized' if head_quantized else 'kept in float'}; "
        f"{r0.protocol} windows of {r0.window}; intervals over {r0.n_windows} windows, paired "
        f"against {base} on the same windows; KL(P_{base} || P_method) in nats/token. tokens/s: steady state "
        f"({steady}); set-up s: transform and quantization; model load {r0.extra.get('load_seconds', 0.0):.2f} s."
    )
    return "\n".join(lines)


def quantize_skip(model: Any, quantize_lm_head: bool) -> tuple[str, ...] | None:
    """Return ``quantize_model``'s ``skip``: None (the architecture's: the head stays float), or that minus the head.

    The head is whatever ``get_output_embeddings`` returns, found by identity, so a family whose head has
    another name is handled as one named ``lm_head``. A head tied to the input embedding stays tied in the
    float model: ``quantized_copy`` replaces the copy's head module and leaves the shared tensor alone.

    Raises:
        InvalidArgumentError: the model has no linear output head to quantize.
    """
    if not quantize_lm_head:
        return None
    from outliers.arch.linear import is_linear
    from outliers.arch.registry import architecture_of, is_skipped
    from outliers.errors import InvalidArgumentError

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [n for n, m in model.named_modules() if m is head and n]
    if head is None or not is_linear(head) or not names:
        raise InvalidArgumentError(
            f"--quantize-lm-head: {type(model).__name__} has no linear output head (get_output_embeddings)"
        )
    return tuple(s for s in architecture_of(model).skip if not is_skipped(names[0], (s,)))
