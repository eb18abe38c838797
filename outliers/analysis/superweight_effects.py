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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from outliers.analysis.superweights import Coord, SuperWeight, down_projections, zeroed
from outliers.arch.linear import weight_of
from outliers.display import fmt_interval, named, render_html
from outliers.errors import InvalidArgumentError
from outliers.eval.perplexity import PerplexityResult, PerplexitySettings, perplexity

__all__ = ["SuperWeightEffects", "super_weight_effects", "control_coords"]


@dataclass(frozen=True)
class SuperWeightEffects:
    """The four perplexities; ``zeroed`` and ``restored`` are None when no super weight was given."""

    original: PerplexityResult
    zeroed: PerplexityResult | None
    restored: PerplexityResult | None
    control: PerplexityResult
    control_k: int
    restore_fraction: float
    restored_positions: int  # (window, row) positions written back, over the windows

    def to_dict(self) -> dict[str, Any]:
        """``ppl``, ``ppl_ci95`` and, per edit, ``ppl_X``, ``ppl_X_ci95``, ``delta_ppl_pct_X`` (+ ``_ci95``)."""
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
        return d | {
            "control_k": self.control_k,
            "restore_fraction": self.restore_fraction,
            "restored_positions": self.restored_positions,
        }

    def _repr_html_(self) -> str:
        return superweight_effects_html(self)


def control_coords(model: nn.Module, exclude: list[Coord], k: int) -> list[Coord]:
    """The ``k`` largest-|w| weights over every block's down projection, those at ``exclude`` left out.

    Ties (common in weights dequantized from a 4-bit GGUF) go to the earlier (block, row, col). One down
    projection is read at a time: each gives its candidates, every weight at least as large as its own
    k-th largest, and the k largest of those are the k largest overall. Concatenating every |w| and
    taking one top-k held ~3x the down projections' bytes at once (7.7 GB for Qwen2.5-Coder-1.5B).

    Raises:
        InvalidArgumentError: k < 0 or more than the other weights.
    """
    downs = down_projections(model)
    total = sum(weight_of(m).numel() for _, m in downs)
    if not 0 <= k <= total - len(exclude):
        raise InvalidArgumentError(f"control_k must be in [0, {total - len(exclude)}], got {k}")
    if k == 0:
        return []
    values, where = [], []  # candidates' |w| and (layer, flat index), in (block, row, col) order
    for i, (b, m) in enumerate(downs):
        mag = weight_of(m).detach().abs().float().flatten().cpu()
        cols = weight_of(m).shape[1]
        for eb, r, c in exclude:
            if eb == b:
                mag[r * cols + c] = -1.0
        kth = torch.topk(mag, min(k, len(mag))).values[-1]
        idx = torch.nonzero(mag >= kth).view(-1)  # every tie of the k-th largest: the rule decides among them
        values.append(mag[idx])
        where.append(torch.stack([torch.full_like(idx, i), idx], 1))
        del mag
    cand, pos = torch.cat(values), torch.cat(where)
    order = torch.sort(cand, descending=True, stable=True).indices[:k]  # stable: ties keep (block, row, col) order
    out = []
    for i, flat in pos[order].tolist():
        b, m = downs[i]
        r, c = divmod(flat, weight_of(m).shape[1])
        out.append((b, r, c))
    return out


@contextmanager
def _row_hooks(model: nn.Module, rows: dict[int, list[int]], store: dict, fraction: float | None) -> Iterator[None]:
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
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> SuperWeightEffects:
    """Score the original model, the super weights zeroed, zeroed with the super activation restored, and the
    ``control_k`` largest other down-projection weights zeroed, on the first ``max_windows`` chunks of
    ``window`` tokens. The model is unchanged on return, whatever happens. ``meta`` (``model``, ``corpus``)
    names the model and corpus in the four results.

    Raises:
        InvalidArgumentError: restore_fraction outside (0, 1], a bad control_k, a family without ``down``.
        CorpusError: fewer tokens than one window.
    """
    if not 0 < restore_fraction <= 1:
        raise InvalidArgumentError(f"restore_fraction must be in (0, 1], got {restore_fraction!r}")
    coords = [w.coord for w in weights]
    control = control_coords(model, coords, control_k)
    rows: dict[int, list[int]] = {}
    for b, r, _ in coords:
        if r not in rows.setdefault(b, []):
            rows[b].append(r)
    settings = PerplexitySettings(window=window, max_windows=max_windows, batch_size=batch_size)
    kw: dict[str, Any] = {"progress": progress}
    kw |= {"model_name": (meta or {}).get("model"), "corpus_name": (meta or {}).get("corpus", "")}
    states: dict = {}  # the original model's final states per batch: every edit is paired against them
    store: dict = {}
    with _row_hooks(model, rows, store, None):
        original = perplexity(model, ids, settings, reference=model, reference_states=states, **kw)
    zero = restored = None
    if coords:
        with zeroed(model, coords):
            zero = perplexity(model, ids, settings, reference=model, reference_states=states, **kw)
        with ExitStack() as stack:
            stack.enter_context(zeroed(model, coords))
            stack.enter_context(_row_hooks(model, rows, store, restore_fraction))
            restored = perplexity(model, ids, settings, reference=model, reference_states=states, **kw)
    with zeroed(model, control):
        ctrl = perplexity(model, ids, settings, reference=model, reference_states=states, **kw)
    return SuperWeightEffects(
        original=original,
        zeroed=zero,
        restored=restored,
        control=ctrl,
        control_k=control_k,
        restore_fraction=float(restore_fraction),
        restored_positions=store.get("written", [0])[0],
    )


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
    ]
    note = "perplexity with its 95 % interval; the edits' change paired against the original on the same windows"
    return render_html(named("Super-weight effects", o.model), rows, settings, notes=[note])
