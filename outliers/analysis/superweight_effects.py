"""What super weights do to perplexity: zeroed, zeroed with the super activation restored, and a control.

Yu et al. 2024 ("The Super Weight in Large Language Models", arXiv
2411.07191, Table 1) score the original model, the model with its super
weight(s) zeroed, the same with the super activation restored, and a control
that zeroes the 7000 largest-magnitude *other* weights. Here all four are
``outliers.eval.perplexity`` on the same chunks, the last three paired
against the original (its final hidden states are kept and reused), so each
comes with a 95 % interval and a paired change.

The super activation of a weight ``W[r, c]`` in block ``b`` is restored by a
forward hook on ``b``'s down projection that writes back, at output row
``r``, the original model's outputs at the positions of each window where
the original ``|output[t, r]|`` is at least ``restore_fraction`` (default
0.5) of that row's largest ``|output[., r]|`` in the window. The originals
are recorded during the original model's run, keyed by each window's token
ids (a pre-hook on the input embeddings), so batching does not matter.
Every weight edit is a context manager (``outliers.analysis.superweights.zeroed``).

Given ``controls`` (``ControlSettings``), the control is not one but four
(``outliers.analysis.superweight_controls``: ``matched`` over seeds,
``paper``, ``outside_massive``, ``largest_down_{k}``), and every candidate
gets a verdict, ``super_weight`` or ``spike``, from its own effect against
the matched control (``outliers.analysis.superweight_verdicts``). Without
them only ``largest_down_{control_k}`` runs, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outliers.analysis.superweight_controls import ControlSettings, Place, largest_down_coords, zeroed_places
from outliers.analysis.superweight_verdicts import (
    FAIR_CONTROL,
    FAIR_WHY,
    ControlRun,
    Verdict,
    controls_frame,
    largest_control,
    run_controls,
    verdicts,
    verdicts_frame,
)
from outliers.analysis.superweights import Coord, SuperWeight, down_projections, zeroed
from outliers.display import fmt_interval, named, render_html
from outliers.errors import InvalidArgumentError
from outliers.eval.perplexity import PerplexityResult, PerplexitySettings, perplexity

__all__ = ["SuperWeightEffects", "super_weight_effects", "control_coords", "ControlSettings", "row_hooks"]
VERDICT_RULE = (
    "super_weight: zeroing it moves perplexity by >= min_effect and the lower end of that change's paired 95 % "
    "interval exceeds every matched seed's change; otherwise spike"
)


@dataclass(frozen=True)
class SuperWeightEffects:
    """The perplexities; ``zeroed`` and ``restored`` are None when no super weight was given. ``control`` is
    ``largest_down_{control_k}``'s, ``controls`` every control run, ``verdicts`` one per candidate (with
    ``settings`` only), ``seconds`` the wall time of each part and ``n_runs`` the perplexities run."""

    original: PerplexityResult
    zeroed: PerplexityResult | None
    restored: PerplexityResult | None
    control: PerplexityResult
    control_k: int
    restore_fraction: float
    restored_positions: int  # (window, row) positions written back, over the windows
    controls: tuple[ControlRun, ...] = ()
    verdicts: tuple[Verdict, ...] = ()
    settings: ControlSettings | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    n_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``ppl``, ``ppl_ci95`` and, per edit, ``ppl_X``, ``ppl_X_ci95``, ``delta_ppl_pct_X`` (+ ``_ci95``);
        ``controls``; with ``settings`` also ``super_weights`` with their ``verdict`` and the rule."""
        d: dict[str, Any] = {
            "ppl": self.original.ppl,
            "ppl_ci95": list(self.original.ppl_ci95),
            "n_windows_ppl": self.original.n_windows,
            "tokens_scored": self.original.n_tokens,
        }
        for name, r in (("zeroed", self.zeroed), ("restored", self.restored), ("control", self.control)):
            d[f"ppl_{name}"] = r.ppl if r else None
            d[f"ppl_{name}_ci95"] = list(r.ppl_ci95) if r else None
            d[f"delta_ppl_pct_{name}"] = r.delta_ppl_pct if r else None
            ci = r.delta_ppl_pct_ci95 if r else None
            d[f"delta_ppl_pct_{name}_ci95"] = list(ci) if ci else None
        d |= {
            "control_k": self.control_k,
            "restore_fraction": self.restore_fraction,
            "restored_positions": self.restored_positions,
            "controls": [c.to_dict() for c in self.controls],
            "seconds": self.seconds,
            "n_perplexity_runs": self.n_runs,
        }
        if self.settings is not None:
            d |= {
                "super_weights": [v.to_dict() for v in self.verdicts],
                "n_super_weights": sum(v.verdict == "super_weight" for v in self.verdicts),
                "verdict_rule": VERDICT_RULE,
                "min_effect": self.settings.min_effect,
                "seeds": self.settings.seeds,
                "per_weight": self.settings.per_weight,
                "fair_control": FAIR_CONTROL,
                "fair_control_why": FAIR_WHY,
            }
        return d

    def _repr_html_(self) -> str:
        return superweight_effects_html(self)


def control_coords(model: nn.Module, exclude: list[Coord], k: int) -> list[Coord]:
    """The ``k`` largest-|w| other down-projection weights (``superweight_controls.largest_down_coords``).

    Raises:
        InvalidArgumentError: k < 0 or more than the other weights.
    """
    return largest_down_coords(model, exclude, k)


@contextmanager
def row_hooks(model: nn.Module, rows: dict[int, list[int]], store: dict, fraction: float | None) -> Iterator[None]:
    """``fraction`` None: record each window's down-projection outputs at ``rows[block]`` into ``store``;
    otherwise write them back where the original |value| >= fraction x the row's max in the window."""
    downs = dict(down_projections(model))
    keys: list[bytes] = []
    written = store.setdefault("written", [0])

    def on_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        keys[:] = [row.tobytes() for row in ids.detach().cpu().numpy()]

    def on_down(b: int, out: torch.Tensor) -> torch.Tensor | None:
        for i, key in enumerate(keys):
            for r in rows[b]:
                if fraction is None:
                    store[key, b, r] = out[i, :, r].detach().clone()
                    continue
                orig = store.get((key, b, r))
                if orig is None:
                    raise RuntimeError(f"no recorded activation for this window at block {b}, row {r}")
                mask = orig.abs() >= fraction * orig.abs().max()
                out[i, mask, r] = orig[mask].to(out.dtype)
                written[0] += int(mask.sum())
        return None if fraction is None else out

    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    handles = [embeddings.register_forward_pre_hook(on_ids, with_kwargs=True)]
    try:
        for b in rows:
            handles.append(downs[b].register_forward_hook(lambda m, a, o, b=b: on_down(b, o)))
        yield
    finally:
        for h in handles:
            h.remove()


def super_weight_effects(
    model: nn.Module,
    ids: torch.Tensor,
    weights: list[SuperWeight] | tuple[SuperWeight, ...],
    *,
    window: int = 512,
    max_windows: int = 4,
    batch_size: int = 4,
    control_k: int = 7000,
    restore_fraction: float = 0.5,
    controls: ControlSettings | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> SuperWeightEffects:
    """Score the original model, the super weights zeroed, zeroed with the super activation restored, and the
    ``control_k`` largest other down-projection weights zeroed, on the first ``max_windows`` chunks of
    ``window`` tokens. Given ``controls``, also the matched (one perplexity per seed), paper and
    outside-massive controls, each candidate zeroed alone where there are several (``per_weight``), and the
    verdicts; ``controls.largest_k`` then replaces ``control_k``. The model is unchanged on return, whatever
    happens. ``meta`` (``model``, ``corpus``) names the model and corpus in the results.

    Raises:
        InvalidArgumentError: restore_fraction outside (0, 1], a bad control_k, a family without ``down``.
        CorpusError: fewer tokens than one window.
    """
    if not 0 < restore_fraction <= 1:
        raise InvalidArgumentError(f"restore_fraction must be in (0, 1], got {restore_fraction!r}")
    if controls is not None:
        control_k = controls.largest_k
    coords = [w.coord for w in weights]
    largest_down_coords(model, coords, control_k)  # a bad k is refused before any perplexity
    rows: dict[int, list[int]] = {}
    for b, r, _ in coords:
        if r not in rows.setdefault(b, []):
            rows[b].append(r)
    settings = PerplexitySettings(window=window, max_windows=max_windows, batch_size=batch_size)
    kw: dict[str, Any] = {"progress": progress}
    kw |= {"model_name": (meta or {}).get("model"), "corpus_name": (meta or {}).get("corpus", "")}
    states: dict = {}  # the original model's final states per batch: every edit is paired against them
    store: dict = {}
    seconds: dict[str, float] = {}
    runs = [0]

    def paired(part: str) -> PerplexityResult:
        start = time.perf_counter()
        r = perplexity(model, ids, settings, reference=model, reference_states=states, **kw)
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start
        runs[0] += 1
        return r

    def score(places: Sequence[Place]) -> PerplexityResult:
        with zeroed_places(model, places):
            return paired("edits")

    with row_hooks(model, rows, store, None):
        original = paired("original")  # its own forward and the reference's: the states every edit reuses
    zero = restored = None
    if coords:
        with zeroed(model, coords):
            zero = paired("zeroed")
        with ExitStack() as stack:
            stack.enter_context(zeroed(model, coords))
            stack.enter_context(row_hooks(model, rows, store, restore_fraction))
            restored = paired("restored")
    judged: tuple[Verdict, ...] = ()
    if controls is None:
        runs_of: tuple[ControlRun, ...] = (largest_control(model, weights, control_k, score),)
    else:
        runs_of = run_controls(model, weights, controls, score)
        judged, seconds["candidates_alone"] = verdicts(weights, zero, runs_of[0], controls, score, model)
    seconds.pop("edits", None)  # told per control instead
    seconds |= {c.name: c.seconds for c in runs_of}
    seconds["total"] = sum(seconds.values())
    return SuperWeightEffects(
        original=original,
        zeroed=zero,
        restored=restored,
        control=_result(runs_of[-1]),
        control_k=control_k,
        restore_fraction=float(restore_fraction),
        restored_positions=store.get("written", [0])[0],
        controls=runs_of,
        verdicts=judged,
        settings=controls,
        seconds=seconds,
        n_runs=runs[0],
    )


def _result(run: ControlRun) -> PerplexityResult:
    assert run.result is not None  # largest_down always runs
    return run.result


def superweight_effects_html(e: SuperWeightEffects) -> str:
    """``SuperWeightEffects``: the four perplexities, each with its interval, the edits paired against the
    original (as ``outliers superweights`` prints them)."""
    o = e.original
    rows: list[tuple[Any, ...]] = [("original", f"{o.ppl:.4f}", fmt_interval(o.ppl_ci95))]
    for label, r in (
        ("super weights zeroed", e.zeroed),
        ("+ activation restored", e.restored),
        (f"{e.control_k} others zeroed", e.control),
    ):
        if r is None:
            rows.append((label, "-"))
            continue
        paired = (
            f"  {r.delta_ppl_pct:+.2f} % {fmt_interval(r.delta_ppl_pct_ci95, '+.2f')} paired"
            if r.delta_ppl_pct is not None
            else ""
        )
        rows.append((label, f"{r.ppl:.4f}", f"{fmt_interval(r.ppl_ci95)}{paired}"))
    settings = [
        ("model", o.model),
        ("corpus", o.corpus),
        ("window", o.window),
        ("windows", o.n_windows),
        ("tokens scored", o.n_tokens),
        ("dtype", o.dtype),
        ("restore fraction", f"{e.restore_fraction:g}"),
        ("restored positions", e.restored_positions),
        ("seeds", e.settings.seeds if e.settings else None),
        ("min effect", f"{e.settings.min_effect:g} %" if e.settings else None),
    ]
    notes = ["perplexity with its 95 % interval; the edits' change paired against the original on the same windows"]
    tables = []
    if e.settings is not None:
        tables.append(
            ("controls, each paired against the original (matched: its median seed)", controls_frame(e.controls))
        )
        if e.verdicts:
            tables.append(("the spike rule's candidates and their verdict", verdicts_frame(e.verdicts)))
        notes += [FAIR_WHY, VERDICT_RULE, cost_line(e)]
    return render_html(named("Super-weight effects", o.model), rows, settings, tables=tables, notes=notes)


def cost_line(e: SuperWeightEffects) -> str:
    """``"cost: N perplexity runs, T s (original ..., matched ...)"``, for the report."""
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in e.seconds.items() if k != "total" and v)
    return f"cost: {e.n_runs} perplexity runs, {e.seconds.get('total', 0.0):.0f} s ({parts})"
