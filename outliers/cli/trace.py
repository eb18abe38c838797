"""``outliers trace``: the outlier lifecycle of one model (super weight → massive activation → sinks → key channels
→ quantization error), traced by causal edits with paired intervals."""

from __future__ import annotations

import argparse
import time
from typing import Any

from outliers.cli.common import check_out_dir, check_writable, ci, require_causal, run_facts, write_json

EDITS = ("none", "zero_super_weights", "restore_super_activation", "clamp_massive", "clamp_control")
LABELS = {
    "massive_activation": "massive |h|, on its tokens",
    "massive_at_birth": "  at its birth block",
    "massive_dim_max": "  the massive dim, any token",
    "max_activation": "largest |h|, any dim",
    "sink_rate": "sink rate",
    "first_token_attention": "first-token attention",
    "massive_token_attention": "massive-token attention",
    "key_concentration": "key concentration (median)",
    "ppl": "perplexity",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace", help="the outlier lifecycle: super weight -> massive activation -> sinks -> key channels -> KL"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=8, help="windows every pass reads (default: %(default)s)")
    p.add_argument(
        "--detect-windows", type=int, default=2, help="windows super-weight detection reads (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window is BOS + window-1 corpus tokens (default: %(default)s)",
    )
    p.add_argument(
        "--rows",
        default="llm.int8",
        help="quantized rows whose KL against the edited float model is measured, comma-separated; '' for none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--edits", default=",".join(EDITS), help="edits to run, comma-separated (default: all five; none is needed)"
    )
    p.add_argument(
        "--epsilon", type=float, default=0.3, help="a head is a sink above this score (default: %(default)s)"
    )
    p.add_argument(
        "--k", type=float, default=4.0, help="a key channel is an outlier at k x the median (default: %(default)s)"
    )
    p.add_argument("--restore-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="the control dim's draw (default: %(default)s)")
    p.add_argument("--jump", type=float, default=50.0, help="super-weight spike rule (default: %(default)s)")
    p.add_argument("--max-found", type=int, default=4)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--out", metavar="DIR", help="write lifecycle.png, edits.csv, heads.csv and key_layers.csv here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> Any:
    """The ``TraceSettings`` the arguments ask for, checked before a model loads."""
    from outliers.analysis.lifecycle import TraceSettings

    s = TraceSettings(
        window=args.window,
        max_windows=args.max_windows,
        detect_windows=args.detect_windows,
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        k=args.k,
        rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()),
        edits=tuple(e.strip() for e in args.edits.split(",") if e.strip()),
        restore_fraction=args.restore_fraction,
        seed=args.seed,
        jump=args.jump,
        max_found=args.max_found,
    )
    s.check()
    return s


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def print_chain(res: Any) -> None:
    """The chain, link by link, as measured on the unedited model."""
    c = res.chain
    print("the chain, on the unedited model:")
    if c["super_weights"]:
        for w in c["super_weights"]:
            print(
                f"  super weight      W[{w['row']}, {w['col']}] of block {w['block']}'s down projection = "
                f"{w['value']:.4g}; its output there {w['activation']:.4g} (input max {w['input_max']:.4g})"
            )
    else:
        print(f"  super weight      none by the spike rule ({c['super_weight_stop']})")
    for d in c["down_in"]:
        print(
            f"  down_in           block {d['block']} channel {d['channel']}: max |x| "
            f"{d['max_abs_massive_tokens']:.4g} on the massive tokens, {d['max_abs_other_tokens']:.4g} on the others"
        )
    if c["massive"]:
        for m in c["massive"][:4]:
            feeds = f"fed by W{m['super_weights'][0]}" if m["super_weights"] else "fed by no super weight"
            print(
                f"  massive           dim {m['dim']}: born at block {m['birth_block']}, flagged to block "
                f"{m['last_block']}, peak |h| {m['peak']:.4g} at block {m['peak_block']}; {feeds}"
            )
        tokens = ", ".join(f"{t['token']!r} x{t['count']}" for t in c["massive_tokens"][:6])
        positions = ", ".join(f"{p} x{n}" for p, n in list(c["massive_positions"].items())[:6])
        print(
            f"                    on {100 * c['massive_token_share']:.2f} % of the tokens "
            f"({c['windows_with_massive_tokens']} of {res.n_windows} windows): positions {positions}; tokens {tokens}"
        )
    else:
        print("  massive           no token-specific massive activation (Sun et al.'s rule)")
    from outliers.quant.prefix import compact_blocks

    by_dim: dict[int, list[dict[str, Any]]] = {}
    for w in c["widespread"]:
        by_dim.setdefault(w["dim"], []).append(w)
    for d, ws in by_dim.items():
        print(
            f"  widespread        dim {d}: flagged on up to {100 * max(w['share'] for w in ws):.0f} % of the tokens in "
            f"blocks {compact_blocks([w['block'] for w in ws])} (a massive dimension, not a token's activation)"
        )
    layers = c["sink_layers"]
    span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layer"
    print(
        f"  sinks             {c['n_sink_heads']} of {c['n_counted_heads']} heads put > {res.settings.epsilon:g} of "
        f"their attention on the massive tokens ({span}; {c['sink_heads_after_birth']} after the birth block)"
    )
    if c["key_concentration"] is not None:
        print(
            f"  key channels      median concentration {c['key_concentration']:.3g} "
            f"({c['key_concentration_other_tokens']:.3g} without the massive tokens); outlier channels in "
            f"{c['key_layers_with_outliers']} layers, the top channel's max on the massive tokens in "
            f"{c['key_layers_top_on_massive_tokens']} of {len(c['key_layers'])}"
        )
    for row, s in c["kl_share"].items():
        if s.get("kl_share") is None:
            print(f"  {row} KL         no massive token among the scored positions")
            continue
        print(
            f"  {row} KL         {100 * s['kl_share']:.2f} % {ci(s['kl_share_ci95'], '.2f', 100)} of it on the massive "
            f"tokens ({100 * s['token_share']:.2f} % of the tokens): {s['per_token_ratio']:.3g}x "
            f"{ci(s['per_token_ratio_ci95'], '.3g')} the KL per other token"
        )


def print_edits(res: Any) -> None:
    """Per edit: each field's value, its change against none and the paired interval."""
    from outliers.analysis.lifecycle import row_field

    fields = res.fields()
    rows = {row_field(r): r for r in res.settings.rows}
    print("\nedits: value, change against none [95 % paired interval, windows resampled]")
    for e in res.edits:
        print(f"\n{e['edit']}: {e['description']}")
        if not e["applicable"]:
            continue
        for f in fields:
            if e.get(f) is None:
                continue
            label = LABELS.get(f) or f"{rows[f]} KL vs the edited float"
            change = ""
            if e["edit"] != "none" and e.get(f"{f}_delta") is not None:
                change = f"  {e[f'{f}_delta']:+.4g} {ci(e[f'{f}_delta_ci95'], '+.3g')}"
            print(f"  {label:<30} {_value(e[f]):>10}{change}")
        shares = [f"{r} {v:.3g} %" for r, v in (e.get("float_columns_pct") or {}).items() if v is not None]
        if shares:
            print(f"  {'input columns kept in float':<30} {', '.join(shares)}")
        if e.get("clamped_tokens"):
            print(f"  ({e['clamped_tokens']} values clamped in the float model; the quantized copies by the same rule)")


def run(args: argparse.Namespace) -> int:
    from outliers.analysis.lifecycle import trace
    from outliers.data.corpus import bos_token_id, encode_corpus, load_corpus
    from outliers.models.load import load_model

    settings = settings_of(args)
    json_path = check_writable(args.json) if args.json else None
    out = check_out_dir(args.out) if args.out else None
    progress = not args.quiet
    started = time.perf_counter()
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress, attn_implementation="eager")
    require_causal(args.model, info, "the lifecycle is traced on causal LMs")
    ids = encode_corpus(tokenizer, corpus)
    bos_id = bos_token_id(tokenizer, args.model) if args.bos == "window" else None
    res = trace(
        model,
        ids,
        settings,
        bos_token_id=bos_id,
        tokenizer=tokenizer,
        progress=progress,
        meta=run_facts(args.model, info, corpus),
    )
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"{res.n_windows} windows of {settings.window}, bos {res.bos}\n"
    )
    print_chain(res)
    print_edits(res)
    cost = res.cost
    print(
        f"\ncost: {time.perf_counter() - started:.0f} s in all, {cost['seconds']:.0f} s traced "
        f"({cost['window_forwards']} window forwards of {settings.window} tokens on {cost['torch_threads']} threads; "
        f"detection {cost['super_weight_detection_seconds'] + cost['massive_detection_seconds']:.0f} s, edits "
        + ", ".join(f"{k} {v:.0f} s" for k, v in cost["edit_seconds"].items() if v)
        + ")"
    )
    if cost["note"]:
        print(cost["note"])
    if json_path:
        write_json(json_path, res.to_dict(), "--json")
    if out is not None:
        import pandas as pd

        from outliers.analysis.lifecycle_plots import chain_figure
        from outliers.cache import save_csv, save_figure

        save_csv(pd.DataFrame(res.edits), out / "edits.csv")
        save_csv(pd.DataFrame(res.chain["heads"]), out / "heads.csv")
        save_csv(pd.DataFrame(res.chain["key_layers"]), out / "key_layers.csv")
        save_figure(chain_figure(res), out / "lifecycle.png")
        print(f"\nwrote lifecycle.png, edits.csv, heads.csv and key_layers.csv to {out}")
    return 0
