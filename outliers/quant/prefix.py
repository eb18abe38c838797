"""Outlier tokens: the few positions that carry massive activations, and PrefixQuant's prefix chosen from them.

Two criteria, evaluated per block on each window of a batch:

``sun``          Sun et al. 2024, "Massive activations in large language models" (arXiv 2402.17762): a token
                 whose block output (the residual stream) holds a value with ``|x| > 100`` and
                 ``> 1000 x`` the median ``|x|`` of that hidden state (the block's output for the window:
                 all its positions and dims).
``prefixquant``  Chen et al. 2024, "PrefixQuant" (arXiv 2410.05265): a token whose largest ``|x|`` at the
                 down projection's input is ``> 64 x`` the median over the window's tokens of that
                 per-token maximum.

``outlier_flags`` runs one batch with hooks and returns the flags per (window, position, block);
``TokenCounts`` keeps, over any number of batches, what a listing needs and nothing that grows with the
text: per position in the window, how many windows flagged it; per token id, how often it occurs;
per flagged token id, its counts, positions and blocks. ``choose_prefix`` picks PrefixQuant's prefix:
the first token, then the most frequent outlier tokens after the first position.
``outliers.analysis.tokens`` lists them (``outliers tokens``); ``outliers.eval.static_rows`` prepends them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outliers.arch.hooks import pre_hooks
from outliers.arch.lmhead import run_for_hooks
from outliers.arch.registry import architecture_of, blocks
from outliers.errors import InvalidArgumentError
from outliers.models.dispatch import input_device

__all__ = [
    "CRITERIA",
    "SUN_ABS",
    "SUN_RATIO",
    "PREFIXQUANT_RATIO",
    "Flags",
    "outlier_flags",
    "TokenCounts",
    "choose_prefix",
    "compact_blocks",
]

SUN_ABS, SUN_RATIO = 100.0, 1000.0  # Sun et al.: |x| > 100 and > 1000x the hidden state's median |x|
PREFIXQUANT_RATIO = 64.0  # PrefixQuant: the token's max |x| at down_in > 64x the median over tokens
CRITERIA = {
    "sun": f"residual stream: |x| > {SUN_ABS:g} and > {SUN_RATIO:g}x the median |x| of the block's output "
    "for the window (Sun et al. 2024)",
    "prefixquant": f"down-projection input: the token's max |x| > {PREFIXQUANT_RATIO:g}x the median over the "
    "window's tokens of that max, per block (PrefixQuant, Chen et al. 2024)",
}


@dataclass
class Flags:
    """One batch's flags: ``sun`` and ``prefixquant`` are ``(windows, positions, blocks)`` booleans;
    ``max_abs`` and ``dim`` the largest residual ``|x|`` of each position over blocks and its dim."""

    sun: torch.Tensor
    prefixquant: torch.Tensor
    max_abs: torch.Tensor
    dim: torch.Tensor

    def any(self) -> torch.Tensor:
        """``(windows, positions)``: flagged by either criterion in any block."""
        return self.sun.any(-1) | self.prefixquant.any(-1)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def outlier_flags(model: nn.Module, x: torch.Tensor) -> Flags:
    """Run ``x`` (``(windows, positions)`` token ids) and flag each position under both criteria, per block.

    Raises:
        InvalidArgumentError: a family the registry places no blocks or down projection for.
    """
    arch = architecture_of(model)
    if arch.down is None:
        raise InvalidArgumentError(f"architecture {arch.name!r} does not say where its MLP's down projection is")
    found = blocks(model, arch)
    b, s = x.shape
    n = len(found)
    sun = torch.zeros(b, s, n, dtype=torch.bool)
    pq = torch.zeros(b, s, n, dtype=torch.bool)
    max_abs = torch.zeros(b, s)
    dim = torch.zeros(b, s, dtype=torch.long)
    index = {path: j for j, (_, path, _) in enumerate(found)}
    downs = {f"{path}.{arch.down}": j for j, (_, path, _) in enumerate(found)}

    def residual(j: int, out: Any) -> None:
        a = _first(out).detach().float().abs().reshape(b, s, -1)
        top, arg = (t.cpu() for t in a.max(-1))  # (b, s): the token's largest value, and its dim
        med = a.reshape(b, -1).median(dim=1).values.cpu()  # the window's hidden state: all positions and dims
        sun[:, :, j] = (top > SUN_ABS) & (top > SUN_RATIO * med[:, None])
        bigger = top > max_abs
        max_abs.copy_(torch.where(bigger, top, max_abs))
        dim.copy_(torch.where(bigger, arg, dim))

    def down_in(name: str, module: nn.Module, args: tuple) -> None:
        t = args[0].detach().abs().reshape(b, s, -1).amax(-1).float().cpu()  # (b, s): per-token max
        med = t.median(dim=1).values
        pq[:, :, downs[name]] = t > PREFIXQUANT_RATIO * med[:, None]

    handles = [m.register_forward_hook(lambda mod, a, out, j=index[p]: residual(j, out)) for _, p, m in found]
    try:
        with pre_hooks(model, list(downs), down_in):
            run_for_hooks(model, x.to(input_device(model)))
    finally:
        for h in handles:
            h.remove()
    return Flags(sun, pq, max_abs, dim)


@dataclass
class _Token:
    """One flagged token id: its outlier occurrences, where they were, which blocks fired."""

    count: int = 0  # occurrences flagged by either criterion
    sun: int = 0
    prefixquant: int = 0
    at_start: int = 0  # of them at position 0
    later: Counter = field(default_factory=Counter)  # per criterion ("any" too): flagged after position 0
    positions: Counter = field(default_factory=Counter)
    blocks_sun: torch.Tensor | None = None  # (blocks,) occurrences firing there
    blocks_prefixquant: torch.Tensor | None = None
    max_abs: float = 0.0
    dims: Counter = field(default_factory=Counter)


class TokenCounts:
    """What a listing of outlier tokens needs, added batch by batch in memory that does not grow with the text.

    Per position in the window: windows flagged there (``by_position``, per criterion). Per token id: its
    occurrences in everything added (``occurrences``). Per flagged token id: a ``_Token``. Per criterion
    (``any`` too): flagged positions in all (``flagged_positions``).
    """

    def __init__(self) -> None:
        self.windows = 0
        self.tokens = 0
        self.blocks = 0
        self.occurrences = torch.zeros(0, dtype=torch.long)
        self.by_position: dict[str, torch.Tensor] = {}
        self.flagged_positions: Counter = Counter()
        self.flagged: dict[int, _Token] = {}

    def add(self, x: torch.Tensor, flags: Flags) -> None:
        """Count one batch: its token ids ``(windows, positions)`` and their flags."""
        x = x.cpu()
        b, s = x.shape
        self.windows += b
        self.tokens += x.numel()
        self.blocks = flags.sun.shape[-1]
        seen = torch.bincount(x.reshape(-1))
        if len(seen) > len(self.occurrences):
            self.occurrences = torch.cat(
                [self.occurrences, self.occurrences.new_zeros(len(seen) - len(self.occurrences))]
            )
        self.occurrences[: len(seen)] += seen
        sun, pq, hit = flags.sun.any(-1), flags.prefixquant.any(-1), flags.any()
        for name, f in (("sun", sun), ("prefixquant", pq)):
            counts = f.sum(0)
            old = self.by_position.get(name)
            if old is None or len(old) < s:
                grown = torch.zeros(s, dtype=torch.long)
                if old is not None:
                    grown[: len(old)] = old
                old = grown
            old[:s] += counts
            self.by_position[name] = old
        for name, f in (("sun", sun), ("prefixquant", pq), ("any", hit)):
            self.flagged_positions[name] += int(f.sum())
        for w, p in torch.nonzero(hit).tolist():
            tok = self.flagged.setdefault(int(x[w, p]), _Token())
            tok.count += 1
            tok.sun += int(sun[w, p])
            tok.prefixquant += int(pq[w, p])
            tok.at_start += p == 0
            if p > 0:
                tok.later.update({"any": 1, "sun": int(sun[w, p]), "prefixquant": int(pq[w, p])})
            tok.positions[p] += 1
            for name in ("sun", "prefixquant"):
                fired = getattr(flags, name)[w, p].long()
                have = getattr(tok, f"blocks_{name}")
                setattr(tok, f"blocks_{name}", fired if have is None else have + fired)
            if sun[w, p]:
                tok.max_abs = max(tok.max_abs, float(flags.max_abs[w, p]))
                tok.dims[int(flags.dim[w, p])] += 1

    def records(self) -> list[dict[str, Any]]:
        """One record per flagged token id, most outlier occurrences first."""
        out = []
        for tid, t in self.flagged.items():
            occurs = int(self.occurrences[tid]) if tid < len(self.occurrences) else 0
            fired = {
                name: [] if b is None else torch.nonzero(b).view(-1).tolist()
                for name, b in (("sun", t.blocks_sun), ("prefixquant", t.blocks_prefixquant))
            }
            out.append(
                {
                    "token_id": tid,
                    "count": t.count,
                    "count_sun": t.sun,
                    "count_prefixquant": t.prefixquant,
                    "occurrences": occurs,
                    "share": t.count / occurs if occurs else 0.0,
                    "at_start": t.at_start,
                    "position": t.positions.most_common(1)[0][0],
                    "positions": sorted(t.positions),
                    "blocks_sun": fired["sun"],
                    "blocks_prefixquant": fired["prefixquant"],
                    "max_abs": t.max_abs if t.sun else None,
                    "dim": t.dims.most_common(1)[0][0] if t.dims else None,
                }
            )
        return sorted(out, key=lambda r: (-r["count"], -r["share"], r["token_id"]))


def choose_prefix(
    counts: TokenCounts, first_token: int, *, max_tokens: int = 4, criterion: str = "prefixquant"
) -> list[int]:
    """PrefixQuant's prefix: ``first_token``, then the most frequent outlier tokens seen after position 0.

    As many tokens as windows hold outlier positions, on average (rounded; the first position
    counts, the first token stands for it), at least one and at most ``max_tokens``. Outlier tokens
    are those ``criterion`` (``sun``, ``prefixquant`` or ``any``) flags; ties go to the larger share of
    the token's occurrences.

    Raises:
        InvalidArgumentError: an unknown criterion or ``max_tokens < 1``.
    """
    if criterion not in (*CRITERIA, "any"):
        raise InvalidArgumentError(f"criterion must be one of {', '.join((*CRITERIA, 'any'))}, got {criterion!r}")
    if max_tokens < 1:
        raise InvalidArgumentError(f"a prefix holds at least one token, got max_tokens={max_tokens}")
    n = max(1, min(max_tokens, round(counts.flagged_positions[criterion] / max(counts.windows, 1))))
    ranked = []
    for tid, t in counts.flagged.items():
        later = t.later[criterion]
        if later and tid != first_token:
            occurs = int(counts.occurrences[tid]) if tid < len(counts.occurrences) else 1
            ranked.append((-later, -later / max(occurs, 1), tid))
    return [first_token, *(tid for *_, tid in sorted(ranked)[: n - 1])]


def compact_blocks(blocks_: Iterable[int]) -> str:
    """``[11, 12, 13, 20]`` as ``"11-13, 20"``; ``""`` for none."""
    out: list[str] = []
    run: list[int] = []
    for b in sorted(blocks_):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)
