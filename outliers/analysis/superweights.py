"""Super weights: single down-projection weights whose removal breaks the model.

Yu et al. 2024 ("The Super Weight in Large Language Models", arXiv
2411.07191) find a handful of scalar weights in an early MLP down projection
that create the model's *super activation*, the massive activation (Sun et
al. 2024, arXiv 2402.17762) of one residual-stream dim, and whose zeroing
alone wrecks perplexity, while zeroing the 7000 largest other weights does
little. They locate one in a single forward pass: the down projection's
largest |input| and |output| spike together in one layer, and the weight is
``W[row = argmax |output| channel, col = argmax |input| channel]``; further
ones are found by zeroing the found weight and detecting again.

Here every block's down projection (the registry's ``down``) is hooked and
its largest |input|, |output| and its block's output |h| are kept per
channel over the windows. A block **jumps** when its output maximum is at
least ``jump`` (default 50) times the median over blocks of the output
maxima; the first (earliest) jumping block holds the super weight: the super
activation is made early and carried by the residual stream, and late blocks
that cancel it spike too. The weight is zeroed and detection repeats until no
block jumps, a weight repeats (the spike is not that weight's alone) or
``max_found`` are found. The weight's row is the residual dim it writes; it
is the *massive* dim when it is also the argmax |h| channel of its block's
output. ``zeroed`` edits weights in a context manager and always restores
their exact values.

The spike rule names *candidates*: Yu et al. define a super weight by its
effect, and ``outliers.analysis.superweight_verdicts`` decides which
candidates are super weights against magnitude-matched controls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from outliers.analysis.scan import cut_windows
from outliers.arch.linear import weight_of
from outliers.arch.lmhead import run_for_hooks
from outliers.arch.registry import architecture_of, blocks
from outliers.display import named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.models.dispatch import input_device

__all__ = [
    "SuperWeight",
    "SuperWeightResult",
    "super_weights",
    "down_projections",
    "down_places",
    "spike_table",
    "zeroed",
    "zeroed_places",
]

Place = tuple[str, int, int]  # (a linear's module name, row, col) of its weight in (out, in) layout
Coord = tuple[int, int, int]  # (block, row, col) of a down projection's weight in (out, in) layout
SPIKE_COLUMNS = ["block", "in_max", "in_channel", "out_max", "out_channel", "resid_max", "resid_channel", "ratio"]


@dataclass(frozen=True)
class SuperWeight:
    """One super weight: ``W[row, col]`` of block ``block``'s down projection, stored (out, in).

    ``activation``: the down projection's output at ``row`` largest in |.| over the windows (signed), the
    super activation; ``dim`` (= row) the residual-stream dim it lands in; ``massive``: ``dim`` is the
    argmax |h| channel of the block's output (``massive_dim``).
    """

    block: int
    row: int
    col: int
    value: float
    activation: float
    input_max: float  # the largest |input| of channel col
    dim: int
    massive_dim: int
    massive: bool

    @property
    def coord(self) -> Coord:
        return (self.block, self.row, self.col)


@dataclass(frozen=True)
class SuperWeightResult:
    """The super weights found, in order, and the first detection pass's per-block spike table.

    ``spikes``: block, in_max, in_channel, out_max, out_channel (the down projection's largest |input| and
    |output| and their channels), resid_max, resid_channel (the block output's), ratio = out_max / the
    median over blocks of out_max; a block jumps when ratio >= ``jump``. ``stop`` says why detection ended.
    """

    weights: tuple[SuperWeight, ...]
    spikes: pd.DataFrame
    jump: float
    stop: str
    window: int
    n_windows: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON, the ``meta`` facts first."""
        return {
            **self.meta,
            "super_weights": [asdict(w) for w in self.weights],
            "jump": self.jump,
            "stop": self.stop,
            "window": self.window,
            "n_windows": self.n_windows,
            "spikes": self.spikes.to_dict(orient="records"),
        }

    def _repr_html_(self) -> str:
        return superweights_html(self)


def down_projections(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Return ``(block, down projection)`` for every block.

    Raises:
        InvalidArgumentError: the family's registry entry names no down projection (or no blocks).
    """
    arch = architecture_of(model)
    if arch.down is None:
        raise InvalidArgumentError(
            f"architecture {arch.name!r} names no MLP down projection ('down') in the registry; "
            "super weights need one (outliers.arch)"
        )
    return [(i, block.get_submodule(arch.down)) for i, _, block in blocks(model, arch)]


def down_places(model: nn.Module, coords: Iterable[Coord]) -> list[Place]:
    """The down-projection ``(block, row, col)`` coordinates as ``Place``\\ s."""
    arch = architecture_of(model)
    if arch.down is None:
        down_projections(model)  # raises, naming the family
    paths = {b: f"{path}.{arch.down}" for b, path, _ in blocks(model, arch)}
    return [(paths[b], r, c) for b, r, c in coords]


@contextmanager
def zeroed_places(model: nn.Module, places: Sequence[Place]) -> Iterator[None]:
    """Zero the weights at ``places`` while the model runs; their exact values come back on exit, always."""
    saved = []
    try:
        with torch.no_grad():
            for name in dict.fromkeys(p[0] for p in places):
                w = weight_of(model.get_submodule(name))  # (out, in); a view of Conv1D's (in, out) storage
                rows = torch.tensor([p[1] for p in places if p[0] == name], device=w.device)
                cols = torch.tensor([p[2] for p in places if p[0] == name], device=w.device)
                saved.append((w, rows, cols, w[rows, cols].clone()))
                w[rows, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for w, rows, cols, values in reversed(saved):
                w[rows, cols] = values


@contextmanager
def zeroed(model: nn.Module, coords: list[Coord]) -> Iterator[None]:
    """Zero the down-projection weights at ``coords`` while the block runs; their exact values come back on exit."""
    with zeroed_places(model, down_places(model, coords)):
        yield


def _merge(best: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    """Keep per channel the value of largest |.| (signed) seen so far under ``key``."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    value = flat.gather(0, flat.abs().argmax(0, keepdim=True))[0].cpu()
    old = best.get(key)
    best[key] = value if old is None else torch.where(value.abs() > old.abs(), value, old)


@torch.inference_mode()
def _extremes(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """Run the windows; per block the signed per-channel extremes of the down projection's input and output
    and of the block's output. Every hook is removed on exit."""
    arch = architecture_of(model)
    downs = dict(down_projections(model))
    seen: dict[int, dict[str, torch.Tensor]] = {b: {} for b in downs}

    def on_down(b: int, args: Any, out: torch.Tensor) -> None:
        _merge(seen[b], "in", args[0])
        _merge(seen[b], "out", out)

    def on_block(b: int, out: Any) -> None:
        _merge(seen[b], "resid", out[0] if isinstance(out, tuple) else out)

    handles = []
    try:
        for b, _, block in blocks(model, arch):
            handles.append(downs[b].register_forward_hook(lambda m, a, o, b=b: on_down(b, a, o)))
            handles.append(block.register_forward_hook(lambda m, a, o, b=b: on_block(b, o)))
        device = input_device(model)  # a dispatched model may have its embeddings offloaded
        for start in range(0, len(windows), batch_size):
            run_for_hooks(model, windows[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return seen


def spike_table(seen: dict[int, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """The per-block table of ``SuperWeightResult.spikes`` from ``_extremes``' per-channel extremes."""
    rows = []
    for b, s in sorted(seen.items()):
        row: dict[str, Any] = {"block": b}
        for key, name in (("in", "in"), ("out", "out"), ("resid", "resid")):
            a = s[key].abs()
            row[f"{name}_max"], row[f"{name}_channel"] = float(a.max()), int(a.argmax())
        rows.append(row)
    table = pd.DataFrame(rows, columns=SPIKE_COLUMNS[:-1])
    median = float(table.out_max.median()) if len(table) else 0.0
    table["ratio"] = table.out_max / median if median > 0 else float("inf")
    return table


def super_weights(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    max_windows: int = 2,
    max_found: int = 4,
    jump: float = 50.0,
    batch_size: int = 4,
    meta: dict[str, Any] | None = None,
) -> SuperWeightResult:
    """Find up to ``max_found`` super weights over the first ``max_windows`` windows of ``window`` tokens.

    A block jumps when its down projection's largest |output| is >= ``jump`` times the median over blocks
    (module docstring). Found weights are zeroed for the next detection pass and restored on exit, always.

    Raises:
        InvalidArgumentError: jump <= 1, window < 2, max_windows, max_found or batch_size < 1, a family
            without a down projection in the registry.
        CorpusError: fewer tokens than one window.
    """
    if not jump > 1:
        raise InvalidArgumentError(f"jump must be > 1, got {jump!r}")
    if window < 2 or min(max_windows, max_found, batch_size) < 1:
        raise InvalidArgumentError(
            f"window must be >= 2 and max_windows, max_found, batch_size >= 1; "
            f"got {window}, {max_windows}, {max_found}, {batch_size}"
        )
    downs = dict(down_projections(model))
    windows, _ = cut_windows(ids, window, max_windows=max_windows)
    found: list[SuperWeight] = []
    first: pd.DataFrame | None = None
    stop = f"max_found ({max_found}) reached"
    with ExitStack() as stack:
        while len(found) < max_found:
            seen = _extremes(model, windows, batch_size)
            table = spike_table(seen)
            first = table if first is None else first
            jumping = table[table.ratio >= jump]
            if jumping.empty:
                stop = f"no block's output max reaches {jump:g} x the median"
                break
            top = jumping.iloc[0]  # the earliest: later spikes carry or cancel its activation
            b, r, c = int(top.block), int(top.out_channel), int(top.in_channel)
            if any(w.coord == (b, r, c) for w in found):
                stop = f"block {b} still jumps with W[{r}, {c}] zeroed: the spike is not that weight's alone"
                break
            found.append(
                SuperWeight(
                    block=b,
                    row=r,
                    col=c,
                    value=float(weight_of(downs[b])[r, c]),
                    activation=float(seen[b]["out"][r]),
                    input_max=float(top.in_max),
                    dim=r,
                    massive_dim=int(top.resid_channel),
                    massive=r == int(top.resid_channel),
                )
            )
            stack.enter_context(zeroed(model, [(b, r, c)]))
    assert first is not None
    return SuperWeightResult(
        weights=tuple(found),
        spikes=first,
        jump=float(jump),
        stop=stop,
        window=window,
        n_windows=len(windows),
        meta=dict(meta or {}),
    )


def superweights_html(r: SuperWeightResult) -> str:
    """``SuperWeightResult``: the super weights found as a table, or "none found" and the spike table."""
    import pandas as pd

    rows: list[tuple[Any, ...]] = [
        (
            "candidates",
            len(r.weights) or "none found",
            f"the spike rule: a block jumps at >= {r.jump:g} x the median output max; their effect decides which "
            "are super weights (super_weight_effects with controls)",
        ),
        ("detection stopped", r.stop),
    ]
    if r.weights:
        found = pd.DataFrame([vars(w) for w in r.weights]).drop(columns="dim")
        tables = [("W[row, col] of the block's down projection, stored (out, in)", found)]
    else:
        tables = [("per block: the down projection's largest |input| and |output|", r.spikes)]
    settings = [
        ("model", r.meta.get("model")),
        ("corpus", r.meta.get("corpus")),
        ("window", r.window),
        ("windows", r.n_windows),
        ("jump", f"{r.jump:g}"),
        *provenance(r.meta),
    ]
    return render_html(named("Super weights", r.meta.get("model", "")), rows, settings, tables=tables)
