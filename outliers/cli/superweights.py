"""``outliers superweights``: super weights and what zeroing them does to perplexity (Yu et al. 2024), against
controls, with an effect-based verdict on each candidate of the spike rule (``--spike-only``: the spike rule alone)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from outliers.cli.common import check_writable, ci, require_causal, run_facts
from outliers.errors import InvalidArgumentError

if TYPE_CHECKING:
    from outliers.analysis.superweight_controls import ControlSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("superweights", help="super weights: single down-projection weights that make the model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=4, help="windows for the perplexities (default: %(default)s)")
    p.add_argument("--detect-windows", type=int, default=2, help="windows for detection (default: %(default)s)")
    p.add_argument(
        "--jump", type=float, default=50.0, help="a block jumps at this x the median output max (default: %(default)s)"
    )
    p.add_argument("--max-found", type=int, default=4)
    p.add_argument(
        "--control-k",
        type=int,
        default=7000,
        help="largest_down_K: the K largest other down-projection weights zeroed (default: %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=10,
        help="magnitude-matched control draws, one perplexity each (default: %(default)s)",
    )
    p.add_argument(
        "--min-effect",
        type=float,
        default=100.0,
        help="a super weight moves perplexity by at least this many %% (default: %(default)s)",
    )
    p.add_argument(
        "--group-verdict",
        action="store_true",
        help="judge the candidates by zeroing them together, not each alone (one perplexity less per candidate)",
    )
    p.add_argument(
        "--spike-only", action="store_true", help="the spike rule alone: no perplexity, no control, every verdict spike"
    )
    p.add_argument("--restore-fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _line(name: str, ppl: float | None, interval, delta: float | None, delta_ci) -> str:
    if ppl is None:
        return f"{name:<22} -"
    paired = f"  {delta:+.2f} % {ci(delta_ci, '+.2f')} paired" if delta is not None and delta_ci else ""
    return f"{name:<22} {ppl:10.4f}  {ci(interval)}{paired}"


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from outliers.analysis.superweight_controls import ControlSettings
    from outliers.analysis.superweights import super_weights
    from outliers.data.corpus import encode_corpus, load_corpus
    from outliers.models.load import load_model

    if args.window < 2 or min(args.max_windows, args.detect_windows, args.max_found, args.batch_size) < 1:
        raise InvalidArgumentError(
            "--window must be >= 2, --max-windows, --detect-windows, --max-found and --batch-size >= 1"
        )
    if not args.jump > 1 or args.control_k < 0 or not 0 < args.restore_fraction <= 1:
        raise InvalidArgumentError("--jump must be > 1, --control-k >= 0 and --restore-fraction in (0, 1]")
    controls = ControlSettings(
        seeds=args.seeds, min_effect=args.min_effect, largest_k=args.control_k, per_weight=not args.group_verdict
    )
    json_path = check_writable(args.json) if args.json else None
    progress = not args.quiet
    corpus = load_corpus(args.corpus)
    model, tokenizer, info = load_model(args.model, progress=progress)
    require_causal(args.model, info, "perplexity needs a causal LM")
    ids = encode_corpus(tokenizer, corpus)
    found = super_weights(
        model,
        ids,
        window=args.window,
        max_windows=args.detect_windows,
        max_found=args.max_found,
        jump=args.jump,
        batch_size=args.batch_size,
        meta=run_facts(args.model, info, corpus),
    )
    print(
        f"{info.name} ({info.architecture}, {info.n_params / 1e6:.1f}M params; {info.weights}) on {corpus.name}: "
        f"detection on {found.n_windows} windows of {found.window}, a block jumps at >= {found.jump:g} x the "
        "median output max\n"
    )
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    if found.weights:
        print("candidates of the spike rule (W stored (out, in); activation = the down projection's output at row):")
        table = pd.DataFrame([vars(w) for w in found.weights]).drop(columns="dim")
        print(table.to_string(**fmt))
    else:
        print("none found; the down projections' largest |input| and |output| per block:")
        with pd.option_context("display.max_rows", None):
            print(found.spikes.to_string(**fmt))
    print(f"detection stopped: {found.stop}\n")
    d = found.to_dict()
    if args.spike_only:
        for w in d["super_weights"]:
            w["verdict"] = "spike"
        d["verdict_rule"] = "spike-only: the spike rule alone, no perplexity (every candidate a spike, untested)"
        print("--spike-only: no perplexity, no control; every candidate is a spike, untested")
    else:
        d |= _effects(model, ids, found.weights, controls, args, run_facts(args.model, info, corpus))
    if json_path:
        from outliers.cache import atomic_write

        atomic_write(json_path, json.dumps(d, indent=1) + "\n")
    return 0


def _effects(
    model: Any, ids: Any, weights: tuple, controls: ControlSettings, args: argparse.Namespace, meta: dict
) -> dict[str, Any]:
    """Run the perplexities, print them, the controls and the verdicts; return their JSON fields."""
    from outliers.analysis.superweight_effects import VERDICT_RULE, cost_line, super_weight_effects
    from outliers.analysis.superweight_verdicts import FAIR_WHY, controls_frame, verdicts_frame

    n = 3  # the original (its forward and its reference's), paper, largest_down
    if weights:  # zeroed, restored, outside_massive, the matched seeds, each candidate alone
        n += 3 + controls.seeds + (len(weights) if controls.per_weight and len(weights) > 1 else 0)
    print(f"running {n} perplexities on {args.max_windows} windows of {args.window} (the original's states reused)")
    effects = super_weight_effects(
        model,
        ids,
        weights,
        window=args.window,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        restore_fraction=args.restore_fraction,
        controls=controls,
        progress=not args.quiet,
        meta=meta,
    )
    o, d = effects.original, effects.to_dict()
    print(
        f"\nperplexity on {o.n_windows} windows of {o.window} ({o.n_tokens} tokens scored), 95 % CI, "
        "paired vs original:"
    )
    print(_line("original", o.ppl, o.ppl_ci95, None, None))
    for name, label in (("zeroed", "candidates zeroed"), ("restored", "+ activation restored")):
        print(
            _line(
                label,
                d[f"ppl_{name}"],
                d[f"ppl_{name}_ci95"],
                d[f"delta_ppl_pct_{name}"],
                d[f"delta_ppl_pct_{name}_ci95"],
            )
        )
    frame = controls_frame(effects.controls)
    print("\ncontrols, each paired against the original (matched: its median seed):")
    print(frame.drop(columns="note").to_string(index=False))
    for c in effects.controls:
        if c.note:
            print(f"  {c.name}: {c.note}")
    print(f"fair control: {FAIR_WHY}")
    if effects.verdicts:
        print(f"\nverdicts (min effect {controls.min_effect:g} %):")
        print(verdicts_frame(effects.verdicts).to_string(index=False))
        for v in effects.verdicts:
            print(f"  block {v.weight.block} W[{v.weight.row}, {v.weight.col}]: {v.verdict}: {v.reason}")
    print(f"rule: {VERDICT_RULE}")
    print(cost_line(effects))
    return d
