"""The causal edits of ``outliers trace``, each a context manager on a model that leaves it as it was on exit.

``none``                      the model as it is; where there are super weights, their output rows are recorded
                              for ``restore_super_activation`` (``recording``).
``zero_super_weights``        the super weights zeroed (``outliers.analysis.superweights.zeroed``).
``restore_super_activation``  zeroed, and the super activation written back: at each super weight's down-projection
                              output row, the unedited model's values where they were at least ``restore_fraction``
                              of the row's largest ``|value|`` in the window (the hooks of
                              ``outliers.analysis.superweight_effects``, Yu et al. 2024's Table 1 edit).
``clamp_massive``             at the massive dim's birth block, the block output's value in that dim set, on the
                              tokens where it is massive, to its median over the window's other tokens.
``clamp_control``             the same clamp, on the same tokens, of a random other dim (seeded): the control.

A token is massive in dim ``d`` at a block when ``|h[d]| > 100`` and ``> 1000 x`` the median ``|h|`` of the
window's hidden state at that block's output (Sun et al. 2024, the ``sun`` criterion of
``outliers.quant.prefix``). The clamp decides this per window inside the forward, so it acts the same on the
float model and on a quantized copy of it; the control takes its tokens from the massive dim, not its own.

An edit has a weight part (``Edit.weights``: zeroed weights, entered before a quantized copy is made, so the
copy quantizes the edited weights) and an activation part (``Edit.hooks``: forward hooks, entered on each model
that is scored, the float model and any quantized copy of it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# the restore hooks are superweight_effects' own (recorded per window, keyed by its token ids): reused, not copied
from outliers.analysis.superweight_effects import row_hooks
from outliers.analysis.superweights import Coord, zeroed
from outliers.arch.registry import architecture_of, blocks
from outliers.errors import InvalidArgumentError
from outliers.quant.prefix import SUN_ABS, SUN_RATIO

__all__ = [
    "EDITS",
    "Clamp",
    "Edit",
    "clamped",
    "recording",
    "restore_super_activation",
    "zero_super_weights",
    "plan_edits",
    "massive_mask",
]

EDITS = ("none", "zero_super_weights", "restore_super_activation", "clamp_massive", "clamp_control")
RESTORE_FRACTION = 0.5


@dataclass(frozen=True)
class Clamp:
    """At block ``block``'s output, set ``dim`` to its median over the other tokens on the tokens where ``source``
    (a massive dim) is massive; ``dim == source`` clamps the massive dim itself."""

    block: int
    dim: int
    source: int


def massive_mask(h: torch.Tensor, dim: int) -> torch.Tensor:
    """``(batch, seq)``: where ``|h[..., dim]|`` is massive by Sun et al.'s rule, per window of ``h (batch, seq,
    hidden)``: > 100 and > 1000 x the median ``|h|`` of the window's hidden state."""
    a = h.detach().float().abs()
    med = a.flatten(1).median(dim=1).values  # (batch,)
    x = a[..., dim]
    return (x > SUN_ABS) & (x > SUN_RATIO * med[:, None])


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def clamped(model: nn.Module, clamps: Sequence[Clamp]) -> Iterator[dict[str, int]]:
    """Apply ``clamps`` to every forward while the block runs; yields ``{"tokens": clamped (window, token) pairs}``.

    The clamp writes into the block's output in place (the residual stream the next block reads); every hook is
    removed on exit and no weight changes.

    Raises:
        InvalidArgumentError: a block the model does not have, or a dim outside its hidden size.
    """
    found = {i: block for i, _, block in blocks(model, architecture_of(model))}
    counts = {"tokens": 0}
    by_block: dict[int, list[Clamp]] = {}
    for c in clamps:
        if c.block not in found:
            raise InvalidArgumentError(f"clamp at block {c.block}: the model has blocks 0-{len(found) - 1}")
        by_block.setdefault(c.block, []).append(c)

    def on_block(b: int, out: Any) -> None:
        h = _output(out)
        for c in by_block[b]:
            if not 0 <= max(c.dim, c.source) < h.shape[-1]:
                raise InvalidArgumentError(f"clamp of dim {c.dim} (source {c.source}): hidden size is {h.shape[-1]}")
            mask = massive_mask(h, c.source).to(h.device)
            for w in range(h.shape[0]):
                if not mask[w].any() or mask[w].all():
                    continue
                median = h[w, ~mask[w], c.dim].float().median()
                h[w, mask[w], c.dim] = median.to(h.dtype)
                counts["tokens"] += int(mask[w].sum())

    handles = []
    try:
        for b in by_block:
            handles.append(found[b].register_forward_hook(lambda m, a, o, b=b: on_block(b, o)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def _rows(coords: Sequence[Coord]) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for b, r, _ in coords:
        if r not in rows.setdefault(b, []):
            rows[b].append(r)
    return rows


def recording(model: nn.Module, coords: Sequence[Coord], store: dict) -> AbstractContextManager[None]:
    """Record, per window, the down-projection output rows the super weights at ``coords`` write, into ``store``
    (for ``restore_super_activation``)."""
    return row_hooks(model, _rows(coords), store, None)


def zero_super_weights(model: nn.Module, coords: Sequence[Coord]) -> AbstractContextManager[None]:
    """The super weights at ``coords`` zeroed; their exact values come back on exit."""
    return zeroed(model, list(coords))


@contextmanager
def restore_super_activation(
    model: nn.Module, coords: Sequence[Coord], store: dict, fraction: float = RESTORE_FRACTION
) -> Iterator[None]:
    """The super weights zeroed and their rows' recorded activations written back (``recording`` first)."""
    with ExitStack() as stack:
        stack.enter_context(zeroed(model, list(coords)))
        stack.enter_context(row_hooks(model, _rows(coords), store, fraction))
        yield


@dataclass(frozen=True)
class Edit:
    """One edit: weights zeroed (``coords``), the super activation restored, and clamps.

    ``applicable`` is False (with ``note`` saying why) for an edit the model gives nothing to act on: the
    super-weight edits of a model without super weights, the clamps of one without a massive activation.
    """

    name: str
    coords: tuple[Coord, ...] = ()
    restore: bool = False
    clamps: tuple[Clamp, ...] = ()
    applicable: bool = True
    note: str = ""

    def weights(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The weight part: zeroed weights (enter it before making a quantized copy of ``model``)."""
        return zeroed(model, list(self.coords)) if self.coords else nullcontext()

    @contextmanager
    def hooks(self, model: nn.Module, store: dict, fraction: float = RESTORE_FRACTION) -> Iterator[dict[str, int]]:
        """The activation part, on ``model`` (the float model or a quantized copy): the restore hooks (reading what
        ``recording`` put in ``store`` during the unedited pass) and the clamps. Yields the clamp counts."""
        with ExitStack() as stack:
            counts = {"tokens": 0}
            if self.restore:
                stack.enter_context(row_hooks(model, _rows(self.coords), store, fraction))
            if self.clamps:
                counts = stack.enter_context(clamped(model, self.clamps))
            yield counts

    def describe(self) -> str:
        """The edit in words."""
        if not self.applicable:
            return f"not applicable: {self.note}"
        if self.name == "none":
            return "the model as it is"
        weights = ", ".join(f"W{list(c)}" for c in self.coords)
        if self.name == "zero_super_weights":
            return f"zero {weights}"
        if self.name == "restore_super_activation":
            return f"zero {weights}, restore the super activation"
        where = ", ".join(f"dim {c.dim} at block {c.block}" for c in self.clamps)
        each = "each " if len(self.clamps) > 1 else ""
        return f"clamp {where} {each}to its median over the other tokens" + (
            f" (tokens where dim {self.clamps[0].source} is massive)" if self.name == "clamp_control" else ""
        )


def control_dims(hidden: int, exclude: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``n`` distinct dims of ``hidden`` drawn at random (``seed``), none of ``exclude``."""
    pool = [d for d in range(hidden) if d not in set(exclude)]
    if len(pool) < n:
        raise InvalidArgumentError(f"cannot draw {n} control dims from {hidden} dims without {len(exclude)}")
    return sorted(random.Random(seed).sample(pool, n))


def plan_edits(
    coords: Sequence[Coord],
    births: Sequence[tuple[int, int]],
    hidden: int,
    *,
    seed: int = 0,
    avoid: Sequence[int] = (),
    names: Sequence[str] = EDITS,
) -> list[Edit]:
    """The edits ``names`` (in ``EDITS`` order) for super weights at ``coords`` and massive dims born at
    ``births`` (``(block, dim)`` each); the control dims are drawn from ``hidden`` dims with ``seed``, none of the
    massive dims nor ``avoid``.

    Raises:
        InvalidArgumentError: an unknown edit name.
    """
    unknown = [n for n in names if n not in EDITS]
    if unknown:
        raise InvalidArgumentError(f"unknown edit(s) {', '.join(unknown)}; choose from {', '.join(EDITS)}")
    massive = [d for _, d in births]
    control = control_dims(hidden, [*massive, *avoid], len(births), seed) if births else []
    no_sw = "no super weight (no block's down projection spikes by the detection rule)"
    no_massive = "no massive activation (no token's |h| > 100 and > 1000 x the median at any block)"
    out = []
    for name in EDITS:
        if name not in names:
            continue
        if name == "none":
            out.append(Edit(name))
        elif name in ("zero_super_weights", "restore_super_activation"):
            restore = name == "restore_super_activation"
            out.append(Edit(name, tuple(coords), restore, (), bool(coords), "" if coords else no_sw))
        elif name == "clamp_massive":
            clamps = tuple(Clamp(b, d, d) for b, d in births)
            out.append(Edit(name, clamps=clamps, applicable=bool(births), note="" if births else no_massive))
        else:
            clamps = tuple(Clamp(b, c, d) for (b, d), c in zip(births, control, strict=True))
            out.append(Edit(name, clamps=clamps, applicable=bool(births), note="" if births else no_massive))
    return out
