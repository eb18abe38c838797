"""What the lifecycle trace sees of a model: the unedited model's massive tokens (``detect``) and, per edit, one
pass's per-window reductions (``Recorder``, filled by hooks; ``Pass``, with the pass's NLL and KL sums).

``outliers.analysis.lifecycle`` runs the passes and ``outliers.analysis.lifecycle_stats`` turns these arrays into
the fields and their intervals. Everything here is kept per window, so memory grows with the windows only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.kvcache_capture import kv_hooks, kv_layout
from outliers.analysis.lifecycle_edits import Edit
from outliers.analysis.superweights import down_projections
from outliers.arch.registry import architecture_of, blocks
from outliers.errors import InvalidArgumentError
from outliers.quant.prefix import outlier_flags

__all__ = ["Massive", "Detection", "detect", "Recorder", "Pass", "counted_heads"]


@dataclass(frozen=True)
class Massive:
    """A massive dim: born at ``birth_block``, at most ``peak`` in ``|h|`` (at ``peak_block``), on ``tokens``."""

    dim: int
    birth_block: int
    last_block: int
    peak: float
    peak_block: int
    flagged: int  # (window, position, block) flags with this dim, token-specific blocks


@dataclass
class Detection:
    """What the unedited model's forward over the windows shows: massive dims, their tokens, per-block counts."""

    massive: list[Massive]
    positions: torch.Tensor  # (windows, seq) bool: the massive tokens
    flagged_share: list[float]  # per block: share of positions Sun's criterion flags
    specific: list[bool]  # per block: token-specific
    widespread: list[dict[str, Any]]  # dims large on most tokens in the other blocks
    prefixquant_blocks: list[int]  # blocks where PrefixQuant's criterion (down_in) flags a position
    seconds: float = 0.0


@torch.no_grad()
def detect(
    model: nn.Module, windows: torch.Tensor, batch_size: int, max_token_share: float, progress: bool
) -> Detection:
    """Flag massive tokens on the unedited model: ``outlier_flags`` per batch with per-block argmax hooks beside."""
    start = time.perf_counter()
    found = blocks(model, architecture_of(model))
    n, s, nb = windows.shape[0], windows.shape[1], len(found)
    sun = torch.zeros(n, s, nb, dtype=torch.bool)
    pq = torch.zeros(nb, dtype=torch.long)
    dims = torch.zeros(n, s, nb, dtype=torch.int32)
    top = torch.zeros(n, s, nb)
    rows = slice(0, 0)

    def on_block(j: int, out: Any) -> None:
        h = (out[0] if isinstance(out, tuple) else out).detach().float().abs()
        value, arg = h.max(-1)
        top[rows, :, j], dims[rows, :, j] = value.cpu(), arg.to(torch.int32).cpu()

    handles = [m.register_forward_hook(lambda mod, a, o, j=j: on_block(j, o)) for j, (_, _, m) in enumerate(found)]
    try:
        for b in tqdm(range(0, n, batch_size), desc="trace: detect", disable=not progress, leave=False):
            rows = slice(b, min(b + batch_size, n))
            flags = outlier_flags(model, windows[rows])
            sun[rows] = flags.sun
            pq += flags.prefixquant.sum((0, 1))
    finally:
        for h in handles:
            h.remove()
    share = sun.float().mean((0, 1))
    specific = [bool(0 < x <= max_token_share) for x in share.tolist()]
    per_dim: dict[int, list[tuple[int, int, int]]] = {}  # dim -> (window, position, block) flags
    for w, p, b in sun.nonzero().tolist():
        if specific[b]:
            per_dim.setdefault(int(dims[w, p, b]), []).append((w, p, b))
    massive, positions = [], torch.zeros(n, s, dtype=torch.bool)
    for d, where in sorted(per_dim.items(), key=lambda kv: -len(kv[1])):
        birth = min(b for _, _, b in where)
        peak_at = max(where, key=lambda t: float(top[t]))
        massive.append(Massive(d, birth, max(b for _, _, b in where), float(top[peak_at]), peak_at[2], len(where)))
        for w, p, _ in where:
            positions[w, p] = True
    widespread = []
    for b in range(nb):
        if share[b] > 0 and not specific[b]:
            counts = Counter(int(x) for x in dims[:, :, b][sun[:, :, b]].tolist())
            d, c = counts.most_common(1)[0]
            widespread.append(
                {"block": b, "dim": d, "share": float(share[b]), "dim_share": c / int(sun[:, :, b].sum())}
            )
    return Detection(
        massive=massive,
        positions=positions,
        flagged_share=[float(x) for x in share],
        specific=specific,
        widespread=widespread,
        prefixquant_blocks=[b for b in range(nb) if pq[b] > 0],
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------------- one pass


class Recorder:
    """Per-window reductions of one edit's pass, filled by hooks on the float model (``hooks``).

    ``windows`` are the pass' windows in order; a pre-hook on the input embeddings tells the other hooks which
    windows each forward holds. Every array is ``(windows, ...)``, so memory grows with the windows only.
    """

    def __init__(self, model: nn.Module, det: Detection, n: int, down_blocks: Sequence[int]):
        self.model, self.det, self.n = model, det, n
        self.arch = architecture_of(model)
        self.found = blocks(model, self.arch)
        nb = len(self.found)
        self.dims = [m.dim for m in det.massive]
        self.resid_peak = np.zeros((n, nb, max(len(self.dims), 1)), dtype=np.float32)
        self.resid_on_tokens = np.zeros((n, nb, max(len(self.dims), 1)), dtype=np.float32)
        self.resid_max = np.zeros((n, nb), dtype=np.float32)
        self.attn_first: dict[int, np.ndarray] = {}
        self.attn_massive: dict[int, np.ndarray] = {}
        self.keys: dict[str, dict[int, np.ndarray]] = {"all": {}, "massive": {}, "other": {}}
        self.down_blocks = list(down_blocks)
        self.down: dict[str, dict[int, np.ndarray]] = {"massive": {}, "other": {}}
        self.next = 0
        self.rows = slice(0, 0)
        try:  # a family whose keys the registry does not locate is traced without the key link
            kv_layout(model)
            self.has_keys = True
        except InvalidArgumentError:
            self.has_keys = False

    def _mask(self, device: torch.device) -> torch.Tensor:
        return self.det.positions[self.rows].to(device)

    def _put(self, table: dict[int, np.ndarray], key: int, value: torch.Tensor) -> None:
        if key not in table:
            table[key] = np.zeros((self.n, *value.shape[1:]), dtype=np.float32)
        table[key][self.rows] = value.detach().float().cpu().numpy()

    def on_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.rows = slice(self.next, self.next + ids.shape[0])
        self.next += ids.shape[0]
        if self.next > self.n or ids.shape[1] != self.det.positions.shape[1]:
            raise RuntimeError(f"the float model ran more windows or other lengths than the trace's {self.n}")

    def on_block(self, j: int, out: Any) -> None:
        h = (out[0] if isinstance(out, tuple) else out).detach().float().abs()
        self.resid_max[self.rows, j] = h.amax((1, 2)).cpu().numpy()
        if self.dims:
            x = h[..., self.dims]  # (batch, seq, massive dims)
            self.resid_peak[self.rows, j] = x.amax(1).cpu().numpy()
            self.resid_on_tokens[self.rows, j] = (x * self._mask(x.device)[..., None]).amax(1).cpu().numpy()

    def on_attention(self, layer: int, out: Any) -> None:
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise InvalidArgumentError(
                "the attention returned no probabilities; load the model with attn_implementation='eager'"
            )
        w = w.detach().float()  # (batch, heads, queries, keys)
        mask = self._mask(w.device).float()  # (batch, keys)
        self._put(self.attn_first, layer, w[..., 0].mean(-1))
        self._put(self.attn_massive, layer, (w * mask[:, None, None, :]).sum(-1).mean(-1))

    def on_keys(self, kind: str, layer: int, x: torch.Tensor) -> None:
        if kind != "keys":
            return
        a = x.detach().float().abs()  # (batch, seq, channels)
        m = self._mask(a.device)[..., None].float()
        self._put(self.keys["all"], layer, a.amax(1))
        self._put(self.keys["massive"], layer, (a * m).amax(1))
        self._put(self.keys["other"], layer, (a * (1 - m)).amax(1))

    def on_down(self, b: int, args: tuple) -> None:
        a = args[0].detach().float().abs()  # (batch, seq, intermediate)
        m = self._mask(a.device)[..., None].float()
        self._put(self.down["massive"], b, (a * m).amax(1))
        self._put(self.down["other"], b, (a * (1 - m)).amax(1))

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [
            self.model.get_input_embeddings().register_forward_pre_hook(self.on_ids, with_kwargs=True)  # type: ignore[operator]
        ]
        downs = dict(down_projections(self.model)) if self.down_blocks else {}
        try:
            for j, (layer, _, block) in enumerate(self.found):
                handles.append(block.register_forward_hook(lambda m, a, o, j=j: self.on_block(j, o)))
                if self.arch.attention is not None:
                    attn = block.get_submodule(self.arch.attention)
                    handles.append(attn.register_forward_hook(lambda m, a, o, i=layer: self.on_attention(i, o)))
            for b in self.down_blocks:
                handles.append(downs[b].register_forward_pre_hook(lambda m, a, b=b: self.on_down(b, a)))
            with kv_hooks(self.model, self.on_keys) if self.has_keys else nullcontext():
                yield
        finally:
            for h in handles:
                h.remove()


@dataclass
class Pass:
    """One edit's per-window arrays and the results of its rows."""

    edit: Edit
    rec: Recorder | None = None
    nll: np.ndarray | None = None  # (windows,) the float model's NLL sums
    tokens: np.ndarray | None = None
    kl: dict[str, np.ndarray] = field(default_factory=dict)  # row -> (windows,) KL sums
    token_kl: dict[str, np.ndarray] = field(default_factory=dict)  # row -> (windows, seq - 1)
    float_columns_pct: dict[str, float | None] = field(default_factory=dict)
    clamped_tokens: int = 0
    seconds: float = 0.0


def counted_heads(rec: Recorder | None, local: set[int]) -> np.ndarray:
    """``(layers * heads,)``: the heads the sink rate counts, in the recorder's (layer, head) order."""
    if rec is None:
        return np.zeros(0, dtype=bool)
    return np.array([i not in local for i in sorted(rec.attn_first) for _ in range(rec.attn_first[i].shape[1])])
