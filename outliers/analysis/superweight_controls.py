"""Which weights each super-weight control zeroes; the perplexities are ``outliers.analysis.superweight_verdicts``'.

A control answers "is zeroing *these* weights special, or would zeroing any
comparable weights do the same?". Four are chosen here, each a list of
``Place`` = (a linear's module name, row, col), W stored (out, in):

* ``matched``: per super weight one weight of the same down projection with
  |w| within ``band`` (5 %) of the super weight's, outside the rows of every
  candidate's residual dim and outside the super weights' own columns in that
  matrix, drawn uniformly with ``torch.Generator().manual_seed(seed)``. Where
  the band holds fewer than ``seeds`` such weights (the super weight is often
  its matrix's largest by far), it is widened to the narrowest band that
  holds ``seeds`` of them (the ``seeds`` nearest in |w|), and the band used is
  recorded: ``MatchedBand``. Doubling it instead would jump past 100 %, where
  every small weight of the matrix qualifies and the draws stop being matched.
* ``paper``: Yu et al.'s own control as their code runs it
  (``search_percentage_1e-6``): in every linear of every block the top
  ``fraction`` of |w|, at least one per linear, the super weights left out
  before the top is taken (the authors zero and then restore them).
* ``outside_massive``: the ``k`` largest |w| over the same linears (``k``
  as many as ``paper`` zeroes), none in a *massive* place (``massive_places``):
  the rows of the massive residual dims in the linears that write the
  residual stream (attention output, down projection), their columns in the
  linears that read it (q/k/v, up/gate), and each super weight's input
  channel (its column of the down projection, its row of up/gate).
* ``largest_down``: the ``k`` (7000) largest other down-projection weights
  (``largest_down_coords``), the control of Yu et al.'s Table 1 as this
  toolkit ran it first; on a small model many of them sit in the massive
  dim's own row (``touching`` counts them).

The massive residual dims are the candidates' rows (the dims their
activation lands in). Ties in |w| go to the earlier linear and flat index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from outliers.analysis.superweights import Coord, Place, SuperWeight, down_places, down_projections, zeroed_places
from outliers.arch.linear import in_features, is_linear, out_features, weight_of
from outliers.arch.registry import architecture_of, blocks
from outliers.errors import InvalidArgumentError

__all__ = [
    "Place",
    "ControlSettings",
    "MatchedBand",
    "block_linears",
    "down_places",
    "zeroed_places",
    "matched_bands",
    "matched_draw",
    "paper_places",
    "massive_places",
    "outside_massive_places",
    "touching",
    "largest_down_coords",
]


@dataclass(frozen=True)
class ControlSettings:
    """The controls and the effect-based verdict (``outliers superweights``' defaults).

    ``seeds``: magnitude-matched draws, one perplexity each; ``min_effect``: the smallest Δppl (%) of a super
    weight; ``band``: the relative |w| band of a matched weight before any widening; ``paper_fraction``: the
    share of each linear's weights the paper's control zeroes (at least one); ``largest_k``: the largest other
    down-projection weights zeroed by ``largest_down_{k}``; ``per_weight``: judge each candidate by zeroing it
    alone (Yu et al.'s definition, one perplexity per candidate when there are several) rather than by the group.
    """

    seeds: int = 10
    min_effect: float = 100.0
    band: float = 0.05
    paper_fraction: float = 1e-6
    largest_k: int = 7000
    per_weight: bool = True

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.largest_k < 0:
            raise InvalidArgumentError(f"seeds must be >= 1 and largest_k >= 0, got {self.seeds}, {self.largest_k}")
        if not 0 < self.band < 1 or not 0 < self.paper_fraction < 1:
            raise InvalidArgumentError(
                f"band and paper_fraction must be in (0, 1), got {self.band!r}, {self.paper_fraction!r}"
            )


@dataclass(frozen=True)
class MatchedBand:
    """Where one super weight's matched weights are drawn: ``pool`` weights of block ``block``'s down
    projection with |w| within ``band`` of ``magnitude`` (= |W[row, col]|), ``widened`` when ``band`` is
    more than the one asked for."""

    block: int
    row: int
    col: int
    magnitude: float
    band: float
    pool: int
    widened: bool


def block_linears(model: nn.Module) -> list[tuple[int, str, str, nn.Module]]:
    """``(block, full name, name within the block, module)`` of every linear inside every block, in order."""
    out = []
    for b, path, block in blocks(model, architecture_of(model)):
        out += [(b, f"{path}.{name}", name, m) for name, m in block.named_modules() if name and is_linear(m)]
    return out


def _magnitudes(m: nn.Module) -> torch.Tensor:
    return weight_of(m).detach().abs().float().cpu()


def matched_bands(
    model: nn.Module, weights: Sequence[SuperWeight], settings: ControlSettings
) -> tuple[list[MatchedBand], list[torch.Tensor]]:
    """Per super weight its band and its pool (flat indices into its down projection, ascending): the weights
    whose |w| is within ``band`` x the super weight's, the band widened where it holds fewer than ``seeds``.

    Raises:
        InvalidArgumentError: a down projection with fewer eligible weights than super weights in it.
    """
    downs = dict(down_projections(model))
    dims = sorted({w.row for w in weights})
    bands, pools = [], []
    for w in weights:
        mag = _magnitudes(downs[w.block])
        eligible = torch.ones_like(mag, dtype=torch.bool)
        eligible[dims, :] = False
        eligible[:, sorted({v.col for v in weights if v.block == w.block})] = False
        here = sum(v.block == w.block for v in weights)
        m = abs(float(mag[w.row, w.col]))
        dist = ((mag - m).abs() / m).masked_fill(~eligible, torch.inf).flatten()  # |w| off by this share of m
        band, left = settings.band, int(eligible.sum())
        if left < here:
            raise InvalidArgumentError(f"block {w.block}'s down projection has too few weights to match")
        if int((dist <= band).sum()) < max(settings.seeds, here):  # the narrowest band that holds enough
            band = float(torch.kthvalue(dist, min(max(settings.seeds, here), left)).values)
        pool = torch.nonzero(dist <= band).view(-1)
        bands.append(MatchedBand(w.block, w.row, w.col, m, band, len(pool), band > settings.band))
        pools.append(pool)
    return bands, pools


def matched_draw(
    model: nn.Module, weights: Sequence[SuperWeight], pools: Sequence[torch.Tensor], seed: int
) -> list[Coord]:
    """One seed's matched weights: per super weight, in order, one of its pool not drawn yet in this seed."""
    g = torch.Generator().manual_seed(seed)
    downs = dict(down_projections(model))
    drawn: list[Coord] = []
    for w, pool in zip(weights, pools, strict=True):
        cols = weight_of(downs[w.block]).shape[1]
        taken = torch.tensor([r * cols + c for b, r, c in drawn if b == w.block], dtype=pool.dtype)
        left = pool[~torch.isin(pool, taken)] if len(taken) else pool
        flat = int(left[int(torch.randint(len(left), (1,), generator=g))])
        drawn.append((w.block, *divmod(flat, cols)))
    return drawn


def _top(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest of ``mag`` (1-D), ties to the earlier index, largest first."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    kth = torch.topk(mag, min(k, len(mag))).values[-1]
    idx = torch.nonzero(mag >= kth).view(-1)
    return idx[torch.sort(mag[idx], descending=True, stable=True).indices[:k]]


def _coords_excluded(model: nn.Module, weights: Sequence[SuperWeight]) -> set[Place]:
    return set(down_places(model, [w.coord for w in weights]))


def paper_places(model: nn.Module, weights: Sequence[SuperWeight], fraction: float) -> list[Place]:
    """The paper's control: per linear of every block, its ``max(1, int(fraction * numel))`` largest |w|, the
    super weights left out."""
    skip = _coords_excluded(model, weights)
    out: list[Place] = []
    for _, name, _, m in block_linears(model):
        mag = _magnitudes(m)
        for n, r, c in skip:
            if n == name:
                mag[r, c] = -1.0
        k = max(1, int(fraction * mag.numel()))
        out += [(name, *divmod(int(i), mag.shape[1])) for i in _top(mag.flatten(), k)]
    return out


def massive_places(model: nn.Module, weights: Sequence[SuperWeight]) -> dict[str, tuple[set[int], set[int]]]:
    """Per linear (full name) the rows and columns that carry the massive dims (``weights``' rows): rows in the
    linears that write the residual stream, columns in those that read it (registry roles; a linear of no role
    by its sizes against the hidden size), and each super weight's input channel (its column of the down
    projection, its row of up/gate). Empty without super weights."""
    if not weights:
        return {}
    arch = architecture_of(model)
    dims = {w.row for w in weights}
    writes = {arch.attn_out, arch.down} - {None}
    reads = {*(arch.attn_in.linears if arch.attn_in else ()), *(arch.ffn_in.linears if arch.ffn_in else ())}
    hidden = out_features(down_projections(model)[0][1])
    out: dict[str, tuple[set[int], set[int]]] = {}
    for b, name, local, m in block_linears(model):
        by_size = local not in writes | reads
        rows = set(dims) if local in writes or (by_size and out_features(m) == hidden) else set()
        cols = set(dims) if local in reads or (by_size and in_features(m) == hidden) else set()
        channels = {w.col for w in weights if w.block == b}
        if local == arch.down:
            cols |= channels
        elif arch.ffn_in and local in arch.ffn_in.linears:
            rows |= channels
        out[name] = (rows, cols)
    return out


def outside_massive_places(model: nn.Module, weights: Sequence[SuperWeight], k: int) -> list[Place]:
    """The ``k`` largest |w| over every linear of every block outside ``massive_places`` and the super weights.

    One linear is read at a time: each gives its ``k`` largest eligible (ties included), the ``k`` largest of
    those are the ``k`` largest overall.
    """
    excluded, skip = massive_places(model, weights), _coords_excluded(model, weights)
    values, where = [], []
    for _, name, _, m in block_linears(model):
        mag = _magnitudes(m)
        rows, cols = excluded.get(name, (set(), set()))
        mag[sorted(rows), :] = -1.0
        mag[:, sorted(cols)] = -1.0
        for n, r, c in skip:
            if n == name:
                mag[r, c] = -1.0
        flat = mag.flatten()
        idx = _top(flat, k)
        idx = idx[flat[idx] >= 0]
        values.append(flat[idx])
        where += [(name, *divmod(int(i), mag.shape[1])) for i in idx]
    if not values:
        return []
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices[:k]
    return [where[int(i)] for i in order]


def touching(massive: dict[str, tuple[set[int], set[int]]], places: Iterable[Place]) -> int:
    """How many of ``places`` sit in a massive row or column (``massive_places``)."""
    n = 0
    for name, r, c in places:
        rows, cols = massive.get(name, (set(), set()))
        n += r in rows or c in cols
    return n


def largest_down_coords(model: nn.Module, exclude: list[Coord], k: int) -> list[Coord]:
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
    values, where = [], []  # each matrix's candidates' |w| and (block, row, col), largest first
    for b, m in downs:
        mag = _magnitudes(m)
        for eb, r, c in exclude:
            if eb == b:
                mag[r, c] = -1.0
        flat = mag.flatten()
        idx = _top(flat, k)  # this matrix's k largest, in the order of the rule
        values.append(flat[idx])
        where += [(b, *divmod(int(i), mag.shape[1])) for i in idx]
        del mag
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices[:k]  # ties keep (block, row, col)
    return [where[int(i)] for i in order]
