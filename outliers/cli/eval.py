"""``outliers eval``: perplexity of a model on a corpus, one method or the Table-1 layout."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Any

from outliers.arch.registry import quantize_skip
from outliers.cli.common import (
    add_device_map_args,
    add_int8_gemm_arg,
    add_transform_args,
    check_writable,
    ci,
    placement_of,
    print_table,
    require_causal,
    transform_of,
    write_json,
)


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
    from outliers.eval.rows import method_names

    p.add_argument(
        "--method",
        default="fp32",
        help=f"fp32 (no quantization), one of the methods ({', '.join(method_names())}), smoothquant "
        "(absmax-vector after smoothing, alpha --smooth or 0.5), a row name with its transform "
        "(llm.int8@hadamard, absmax-vector@smooth=0.5), static W8A8 with per-tensor activation scales fixed "
        "offline (static-minmax, static-p99.9, static-p99.99; +prefix: PrefixQuant's outlier-token prefix, "
        "e.g. static-p99.9+prefix), a comma-separated list of them, or 'all' "
        "for the Table-1 layout, or 'formats' for the microscaling rows (MX, NVFP4; emulated) "
        "(default: %(default)s)",
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
    p.add_argument(
        "--kv-cache",
        metavar="SPEC[,SPEC...]",
        help="quantize the key-value cache inside attention, one row per SPEC: int8, int4 or int2, then token, "
        "channel (groups of G tokens) or kivi (keys per channel, values per token), then an optional -gG "
        "(default 32), e.g. int4-kivi,int8-token,int2-channel-g64; the weights are --method's",
    )
    p.add_argument("--kv-keep", type=int, default=0, help="keep the first N tokens' keys and values in float (sinks)")
    p.add_argument(
        "--kv-rotate", action="store_true", help="Hadamard-rotate the head dim before the cache is quantized"
    )
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument(
        "--no-noise-floor",
        action="store_true",
        help="skip the bfloat16 noise floor printed beside rows compared with the float model (the float "
        "model cast to bfloat16, scored against it once per model, corpus and windows, then cached)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    add_int8_gemm_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.errors import InvalidArgumentError
    from outliers.eval.intervals import few_windows_note
    from outliers.eval.rows import RowEvaluator, calibratable, describe_gemm, parse_rows, row_label
    from outliers.eval.static_rows import prefix_notes, with_tokenizer  # registers the static-* rows
    from outliers.eval.windows import PerplexitySettings
    from outliers.models.load import load_model

    json_path = check_writable(args.json) if args.json else None
    # Validate everything before spending seconds loading a model.
    settings = PerplexitySettings(args.protocol, args.window, args.stride, args.max_windows, args.batch_size, args.bos)
    options = dict(threshold=args.threshold, outlier_weights=args.outlier_weights, round_to=args.round_to)
    rows = parse_rows(args.method, transform_of(args), **options)
    if args.kv_cache is not None:
        from outliers.eval.kv_rows import kv_rows

        rows = kv_rows(args.kv_cache, rows, keep=args.kv_keep, rotate=args.kv_rotate)
    elif args.kv_keep or args.kv_rotate:
        raise InvalidArgumentError("--kv-keep and --kv-rotate apply to --kv-cache rows; give --kv-cache")
    place = placement_of(args)  # with a map the float model stays on the CPU; each row runs dispatched
    corpus = load_corpus(args.corpus)  # cheap: its errors come before a model load
    calib_corpus = load_corpus(args.calib_corpus) if args.calib_corpus else corpus
    started = time.perf_counter()
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    load_s = time.perf_counter() - started
    require_causal(args.model, info, "perplexity needs a causal LM")
    skip = quantize_skip(model, args.quantize_lm_head)
    ids = encode_corpus(tokenizer, corpus)
    bos = bos_token_id(tokenizer, args.model) if settings.bos == "window" else None
    floor_wanted = not args.no_noise_floor and any(r.quantized or r.transform or r.kind != "method" for r in rows)
    # a noise floor to score reuses the reference's states; one from the cache needs none kept
    floor_to_score = floor_wanted and _floor_unknown(model, ids, settings, bos, args.model, info)
    evaluator = RowEvaluator(
        model,
        ids,
        settings,
        bos_token_id=bos,
        # the evaluated text itself, under another name, must not calibrate on what it evaluates either
        calib_ids=None if calib_corpus.sha256 == corpus.sha256 else encode_corpus(tokenizer, calib_corpus),
        keep_reference=len(rows) > 1 or floor_to_score,  # the reference runs once for all rows
        place=place,
        progress=not args.quiet,
        model_name=args.model,
        corpus_name=corpus.name,
    )
    rows = with_tokenizer([replace(r, skip=skip) for r in rows], tokenizer)
    rows, notes = calibratable(rows, evaluator, optional=_optional(args))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    done = [evaluator.evaluate(row) for row in rows]
    for d in done:  # what each row was: the quantization, set-up, the int8 GEMM it ran on, the float share
        d.result.extra.update(d.record(), load_seconds=load_s)
    results = [d.result for d in done]
    labels = [row_label(d.row, d.result.dtype) for d in done]
    gemm = describe_gemm() if any(d.int8_gemm for d in done) else None
    floor = None
    if floor_wanted and any(r.ref_ppl is not None for r in results):
        from outliers.eval.noise_floor import noise_floor

        floor = noise_floor(evaluator, weights=info.weights_sha256)
        evaluator.release()
    _print(results, labels, rows, args, info, corpus, len(ids), gemm, floor, head_quantized=skip is not None)
    for line in prefix_notes(results, labels, tokenizer):
        print(line)
    if note := few_windows_note(results[0].n_windows):
        print(f"note: {note}", file=sys.stderr)
    if json_path:
        facts: dict[str, Any] = {"model_info": info.to_dict(), "corpus_sha256": corpus.sha256}
        facts["noise_floor"] = floor.to_dict() if floor is not None else None
        payload = [r.to_dict() | facts for r in results]
        write_json(json_path, payload[0] if len(payload) == 1 else payload, "--json")
    return 0


def _floor_unknown(model, ids, settings, bos, name, info) -> bool:
    """Whether the noise floor of this model, text and windows is still to be scored (not cached; float32)."""
    import torch

    from outliers.eval.noise_floor import cached_noise_floor, noise_floor_key

    if next(model.parameters()).dtype != torch.float32:
        return False
    key = noise_floor_key(model, ids, settings, bos_token_id=bos, model_name=name, weights=info.weights_sha256)
    return cached_noise_floor(key) is None


def _optional(args: argparse.Namespace) -> bool:
    """Whether a row that cannot calibrate apart from the evaluated tokens is left out with a note: only the
    SmoothQuant row ``--method all`` adds on its own."""
    return args.method == "all" and not args.smooth


def _print(results, labels, rows, args, info, corpus, n_ids, gemm, floor, *, head_quantized) -> None:
    """The model, corpus and protocol, then one result's rows, or the Table-1 layout for several; the bfloat16
    noise floor beside them where there is one."""
    r0 = results[0]
    head = [
        ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights})"),
        ("corpus", f"{corpus.name} ({n_ids} tokens, sha256 {corpus.sha256[:12]})"),
        (
            "protocol",
            f"{r0.protocol}, window {r0.window}"
            + (f", stride {r0.stride}" if r0.protocol == "sliding" else "")
            + f", bos {r0.bos}, {r0.n_windows} windows, {r0.n_tokens} tokens scored",
        ),
    ]
    if len(results) == 1:
        row = rows[0]
        name = r0.dtype if not row.quantized else row.method  # the unquantized model as loaded: bf16 is not fp32
        gemm_row = [("int8 GEMM", gemm)] if gemm else []
        label = name + (f" after {row.transform.label}" if row.transform else "")
        label = labels[0] if row.kind != "method" else label
        print_table(head + _result_rows(r0, label, floor) + gemm_row)
    else:
        print_table(head)
        print(_method_table(results, labels, args.model, args.threshold, head_quantized=head_quantized))
        if floor is not None:
            print(f"bf16 noise floor: {floor.line()}")
        if gemm:
            print(f"int8 GEMM: {gemm}")


def _result_rows(r, name: str, floor=None) -> list[tuple[str, Any]]:
    """One result as printed by ``outliers eval``: the number, its interval, and its agreement with the reference,
    the bfloat16 noise floor (``outliers.eval.noise_floor``) below it where there is one."""
    from outliers.eval.result import agreement_rows

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
        rows += [(label, f"{value} {interval}".rstrip()) for label, value, interval in agreement_rows(r)]
        if floor is not None:
            rows.append(("noise floor", floor.line()))
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
        kld99 = "" if r.kld_percentiles is None else f"{r.kld_percentiles['99']:.4f}"
        dp_rms = "" if r.delta_p_rms is None else f"{100 * r.delta_p_rms:.2f} %"
        speed = r.steady_tokens_per_s if r.steady_tokens_per_s is not None else r.tokens_per_s
        first = f"{r.warmup_seconds:.2f}" if r.warmup_seconds is not None else ""
        setup = r.extra.get("quantize_seconds", 0.0) + r.extra.get("transform_seconds", 0.0)
        rows.append(
            (
                name,
                f"{r.ppl:.3f} {ci(r.ppl_ci95)}",
                delta,
                kl,
                kld99,
                agree,
                dp_rms,
                f"{speed:.0f}",
                first,
                f"{setup:.2f}",
            )
        )
    base = results[0].dtype  # the unquantized model as loaded: fp32, or bf16
    head = (
        "method",
        model,
        f"vs {base} (95 % CI)",
        "KL",
        "KLD p99",
        "top-1",
        "Δp RMS",
        "tokens/s",
        "first batch s",
        "set-up s",
    )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    lines = ["", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    r0 = results[0]
    steady = "after the first batch" if r0.steady_tokens_per_s is not None else "one batch, warm-up included"
    lines.append(
        f"\nDecomposition threshold {threshold}; lm_head {'quantized' if head_quantized else 'kept in float'}; "
        f"{r0.protocol} windows of {r0.window}; intervals over {r0.n_windows} windows, paired "
        f"against {base} on the same windows; KL(P_{base} || P_method) in nats/token, KLD p99 its 99th percentile "
        "over tokens; Δp RMS: the RMS change in the next token's probability. tokens/s: steady state "
        f"({steady}); set-up s: transform and quantization; model load {r0.extra.get('load_seconds', 0.0):.2f} s."
    )
    return "\n".join(lines)
