"""The super-weight controls' perplexities and the effect-based verdict on each candidate.

Each control of ``outliers.analysis.superweight_controls`` is scored by a
``score(places)`` that zeroes the places and returns their perplexity paired
against the original model on the same windows. ``matched`` is scored once
per seed (0, 1, ...); its reported perplexity and paired change are those of
the median seed (the lower median: the ``(n - 1) // 2``-th by Δppl), beside
every seed's and their spread.

**The fair control is** ``matched``: as many weights as the candidates, of the
same magnitudes, from the same matrices, away from the candidates' rows and
columns, so that it differs from zeroing the super weights only in *which*
weights. ``paper`` and ``outside_massive`` zero a few hundred of the largest
weights of every linear, and ``largest_down_7000`` the 7000 largest of the
down projections, which on a 135M model include the massive dim's own row in
later blocks: such a control can break a small model for reasons of its own.

**Verdict.** Yu et al. define a super weight by its effect. A candidate of
the spike rule is a ``super_weight`` when zeroing it moves perplexity by at
least ``min_effect`` (+100 %) and the lower end of that change's paired
95 % interval exceeds every matched seed's change; otherwise it stays a
``spike``. With ``per_weight`` each candidate is zeroed alone (one perplexity
each, shared when there is one candidate) and compared with the matched
control of the whole group, which zeroes as many weights as there are
candidates: a bar at least as high as one weight's. Without it the group's
change judges every candidate. Over one window there is no interval and the
point estimate stands in for its lower end.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from outliers.analysis.superweight_controls import (
    ControlSettings,
    Place,
    down_places,
    largest_down_coords,
    massive_places,
    matched_bands,
    matched_draw,
    outside_massive_places,
    paper_places,
    touching,
)
from outliers.analysis.superweights import SuperWeight, down_projections
from outliers.arch.linear import weight_of
from outliers.eval.result import PerplexityResult

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ControlRun",
    "Verdict",
    "FAIR_CONTROL",
    "FAIR_WHY",
    "run_controls",
    "largest_control",
    "judge",
    "verdicts",
    "controls_frame",
    "verdicts_frame",
]

FAIR_CONTROL = "matched"
FAIR_WHY = (
    "matched is the fair control: as many weights as the candidates, of the same magnitudes, from the same "
    "matrices, away from their rows and columns; paper and outside_massive zero the largest weights of every "
    "linear, and largest_down also zeroes the massive dims' rows, so on a small model they can break it for "
    "reasons of their own"
)
Score = Callable[[Sequence[Place]], PerplexityResult]


def _ci(r: PerplexityResult | None) -> list[float] | None:
    ci = r.delta_ppl_pct_ci95 if r is not None else None
    return None if ci is None or any(math.isnan(x) for x in ci) else list(ci)


@dataclass(frozen=True)
class ControlRun:
    """One control: ``result`` its perplexity paired against the original (``matched``: the median seed's;
    None when it does not apply, ``note`` says why), ``seeds`` every matched seed's in seed order."""

    name: str
    n_weights: int
    result: PerplexityResult | None
    seeds: tuple[PerplexityResult, ...] = ()
    n_in_massive: int | None = None  # weights in a massive row or column (superweight_controls.massive_places)
    note: str = ""
    seconds: float = 0.0  # wall time of its perplexities
    extra: dict[str, Any] = field(default_factory=dict)  # matched: band, bands, widened
    draws: tuple[tuple[tuple[int, int, int, float], ...], ...] = ()  # matched: per seed (block, row, col, w)

    @property
    def seed_deltas(self) -> list[float]:
        return [float(r.delta_ppl_pct) for r in self.seeds if r.delta_ppl_pct is not None]

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``n_weights``, ``ppl``, ``delta_ppl_pct`` (+ ``_ci95``) ...; matched adds ``seeds``, ``spread``."""
        r = self.result
        d: dict[str, Any] = {
            "name": self.name,
            "n_weights": self.n_weights,
            "ppl": r.ppl if r else None,
            "ppl_ci95": list(r.ppl_ci95) if r and not any(math.isnan(x) for x in r.ppl_ci95) else None,
            "delta_ppl_pct": r.delta_ppl_pct if r else None,
            "delta_ppl_pct_ci95": _ci(r),
            "kl_vs_ref": r.kl_vs_ref if r else None,
            "n_in_massive": self.n_in_massive,
            "note": self.note,
            "seconds": self.seconds,
        }
        if self.name == FAIR_CONTROL and self.seeds:
            deltas = self.seed_deltas
            d["seeds"] = [
                {"seed": i, "ppl": s.ppl, "delta_ppl_pct": s.delta_ppl_pct, "delta_ppl_pct_ci95": _ci(s)}
                | ({"weights": [list(w) for w in self.draws[i]]} if self.draws else {})
                for i, s in enumerate(self.seeds)
            ]
            d["spread"] = {
                "min": min(deltas),
                "median": statistics.median(deltas),
                "max": max(deltas),
                "sd": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            }
        return d | self.extra


@dataclass(frozen=True)
class Verdict:
    """One candidate's verdict: ``result`` is it zeroed alone (``alone``) or the group zeroed."""

    weight: SuperWeight
    result: PerplexityResult
    alone: bool
    bar: float | None  # the largest matched seed's Δppl (%)
    min_effect: float
    verdict: str  # "super_weight" or "spike"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The weight's fields and ``verdict``, ``delta_ppl_pct`` (+ ``_ci95``) of its zeroing, ``matched_max``."""
        return asdict(self.weight) | {
            "verdict": self.verdict,
            "zeroed": "alone" if self.alone else "group",
            "ppl_zeroed": self.result.ppl,
            "delta_ppl_pct": self.result.delta_ppl_pct,
            "delta_ppl_pct_ci95": _ci(self.result),
            "matched_max": self.bar,
            "reason": self.reason,
        }


def judge(r: PerplexityResult, bar: float | None, min_effect: float) -> tuple[str, str]:
    """``("super_weight" | "spike", why)``: the rule of the module docstring."""
    delta = r.delta_ppl_pct if r.delta_ppl_pct is not None else -math.inf
    ci = _ci(r)
    lower = ci[0] if ci else delta
    misses = []
    if not delta >= min_effect:
        misses.append(f"Δppl {delta:+.1f} % < {min_effect:g} %")
    if bar is None:
        misses.append("no matched control to compare with")
    elif not lower > bar:
        misses.append(f"its interval's lower end {lower:+.1f} % <= the largest matched seed's {bar:+.2f} %")
    if misses:
        return "spike", "; ".join(misses)
    assert bar is not None
    return "super_weight", (
        f"Δppl {delta:+.1f} % >= {min_effect:g} % and its interval's lower end {lower:+.1f} % > every matched "
        f"seed's (at most {bar:+.2f} %)"
    )


def _timed(score: Score, places: Sequence[Place]) -> tuple[PerplexityResult, float]:
    start = time.perf_counter()
    r = score(places)
    return r, time.perf_counter() - start


def _matched(model: nn.Module, weights: Sequence[SuperWeight], settings: ControlSettings, score: Score) -> ControlRun:
    if not weights:
        return ControlRun(FAIR_CONTROL, 0, None, note="no candidate to match")
    bands, pools = matched_bands(model, weights, settings)
    downs = dict(down_projections(model))
    runs, draws, seconds = [], [], 0.0
    for seed in range(settings.seeds):
        drawn = matched_draw(model, weights, pools, seed)
        draws.append(tuple((b, r, c, float(weight_of(downs[b])[r, c])) for b, r, c in drawn))
        r, s = _timed(score, down_places(model, drawn))
        runs.append(r)
        seconds += s
    ratios = [abs(d[3]) / b.magnitude for seed in draws for d, b in zip(seed, bands, strict=True)]
    order = sorted(range(len(runs)), key=lambda i: (runs[i].delta_ppl_pct or 0.0, i))
    median = order[(len(order) - 1) // 2]
    notes = [
        f"band widened from {100 * settings.band:g} % to {100 * b.band:.3g} % for block {b.block}'s W[{b.row}, "
        f"{b.col}] (|w| {b.magnitude:.4g}): fewer than {settings.seeds} weights within {100 * settings.band:g} % "
        f"outside its row and column ({b.pool} now)"
        for b in bands
        if b.widened
    ]
    extra = {
        "median_seed": median,
        "band": settings.band,
        "bands": [asdict(b) for b in bands],
        "widened": any(b.widened for b in bands),
    }
    note = "; ".join(notes) or f"every weight within {100 * settings.band:g} % of its super weight's |w|"
    note += f"; drawn |w| {min(ratios):.2f} to {max(ratios):.2f} x the super weight's"
    return ControlRun(FAIR_CONTROL, len(weights), runs[median], tuple(runs), 0, note, seconds, extra, tuple(draws))


def _massive_note(n: int | None, total: int, dims: list[int]) -> str:
    if not n:
        return ""
    return (
        f"{n} of its {total} weights sit in a massive dim's row or column (dims {dims}) or a super weight's input "
        "channel: it removes what writes or reads the massive activation, not only other large weights"
    )


def run_controls(
    model: nn.Module, weights: Sequence[SuperWeight], settings: ControlSettings, score: Score
) -> tuple[ControlRun, ...]:
    """``matched`` (one perplexity per seed), ``paper``, ``outside_massive`` and ``largest_down_{k}``, in order."""
    massive = massive_places(model, weights)
    dims = sorted({w.row for w in weights})
    runs = [_matched(model, weights, settings, score)]
    paper = paper_places(model, weights, settings.paper_fraction)
    r, s = _timed(score, paper)
    n = touching(massive, paper) if weights else None  # no massive dim known without a candidate
    note = f"the top {settings.paper_fraction:g} of |w| in each of {len({p[0] for p in paper})} linears, at least one"
    runs.append(
        ControlRun(
            "paper", len(paper), r, (), n, "; ".join(x for x in (note, _massive_note(n, len(paper), dims)) if x), s
        )
    )
    if weights:
        outside = outside_massive_places(model, weights, len(paper))
        r, s = _timed(score, outside)
        runs.append(
            ControlRun(
                "outside_massive",
                len(outside),
                r,
                (),
                touching(massive, outside),
                f"none in the rows and columns of the massive dims {dims}",
                s,
            )
        )
    else:
        runs.append(ControlRun("outside_massive", 0, None, note="no massive dim: the spike rule found no candidate"))
    runs.append(largest_control(model, weights, settings.largest_k, score))
    return tuple(runs)


def largest_control(model: nn.Module, weights: Sequence[SuperWeight], k: int, score: Score) -> ControlRun:
    """``largest_down_{k}``: the ``k`` largest other down-projection weights zeroed, noted when they touch the
    massive dims."""
    largest = down_places(model, largest_down_coords(model, [w.coord for w in weights], k))
    r, s = _timed(score, largest)
    n = touching(massive_places(model, weights), largest) if weights else None
    note = _massive_note(n, len(largest), sorted({w.row for w in weights}))
    return ControlRun(f"largest_down_{k}", len(largest), r, (), n, note, s)


def verdicts(
    weights: Sequence[SuperWeight],
    group: PerplexityResult | None,
    matched: ControlRun,
    settings: ControlSettings,
    score: Score,
    model: nn.Module,
) -> tuple[tuple[Verdict, ...], float]:
    """Each candidate's verdict, and the seconds its own zeroings took (none for one candidate or a group verdict)."""
    bar = max(matched.seed_deltas) if matched.seed_deltas else None
    out, seconds = [], 0.0
    for w in weights:
        alone = settings.per_weight and len(weights) > 1
        if alone:
            r, s = _timed(score, down_places(model, [w.coord]))
            seconds += s
        else:
            assert group is not None
            r = group
        v, why = judge(r, bar, settings.min_effect)
        out.append(Verdict(w, r, settings.per_weight, bar, settings.min_effect, v, why))
    return tuple(out), seconds


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _pct_ci(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def controls_frame(runs: Sequence[ControlRun]) -> pd.DataFrame:
    """One row per control: weights zeroed, perplexity, Δppl % with its paired interval, the matched seeds'
    spread, how many weights sit in a massive row or column, the note."""
    import pandas as pd

    rows = []
    for c in runs:
        d = c.to_dict()
        spread = d.get("spread")
        rows.append(
            {
                "control": c.name + (" (fair)" if c.name == FAIR_CONTROL else ""),
                "weights": c.n_weights,
                "ppl": "-" if d["ppl"] is None else f"{d['ppl']:.4f}",
                "Δppl %": _pct(d["delta_ppl_pct"]),
                "paired 95 % CI": _pct_ci(d["delta_ppl_pct_ci95"]),
                "seeds: min .. max (sd)": (
                    f"{spread['min']:+.2f} .. {spread['max']:+.2f} ({spread['sd']:.2f}), {len(c.seeds)} seeds"
                    if spread
                    else ""
                ),
                "in massive": "" if c.n_in_massive is None else c.n_in_massive,
                "s": f"{c.seconds:.0f}",
                "note": c.note,
            }
        )
    return pd.DataFrame(rows)


def verdicts_frame(judged: Sequence[Verdict]) -> pd.DataFrame:
    """One row per candidate: where it is, its zeroing's Δppl % with its paired interval, the bar, the verdict."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "block": v.weight.block,
                "row": v.weight.row,
                "col": v.weight.col,
                "zeroed": "alone" if v.alone else "group",
                "Δppl %": _pct(v.result.delta_ppl_pct),
                "paired 95 % CI": _pct_ci(_ci(v.result)),
                "matched max %": _pct(v.bar),
                "verdict": v.verdict,
            }
            for v in judged
        ]
    )
