"""``outliers sensitivity``: which blocks, linears or kinds of linear break a model when quantized alone."""

from __future__ import annotations

import argparse
import sys

from outliers.arch.registry import quantize_skip
from outliers.cli.common import (
    add_int8_gemm_arg,
    add_transform_args,
    check_out_dir,
    check_writable,
    ci,
    print_table,
    require_causal,
    transform_of,
    write_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    from outliers.eval.rows import method_names

    p = sub.add_parser("sensitivity", help="per-layer sensitivity to quantization, with intervals and predictors")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, model folder, .gguf file or hub id")
    p.add_argument("--corpus", default="builtin", help="'builtin', a UTF-8 text file, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument(
        "--method",
        default="llm.int8",
        help=f"one quantization method ({', '.join(method_names())}) (default: %(default)s)",
    )
    p.add_argument(
        "--unit",
        choices=("block", "linear", "kind"),
        default="block",
        help="what is quantized at a time: a block, one linear, or one kind of linear in every block "
        "(default: %(default)s)",
    )
    p.add_argument("--protocol", choices=("chunks", "sliding"), default="chunks")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="sliding only; default window/2")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bos", choices=("corpus", "window"), default="corpus")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() threshold (default: %(default)s)")
    p.add_argument("--outlier-weights", choices=("int8", "fp"), default="int8")
    p.add_argument("--round-to", choices=("float16", "bfloat16"), default=None)
    add_transform_args(p)
    p.add_argument("--no-predictors", dest="predictors", action="store_false", help="skip the cheap predictors")
    p.add_argument(
        "--predictor-windows",
        type=int,
        default=2,
        help="calibration windows for the predictors, from the end of the corpus (default: %(default)s)",
    )
    p.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the mixed-precision curve")
    p.add_argument(
        "--random",
        type=int,
        default=20,
        metavar="N",
        help="random choices of k units per k beside the ranked ones (0: no random baseline; default: %(default)s)",
    )
    p.add_argument("--ks", help="units kept out of the method, comma-separated (default: 0,1,2,4,8,...)")
    p.add_argument(
        "--keep",
        metavar="METHOD",
        help="keep the top units at this method instead of float (default: float; absmax-vector for a 4-bit method)",
    )
    p.add_argument("--naive", action="store_true", help="one full forward per unit (the same numbers, slower)")
    p.add_argument("--top", type=int, default=10, help="units to print, most sensitive first (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result's fields to PATH")
    p.add_argument("--out", metavar="DIR", help="write the per-unit table (CSV) and figures here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_int8_gemm_arg(p)
    p.set_defaults(func=run)


def _ks(text: str | None) -> tuple[int, ...] | None:
    from outliers.errors import InvalidArgumentError

    if not text:
        return None
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"--ks takes comma-separated integers, got {text!r}") from None
    if any(k < 0 for k in ks):
        raise InvalidArgumentError(f"--ks must be >= 0, got {text!r}")
    return ks


def run(args: argparse.Namespace) -> int:
    from outliers.analysis.sensitivity import sensitivity
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.errors import InvalidArgumentError
    from outliers.eval.windows import PerplexitySettings
    from outliers.models.load import load_model
    from outliers.quant.methods import get_method

    json_path = check_writable(args.json) if args.json else None
    out = check_out_dir(args.out) if args.out else None
    settings = PerplexitySettings(args.protocol, args.window, args.stride, args.max_windows, args.batch_size, args.bos)
    get_method(args.method)
    if args.keep:
        get_method(args.keep)
    ks = _ks(args.ks)
    if args.random < 0:
        raise InvalidArgumentError(f"--random must be >= 0, got {args.random}")
    transform = transform_of(args)
    corpus = load_corpus(args.corpus)
    calib_corpus = load_corpus(args.calib_corpus) if args.calib_corpus else corpus
    model, tokenizer, info = load_model(args.model, dtype=args.dtype, progress=not args.quiet)
    require_causal(args.model, info, "this needs a causal LM")
    ids = encode_corpus(tokenizer, corpus)
    result = sensitivity(
        model,
        ids,
        settings,
        args.method,
        transform=transform,
        unit=args.unit,
        threshold=args.threshold,
        outlier_weights=args.outlier_weights,
        round_to=args.round_to,
        skip=quantize_skip(model, False),
        bos_token_id=bos_token_id(tokenizer, args.model) if settings.bos == "window" else None,
        calib_ids=None if calib_corpus.sha256 == corpus.sha256 else encode_corpus(tokenizer, calib_corpus),
        predictors=args.predictors,
        calib_windows=args.predictor_windows,
        mixed=args.mixed,
        ks=ks,
        random_draws=args.random,
        keep=args.keep,
        replay=not args.naive,
        progress=not args.quiet,
        model_name=args.model,
        corpus_name=corpus.name,
    )
    print_table(
        [
            ("model", f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights})"),
            ("corpus", f"{corpus.name} ({len(ids)} tokens, sha256 {corpus.sha256[:12]})"),
            ("windows", f"{result.n_windows} of {result.window} tokens, {result.n_tokens} scored"),
            ("method", result.method + (f" after {result.transform}" if result.transform else "")),
            ("units", f"{len(result.units)} ({result.unit}); the rest of the model as loaded ({info.dtype})"),
        ]
    )
    print(report(result, top=args.top))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if out is not None:
        _write_out(result, out)
    if json_path:
        write_json(
            json_path, result.to_dict() | {"model_info": info.to_dict(), "corpus_sha256": corpus.sha256}, "--json"
        )
    return 0


def report(r, top: int = 10) -> str:
    """The ranking with intervals, its stability, the predictors and the mixed-precision curve, as printed."""
    w = r.whole
    lines = [
        "",
        f"whole model quantized: KL {w['kl_vs_ref']:.5f} {ci(w['kl_vs_ref_ci95'], '.5f')}, "
        f"Δppl {w['delta_ppl_pct']:+.2f} % {ci(w['delta_ppl_pct_ci95'], '+.2f')} (reference ppl {r.ref_ppl:.3f})",
        "",
        f"most sensitive {r.unit}s (each quantized alone; 95 % CI over {r.n_windows} windows, paired):",
    ]
    by_name = {u.unit: u for u in r.units}
    rows: list[tuple[str, ...]] = [("rank", r.unit, "KL (nats/token)", "Δppl %", "share of whole KL", "top-1 %")]
    for name in r.ranking[:top]:
        u = by_name[name]
        rows.append(
            (
                str(u.rank),
                u.unit,
                f"{u.kl_vs_ref:.5f} {ci(u.kl_vs_ref_ci95, '.5f')}",
                f"{u.delta_ppl_pct:+.2f} {ci(u.delta_ppl_pct_ci95, '+.2f')}",
                f"{100 * u.kl_share:.1f} %",
                f"{100 * u.top1_agreement:.2f}",
            )
        )
    lines += _table(rows)
    if r.spearman_halves is not None:
        lines.append(
            f"\nstability: Spearman's ρ between the rankings on even and odd windows {r.spearman_halves:.3f} "
            f"{ci(r.spearman_halves_ci95, '.3f')}; for the whole set (Spearman–Brown) "
            + ("n/a" if r.spearman_brown is None else f"{r.spearman_brown:.3f}")
        )
        if r.spearman_halves_ci95 and r.spearman_halves > r.spearman_halves_ci95[1]:
            # near 1 every resample adds window noise to both halves' rates, which can only lower ρ
            lines.append(
                "  (the interval lies below ρ: each resample adds window noise to both halves, so its lower end "
                "is the bound to read)"
            )
    if r.predictors:
        lines.append("\ncheap predictors on calibration text, Spearman's ρ with the measured KL (95 % CI over units):")
        order = sorted(r.predictors, key=lambda k: -(r.predictors[k]["rho"] or -2))
        lines += _table(
            [("predictor", "ρ", "95 % CI")]
            + [
                (
                    k,
                    "n/a" if r.predictors[k]["rho"] is None else f"{r.predictors[k]['rho']:+.3f}",
                    ci(r.predictors[k]["rho_ci95"], "+.2f"),
                )
                for k in order
            ]
        )
    if r.mixed:
        m = r.mixed
        lines.append(
            f"\nmixed precision: top-k units of the ranking on {m['ranked_on']} kept at {m['keep']}, KL on "
            f"{m['scored_on']} ({m['n_windows']}); random: {m['random_draws']} draws of k units, mean [2.5, 97.5 %]"
        )
        rows = [("k", "ranked KL", "random KL", "random − ranked")]
        for p in m["points"]:
            rand = (
                f"{p['random_kl_mean']:.5f} [{p['random_kl_band'][0]:.5f}, {p['random_kl_band'][1]:.5f}]"
                if "random_kl_mean" in p
                else ""
            )
            diff = (
                f"{p['random_minus_ranked']:+.5f} {ci(p['random_minus_ranked_ci95'], '+.5f')}"
                if "random_minus_ranked" in p
                else ""
            )
            rows.append((str(p["k"]), f"{p['ranked_kl']:.5f} {ci(p['ranked_kl_ci95'], '.5f')}", rand, diff))
        lines += _table(rows)
    s = r.seconds
    how = "each unit replayed from its first block" if r.replay else "naive: one full forward per unit"
    lines.append(
        f"\ncost: sweep {s['sweep']:.1f} s ({s['forwards']} batch forwards, {how}), "
        f"predictors {s['predictors']:.1f} s, mixed precision {s['mixed']:.1f} s"
        + (f" ({r.mixed['forwards']} window forwards)" if r.mixed else "")
    )
    return "\n".join(lines)


def _table(rows: list) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(*rows, strict=True)]
    line = lambda cells: "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return [line(rows[0]), *map(line, rows[1:])]


def _write_out(r, out) -> None:
    from outliers.analysis.sensitivity_plots import sensitivity_figure
    from outliers.cache import save_csv, save_figure

    save_csv(r.table(), out / "units.csv")
    save_figure(sensitivity_figure(r), out / "sensitivity.png")
    print(f"\nwrote units.csv and sensitivity.png to {out}")
