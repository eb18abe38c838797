"""Per-layer sensitivity: quantize one unit at a time, everything else as loaded, and measure the damage.

A *unit* is a block (every quantized linear in it), a single linear, or a
kind of linear across all blocks (every ``q_proj``, every down projection).
For each unit the model is scored against the float model on the same
windows as ``outliers eval`` scores it (``outliers.eval.windows``): the mean
KL(P_float || P_unit) per token and the paired change in perplexity, each
with a bootstrap interval over windows (``outliers.eval.intervals``), the
unit's share of the whole-model KL, and a ranking. The ranking's stability is
Spearman's ρ between the rankings measured on two disjoint halves of the
windows (alternate windows, so both halves span the text), with a bootstrap
interval and its Spearman–Brown step-up ``2ρ / (1 + ρ)`` for the whole set.

**Cost.** Windows are the outer loop. Per batch, the float model runs once
with every block's output recorded (forward hooks), and the reference's
log-probabilities are made once. A unit whose first block is ``b`` then runs
with blocks ``0 … b-1`` replaced by stand-ins that return the recorded
outputs: the model's own forward still makes the masks and position
embeddings every family needs, and blocks ``b …`` compute exactly what a
full forward of the same model computes, so the numbers are bit-identical to
the naive sweep (one full forward per unit; ``replay=False`` runs it, and a
test compares them). Memory is one batch's block outputs (Qwen2.5-Coder-1.5B
at 4 × 512: about 0.35 GB) plus its reference log-probs (batch × window ×
vocabulary float32: 0.4 GB for SmolLM2, 2 GB for Gemma-3's 262k vocabulary;
lower ``batch_size`` to shrink both).

Cheap predictors (``outliers.analysis.unit_predictors``) are measured on
calibration text the evaluation does not read and correlated with the
measured KL; a mixed-precision curve keeps the top-k units of the ranking
on one half unquantized and scores the other half, beside random choices of
k units.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.arch.lmhead import SplitLM, positions_per_chunk, split_lm
from outliers.arch.registry import architecture_of, blocks
from outliers.display import fmt_interval, named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.eval.intervals import delta_ppl_pct_interval, rate_interval
from outliers.eval.rows import Row, RowEvaluator
from outliers.eval.windows import PerplexitySettings, Span, batches, spans, window_ids
from outliers.models.dispatch import input_device
from outliers.quant.transform_spec import Transform

__all__ = [
    "UNITS",
    "Unit",
    "UnitSensitivity",
    "SensitivityResult",
    "quantization_units",
    "sensitivity",
    "spearman_halves",
    "spearman_interval",
]

UNITS = ("block", "linear", "kind")
N_RESAMPLES = 1000


@dataclass(frozen=True)
class Unit:
    """What is quantized together: ``modules`` (paths in the model), ``block`` the first block they sit in."""

    name: str
    block: int
    modules: tuple[str, ...]


def quantization_units(model: nn.Module, modules: list[str], unit: str = "block") -> list[Unit]:
    """Group the quantized ``modules`` (a ``QuantReport.replaced``) into units, in forward order.

    Linears outside every block (none in the built-in families; OPT-350m's projections) belong to no unit:
    they are quantized only in the whole-model row.

    Raises:
        InvalidArgumentError: an unknown unit.
    """
    if unit not in UNITS:
        raise InvalidArgumentError(f"unknown unit {unit!r}; choose from {', '.join(UNITS)}")
    arch = architecture_of(model)
    rx = re.compile(r"(?:^|\.)" + str(arch.blocks) + r"\.(.+)$")
    placed = [(int(m.group(1)), m.group(m.re.groups), name) for name in modules if (m := rx.search(name))]
    groups: dict[str, list[tuple[int, str]]] = {}
    for block, suffix, name in placed:
        key = {"block": f"block {block}", "linear": name, "kind": suffix}[unit]
        groups.setdefault(key, []).append((block, name))
    out = [Unit(k, min(b for b, _ in v), tuple(n for _, n in v)) for k, v in groups.items()]
    return sorted(out, key=lambda u: (u.block, modules.index(u.modules[0])))


@dataclass(frozen=True)
class UnitSensitivity:
    """One unit's damage when it alone is quantized; shares and probabilities as fractions."""

    unit: str
    block: int
    modules: tuple[str, ...]
    kl_vs_ref: float
    kl_vs_ref_ci95: tuple[float, float] | None
    delta_ppl_pct: float
    delta_ppl_pct_ci95: tuple[float, float] | None
    kl_share: float  # of the whole-model KL: shares need not sum to 1 (errors interact)
    top1_agreement: float
    rank: int  # 1: the most sensitive
    predictors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SensitivityResult:
    """Per-unit sensitivity, its ranking and stability, the predictors' agreement with it, the mixed-precision
    curve, and what it was measured on. ``window_kl`` (units × windows) and ``window_nll`` keep the per-window
    sums (left out of ``to_dict``)."""

    model: str
    corpus: str
    method: str
    transform: str
    unit: str
    threshold: float
    n_windows: int
    n_tokens: int
    window: int
    ref_ppl: float
    whole: dict[str, Any]
    units: list[UnitSensitivity]
    ranking: list[str]
    spearman_halves: float | None
    spearman_halves_ci95: tuple[float, float] | None
    spearman_brown: float | None
    predictors: dict[str, dict[str, Any]]
    mixed: dict[str, Any] | None
    seconds: dict[str, float]
    replay: bool
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    window_kl: np.ndarray | None = field(default=None, repr=False, compare=False)
    window_nll: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the per-window arrays, JSON-ready (intervals over one window are null)."""
        d = asdict(self)
        d.pop("window_kl")
        d.pop("window_nll")
        return _nulls(d)

    def table(self) -> Any:
        """One row per unit in forward order: KL and Δppl with intervals, share, rank and the predictors."""
        import pandas as pd

        rows = []
        for u in self.units:
            rows.append(
                {
                    "unit": u.unit,
                    "block": u.block,
                    "rank": u.rank,
                    "kl_vs_ref": u.kl_vs_ref,
                    "kl_lo": (u.kl_vs_ref_ci95 or (np.nan, np.nan))[0],
                    "kl_hi": (u.kl_vs_ref_ci95 or (np.nan, np.nan))[1],
                    "delta_ppl_pct": u.delta_ppl_pct,
                    "delta_lo": (u.delta_ppl_pct_ci95 or (np.nan, np.nan))[0],
                    "delta_hi": (u.delta_ppl_pct_ci95 or (np.nan, np.nan))[1],
                    "kl_share": u.kl_share,
                    "top1_agreement": u.top1_agreement,
                    **u.predictors,
                }
            )
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        return sensitivity_html(self)


def _nulls(d: Any) -> Any:
    """NaN intervals and ρ become null: JSON has no NaN."""
    if isinstance(d, dict):
        return {k: _nulls(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        items = [_nulls(v) for v in d]
        if len(items) == 2 and all(isinstance(v, float) and v != v for v in d):
            return None
        return items
    if isinstance(d, float) and d != d:
        return None
    return d


def sensitivity_html(r: SensitivityResult) -> str:
    """``SensitivityResult``: the five most sensitive units with their intervals, the ranking's stability and
    the whole-model row."""
    rows: list[tuple[Any, ...]] = [
        (
            "whole model",
            f"KL {r.whole['kl_vs_ref']:.5f}",
            f"{fmt_interval(r.whole['kl_vs_ref_ci95'], '.5f')}; Δppl {r.whole['delta_ppl_pct']:+.2f} %",
        )
    ]
    by_name = {u.unit: u for u in r.units}
    for name in r.ranking[:5]:
        u = by_name[name]
        rows.append(
            (
                f"#{u.rank} {u.unit}",
                f"KL {u.kl_vs_ref:.5f} {fmt_interval(u.kl_vs_ref_ci95, '.5f')}",
                f"Δppl {u.delta_ppl_pct:+.2f} % {fmt_interval(u.delta_ppl_pct_ci95, '+.2f')}; "
                f"{100 * u.kl_share:.0f} % of the whole-model KL",
            )
        )
    if r.spearman_halves is not None:
        rows.append(
            (
                "stability",
                f"ρ {r.spearman_halves:.2f} {fmt_interval(r.spearman_halves_ci95, '.2f')}",
                "between halves; "
                + ("n/a" if r.spearman_brown is None else f"{r.spearman_brown:.2f}")
                + " for the whole set (Spearman–Brown)",
            )
        )
    settings = [
        ("model", r.model),
        ("corpus", r.corpus),
        ("method", r.method),
        ("transform", r.transform or None),
        ("unit", r.unit),
        ("windows", f"{r.n_windows} of {r.window} tokens, {r.n_tokens} scored"),
        *provenance(r.extra),
    ]
    return render_html(named("Sensitivity", r.model, r.method), rows, settings, notes=r.notes)


# ------------------------------------------------------------------ module swaps and replay


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@contextmanager
def swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Put ``modules`` at their paths in ``model`` for the duration; the originals always come back."""
    old = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            _set(model, name, module)
        yield model
    finally:
        for name, module in old.items():
            _set(model, name, module)


class _Replay(nn.Module):
    """A block's stand-in that returns what the block returned when the float model ran on this batch.

    Attributes the model's forward reads from its blocks (Gemma 3's ``attention_type``) come from the block.
    """

    def __init__(self, block: nn.Module, output: Any):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: nothing of it runs
        self.__dict__["_output"] = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_output"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


@contextmanager
def _recording(model: nn.Module, paths: list[str], outputs: dict[int, Any]) -> Iterator[None]:
    handles = []
    try:
        for i, path in enumerate(paths):
            hook = lambda mod, args, out, i=i: outputs.__setitem__(i, _detached(out))  # noqa: E731
            handles.append(model.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden(split: SplitLM, x: torch.Tensor, keep: int) -> torch.Tensor:
    """The body's final states at the last ``keep`` positions, without a key-value cache (a replayed block
    must not find another block's entries in it)."""
    return split.body(input_ids=x, use_cache=False).last_hidden_state[:, -keep:]


# ------------------------------------------------------------------ scoring against stored reference chunks


@dataclass
class _Ref:
    """The reference's log-probs for one batch, chunk by chunk as ``perplexity`` makes them, and its NLLs.

    Each chunk also keeps what every unit would otherwise recompute from it: its probabilities
    ``exp(log p)`` and its top-1 tokens (twice the log-probs' memory, one exp per chunk instead of one
    per unit)."""

    chunks: list[list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]]
    nll: list[float]


def _chunks(batch: list[Span], length: int, prefix: int, step: int) -> Iterator[tuple[int, int, int]]:
    for row, s in enumerate(batch):
        p = s.score_from - s.begin + prefix - 1  # the logit at position p predicts the token at p + 1
        while p < length - 1:
            stop = min(p + step, length - 1)
            yield row, p, stop
            p = stop


def _reference(split: SplitLM, states: torch.Tensor, x: torch.Tensor, batch: list[Span], prefix: int) -> _Ref:
    length, keep = x.shape[1], states.shape[1]
    offset = length - keep
    ref = _Ref([[] for _ in batch], [0.0] * len(batch))
    for row, p, stop in _chunks(batch, length, prefix, _step(split, states)):
        lr = torch.log_softmax(split.logits(states[row, p - offset : stop - offset]), dim=-1)
        ref.chunks[row].append((p, stop, lr, lr.exp(), lr.argmax(-1)))
        ref.nll[row] += float(-lr.gather(-1, x[row, p + 1 : stop + 1, None]).double().sum())
    return ref


def _step(split: SplitLM, states: torch.Tensor) -> int:
    vocab = getattr(split.head, "out_features", None) or split.logits(states[0, :1]).shape[-1]
    return positions_per_chunk(vocab)


def _against(
    split: SplitLM, states: torch.Tensor, ref: _Ref, x: torch.Tensor
) -> tuple[list[float], list[float], list[int]]:
    """Per window: the NLL sum, the KL(P_ref || P) sum and the top-1 matches, with ``perplexity``'s arithmetic.

    The KL is ``(exp(lr) * (lr - lq)).sum(-1)`` element for element as ``perplexity`` computes it, so the
    sums are bit-identical; it is made in one reused buffer, with the reference's probabilities and top-1
    stored, because fresh chunk-sized temporaries cost more than the arithmetic."""
    length, keep = x.shape[1], states.shape[1]
    offset = length - keep
    nll, kl, top1 = [], [], []
    buf: torch.Tensor | None = None
    for row, chunks in enumerate(ref.chunks):
        n, k, t = 0.0, 0.0, 0
        for p, stop, lr, pr, top_r in chunks:
            lq = torch.log_softmax(split.logits(states[row, p - offset : stop - offset]), dim=-1)
            n += float(-lq.gather(-1, x[row, p + 1 : stop + 1, None]).double().sum())
            if buf is None or buf.numel() < lr.numel():
                buf = torch.empty(lr.numel(), dtype=lr.dtype)
            diff = buf[: lr.numel()].view(lr.shape)
            torch.sub(lr, lq, out=diff)
            k += float(diff.mul_(pr).sum(-1).double().sum())
            t += int((top_r == lq.argmax(-1)).sum())
        nll.append(n)
        kl.append(k)
        top1.append(t)
    return nll, kl, top1


# ------------------------------------------------------------------ the sweep


@dataclass
class _Sums:
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)

    def add(self, sums: tuple[list[float], list[float], list[int]]) -> None:
        self.nll += sums[0]
        self.kl += sums[1]
        self.top1 += sums[2]


def _batch_ids(corpus_ids: torch.Tensor, batch: list[Span], settings: PerplexitySettings, bos: int | None):
    x = torch.stack([corpus_ids[s.begin : s.end] for s in batch])
    if settings.prefix:
        assert bos is not None  # window_ids refused bos='window' without one
        x = torch.cat([torch.full((len(batch), 1), bos, dtype=x.dtype), x], dim=1)
    keep = min(max(s.n_scored for s in batch) + 1, x.shape[1])
    return x, keep


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    ids: torch.Tensor,
    settings: PerplexitySettings | None = None,
    method: str = "llm.int8",
    *,
    transform: Transform | None = None,
    unit: str = "block",
    threshold: float = 6.0,
    outlier_weights: str = "int8",
    round_to: str | None = None,
    skip: tuple[str, ...] | None = None,
    bos_token_id: int | None = None,
    calib_ids: torch.Tensor | None = None,
    predictors: bool = True,
    calib_windows: int = 2,
    mixed: bool = True,
    ks: tuple[int, ...] | None = None,
    random_draws: int = 20,
    keep: str | None = None,
    seed: int = 0,
    replay: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    corpus_name: str = "",
) -> SensitivityResult:
    """Quantize each unit alone with ``method`` (after ``transform``) and measure it against the float model.

    Args:
        model: a causal LM in float, left unchanged.
        ids: the evaluated text's token ids.
        settings: windows as ``outliers eval`` cuts them (default: chunks of 512, 4 per batch).
        method: a registered method (``outliers.quant.methods``); ``transform`` acts first, on the whole model.
        unit: ``block``, ``linear`` or ``kind``.
        threshold, outlier_weights, round_to, skip: as ``outliers eval`` takes them.
        calib_ids: text for the predictors and a smoothing transform; None: the evaluated text, read only
            after the tokens evaluation reads (``outliers.eval.windows.evaluated_tokens``).
        predictors: measure the cheap predictors on ``calib_windows`` calibration windows.
        mixed: the mixed-precision curve (ranked on even windows, scored on odd ones) at ``ks`` units kept
            (default 0, 1, 2, 4, 8, …, below the number of units), kept in float or as method ``keep``
            (default: float; an 8-bit method keeps a 4-bit method's units at 8 bits), beside
            ``random_draws`` random choices of k units per k (0: no random baseline).
        replay: run each unit from its first block on recorded block outputs (False: one full forward per
            unit, the naive sweep; the numbers are the same bit for bit).

    Raises:
        InvalidArgumentError: an unknown method or unit, fewer than two units, or a model whose head
            cannot be split from its body.
    """
    from outliers.quant.methods import Format, get_method

    settings = settings or PerplexitySettings()
    transform = transform or Transform()
    spec = get_method(method)
    if keep is None and spec.format is Format.INT4:
        keep = "absmax-vector"
    if keep is not None:
        get_method(keep)
    started = time.perf_counter()
    ev = RowEvaluator(
        model, ids, settings, bos_token_id=bos_token_id, calib_ids=calib_ids, keep_reference=False, progress=False
    )
    row = Row(method, transform, threshold, outlier_weights, round_to, skip)
    base, applied, setup = ev.transformed(transform)
    quantized, report, made = ev.quantized(base, row)
    setup |= made
    units = quantization_units(base, report.replaced, unit)
    if len(units) < 2:
        raise InvalidArgumentError(f"sensitivity needs at least two units; this model has {len(units)} ({unit})")
    split_ref, split_base = split_lm(model), split_lm(base)
    if split_ref is None or split_base is None:
        raise InvalidArgumentError("sensitivity needs a causal LM whose output head can be split from its body")
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    mix = deepcopy(base, memo=shared)  # the module tree only: units are swapped into it, base stays as it is
    split_mix = split_lm(mix)
    assert split_mix is not None
    q_modules = dict(quantized.named_modules())
    block_paths = [path for _, path, _ in blocks(base)]
    block_modules = {path: mix.get_submodule(path) for path in block_paths}

    corpus_ids = window_ids(ids, settings, bos_token_id)
    windows = spans(len(corpus_ids), settings)
    device = input_device(model)
    per_unit = [_Sums() for _ in units]
    whole, ref_nll = _Sums(), []
    n_forwards = 0
    bar = tqdm(total=len(windows), unit="win", desc=f"sensitivity ({len(units)} units)", disable=not progress)
    for batch in batches(windows, settings.batch_size):
        x, keep_n = _batch_ids(corpus_ids, batch, settings, bos_token_id)
        x = x.to(device)
        outputs: dict[int, Any] = {}
        with _recording(base, block_paths, outputs):
            base_states = _hidden(split_base, x, keep_n)
        ref_states = base_states if base is model else _hidden(split_ref, x, keep_n)
        ref = _reference(split_ref, ref_states, x, batch, settings.prefix)
        ref_nll += ref.nll
        whole.add(_against(split_base, _hidden(split_lm(quantized) or split_base, x, keep_n), ref, x))
        n_forwards += 3 if base is not model else 2
        for u, sums in zip(units, per_unit, strict=True):
            swap = {m: q_modules[m] for m in u.modules}
            if replay:
                swap |= {
                    path: _Replay(block_modules[path], outputs[i]) for i, path in enumerate(block_paths[: u.block])
                }
            with swapped(mix, swap):
                sums.add(_against(split_mix, _hidden(split_mix, x, keep_n), ref, x))
            n_forwards += 1
        del outputs, ref
        bar.update(len(batch))
    bar.close()
    sweep_s = time.perf_counter() - started

    tokens = [s.n_scored for s in windows]
    n_tokens = sum(tokens)
    whole_kl = sum(whole.kl) / n_tokens
    kl = np.array([[*s.kl] for s in per_unit])  # units × windows
    rates = kl.sum(1) / n_tokens
    order = list(np.argsort(-rates, kind="stable"))
    rank = {int(i): r + 1 for r, i in enumerate(order)}
    results = [
        UnitSensitivity(
            u.name,
            u.block,
            u.modules,
            float(rates[i]),
            rate_interval(s.kl, tokens),
            100.0 * float(np.expm1((sum(s.nll) - sum(ref_nll)) / n_tokens)),
            delta_ppl_pct_interval(s.nll, ref_nll, tokens),
            float(rates[i] / whole_kl) if whole_kl > 0 else float("nan"),
            sum(s.top1) / n_tokens,
            rank[i],
        )
        for i, (u, s) in enumerate(zip(units, per_unit, strict=True))
    ]
    halves = spearman_halves(kl, np.asarray(tokens))
    notes = []
    if len(windows) < 8:
        notes.append(f"only {len(windows)} windows: the halves' ρ and every interval are rough")

    predictor_rows: dict[str, dict[str, float]] = {}
    correlations: dict[str, dict[str, Any]] = {}
    pred_s = 0.0
    if predictors:
        from outliers.analysis.unit_predictors import unit_predictors
        from outliers.errors import CorpusError
        from outliers.quant.calibration import calibration_windows

        t0 = time.perf_counter()
        try:
            calib = calibration_windows(ev.calib_ids, settings.window, calib_windows, reserved=ev.reserved)
        except CorpusError as e:
            notes.append(f"no predictors: {e}")
        else:
            predictor_rows = unit_predictors(base, quantized, units, calib, batch_size=settings.batch_size)
            names = list(next(iter(predictor_rows.values())))
            for name in names:
                values = np.array([predictor_rows[u.name][name] for u in units])
                rho, ci = spearman_interval(values, rates, seed=seed)
                correlations[name] = {"rho": rho, "rho_ci95": ci}
            results = [_with_predictors(r, predictor_rows[r.unit]) for r in results]
        pred_s = time.perf_counter() - t0

    curve, mixed_s = None, 0.0
    if mixed:
        t0 = time.perf_counter()
        keep_modules = None
        if keep is not None:
            from outliers.quant.model import quantized_copy

            kept_copy, _ = quantized_copy(
                base, keep, threshold, skip=skip, outlier_weights=outlier_weights, round_to=round_to
            )
            keep_modules = dict(kept_copy.named_modules())
        curve = _mixed_curve(
            model,
            base,
            mix,
            units,
            report.replaced,
            q_modules,
            keep_modules,
            kl,
            tokens,
            windows,
            corpus_ids,
            settings,
            bos_token_id,
            ks,
            random_draws,
            seed,
            keep,
            progress,
        )
        mixed_s = time.perf_counter() - t0

    return SensitivityResult(
        model=str(model_name or getattr(model, "outliers_name", None) or type(model).__name__),
        corpus=corpus_name,
        method=method,
        transform=transform.label if transform else "",
        unit=unit,
        threshold=report.threshold,
        n_windows=len(windows),
        n_tokens=n_tokens,
        window=settings.window,
        ref_ppl=float(np.exp(sum(ref_nll) / n_tokens)),
        whole=dict(
            kl_vs_ref=whole_kl,
            kl_vs_ref_ci95=rate_interval(whole.kl, tokens),
            delta_ppl_pct=100.0 * float(np.expm1((sum(whole.nll) - sum(ref_nll)) / n_tokens)),
            delta_ppl_pct_ci95=delta_ppl_pct_interval(whole.nll, ref_nll, tokens),
            top1_agreement=sum(whole.top1) / n_tokens,
        ),
        units=results,
        ranking=[units[i].name for i in order],
        spearman_halves=halves[0],
        spearman_halves_ci95=halves[1],
        spearman_brown=_spearman_brown(halves[0]),
        predictors=correlations,
        mixed=curve,
        seconds=dict(setup | {"sweep": sweep_s, "predictors": pred_s, "mixed": mixed_s, "forwards": n_forwards}),
        replay=replay,
        notes=notes,
        extra=dict(applied),
        window_kl=kl,
        window_nll=np.array([[*s.nll] for s in per_unit]),
    )


def _spearman_brown(rho: float | None) -> float | None:
    """The step-up 2ρ / (1 + ρ) from half the windows to all of them; None where ρ is none or −1."""
    return None if rho is None or rho <= -1 else 2 * rho / (1 + rho)


def _with_predictors(u: UnitSensitivity, values: dict[str, float]) -> UnitSensitivity:
    from dataclasses import replace

    return replace(u, predictors=values)


# ------------------------------------------------------------------ rank statistics


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ along the last axis (average ranks for ties; NaN where either side is constant)."""
    return _rowwise_pearson(_ranks(a), _ranks(b))


def spearman_halves(
    window_kl: np.ndarray, tokens: np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> tuple[float | None, tuple[float, float] | None]:
    """Spearman's ρ between the units' KL measured on even and on odd windows, with a 95 % bootstrap interval
    (windows resampled within each half, the units' values paired by window). None with fewer than 3 units or
    4 windows."""
    n_units, n_windows = window_kl.shape
    if n_units < 3 or n_windows < 4:
        return None, None
    halves = [np.arange(0, n_windows, 2), np.arange(1, n_windows, 2)]

    def rates(idx: np.ndarray) -> np.ndarray:  # idx: (..., windows) -> (..., units)
        return np.moveaxis(window_kl[:, idx].sum(-1) / tokens[idx].sum(-1), 0, -1)

    rho = float(spearman(rates(halves[0]), rates(halves[1])))
    rng = np.random.default_rng(seed)
    draws = [h[rng.integers(0, len(h), size=(n_resamples, len(h)))] for h in halves]
    boot = spearman(rates(draws[0]), rates(draws[1]))
    ci = _percentiles(boot)
    return (None if rho != rho else rho), ci


def spearman_interval(
    x: np.ndarray, y: np.ndarray, *, n_resamples: int = 2000, seed: int = 0
) -> tuple[float | None, tuple[float, float] | None]:
    """Spearman's ρ of ``x`` with ``y`` over units, with a 95 % bootstrap interval over units."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return None, None
    rho = float(spearman(x, y))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
    ci = _percentiles(spearman(x[idx], y[idx]))
    return (None if rho != rho else rho), ci


def _percentiles(boot: np.ndarray) -> tuple[float, float] | None:
    boot = boot[np.isfinite(boot)]
    if len(boot) < 10:
        return None
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


# ------------------------------------------------------------------ mixed precision from the ranking


def default_ks(n_units: int) -> tuple[int, ...]:
    """0, 1, 2, 4, 8, … below the number of units (keeping every unit is the float model)."""
    ks, k = [0], 1
    while k < n_units:
        ks.append(k)
        k *= 2
    return tuple(ks)


def _mixed_curve(
    model,
    base,
    mix,
    units,
    replaced,
    q_modules,
    keep_modules,
    window_kl,
    tokens,
    windows,
    corpus_ids,
    settings,
    bos_token_id,
    ks,
    random_draws,
    seed,
    keep,
    progress,
) -> dict[str, Any] | None:
    """Rank on even windows, keep the top-k units out of the method, score on odd windows; beside it, k units
    chosen at random. KL per k as rate and per-window sums; the paired difference (random − ranked) at each k."""
    n_windows = len(windows)
    if n_windows < 2:
        return None
    even, odd = list(range(0, n_windows, 2)), list(range(1, n_windows, 2))
    tok = np.asarray(tokens)
    rank_rates = window_kl[:, even].sum(1) / tok[even].sum()
    order = list(np.argsort(-rank_rates, kind="stable"))
    ks = tuple(k for k in (ks or default_ks(len(units))) if 0 <= k <= len(units))
    rng = np.random.default_rng(seed)
    configs: list[tuple[str, int, tuple[int, ...]]] = [("ranked", k, tuple(order[:k])) for k in ks]
    for k in ks:
        if k == 0:
            continue
        configs += [("random", k, tuple(rng.choice(len(units), size=k, replace=False))) for _ in range(random_draws)]
    held = [windows[i] for i in odd]
    split_ref, split_mix = split_lm(model), split_lm(mix)
    assert split_ref is not None and split_mix is not None
    unit_of = {m: i for i, u in enumerate(units) for m in u.modules}
    sums = {i: _Sums() for i in range(len(configs))}
    device = input_device(model)
    bar = tqdm(total=len(configs) * len(held), unit="win", desc="mixed precision", disable=not progress)
    for batch in batches(held, settings.batch_size):
        x, keep_n = _batch_ids(corpus_ids, batch, settings, bos_token_id)
        x = x.to(device)
        ref = _reference(split_ref, _hidden(split_ref, x, keep_n), x, batch, settings.prefix)
        for c, (_, _, kept) in enumerate(configs):
            swap = {}
            for m in replaced:
                if unit_of.get(m) in kept:
                    if keep_modules is not None:
                        swap[m] = keep_modules[m]
                else:
                    swap[m] = q_modules[m]
            with swapped(mix, swap):
                sums[c].add(_against(split_mix, _hidden(split_mix, x, keep_n), ref, x))
            bar.update(len(batch))
    bar.close()
    held_tokens = tok[odd]
    n = held_tokens.sum()

    def window_kl_of(c: int) -> np.ndarray:
        return np.asarray(sums[c].kl)

    ranked = {k: window_kl_of(c) for c, (what, k, _) in enumerate(configs) if what == "ranked"}
    random: dict[int, list[np.ndarray]] = {}
    for c, (what, k, _) in enumerate(configs):
        if what == "random":
            random.setdefault(k, []).append(window_kl_of(c))
    points = []
    for k in ks:
        point: dict[str, Any] = {
            "k": k,
            "ranked_kl": float(ranked[k].sum() / n),
            "ranked_kl_ci95": rate_interval(list(ranked[k]), list(held_tokens)),
            "kept": [units[i].name for i in order[:k]],
        }
        if k in random:
            draws = np.stack(random[k])  # draws × windows
            per_draw = draws.sum(1) / n
            diff = draws.mean(0) - ranked[k]
            point |= {
                "random_kl_mean": float(per_draw.mean()),
                "random_kl_band": (float(np.percentile(per_draw, 2.5)), float(np.percentile(per_draw, 97.5))),
                "random_minus_ranked": float(diff.sum() / n),
                "random_minus_ranked_ci95": rate_interval(list(diff), list(held_tokens)),
            }
        points.append(point)
    return {
        "ranked_on": "even windows",
        "scored_on": "odd windows",
        "n_windows": len(held),
        "keep": keep or "float",
        "random_draws": random_draws,
        "forwards": len(configs) * len(held),
        "points": points,
    }
