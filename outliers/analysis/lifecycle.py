"""The outlier lifecycle of one model, traced by causal edits: super weight → massive activation → attention
sinks → key channels → quantization error.

The literature since 2024 describes one chain ("Systematic outliers", ICLR 2025, calls it a lifecycle): a few
super weights in an early down projection multiply a large input into a massive activation of one residual
dim on one or a few tokens (Yu et al. 2024, arXiv 2411.07191; Sun et al. 2024, arXiv 2402.17762); that
activation makes later heads attend to those tokens, the attention sinks (Xiao et al. 2023; Gu et al. 2024,
arXiv 2410.10781), and shapes the key channels (KIVI; KVQuant); quantization fails where these values sit.
``trace`` measures each link on the chosen text and then edits the cause and measures the effects.

**Detection** (before any edit, on the unedited model):

- super weights by the spike rule of ``outliers.analysis.superweights`` (``detect_windows`` windows);
- massive activations: one forward over the trace windows flags each (window, position, block) by Sun et al.'s
  criterion (``outliers.quant.prefix.outlier_flags``, the one ``outliers tokens`` lists), and hooks beside it
  keep each flagged position's argmax dim per block. A block is *token-specific* when it flags at most
  ``max_token_share`` of the positions; in the others a dim is large on most tokens (a massive *dimension*,
  listed apart as ``widespread``). A massive dim is the argmax dim of flagged positions in token-specific
  blocks; its *birth block* the first such block; its *tokens* the positions flagged with it from there on.

**One pass per edit** (``outliers.analysis.lifecycle_edits``: ``none``, ``zero_super_weights``,
``restore_super_activation``, ``clamp_massive``, ``clamp_control``) over the same windows, the float model in
eager attention, every quantity measured at once by hooks that reduce what they see per window as it passes:

- ``massive_activation``: per window and block the largest ``|h|`` in the massive dim(s) on the massive tokens
  (the unedited model's), averaged over the blocks where the unedited model carries it (birth to last flagged
  block) and over windows (``massive_at_birth``: at the birth block's output alone, where the clamp acts;
  ``massive_dim_max``: the largest in the massive dim on any token and block of that span; ``max_activation``:
  the same in any dim; ``massive_by_block``, ``massive_dim_max_by_block``: per block, without an interval);
- ``sink_rate``, ``first_token_attention``: per head the mean over queries of the attention weight on the
  window's first token, averaged over windows (``outliers.analysis.sinks``' score); the share of heads above
  ``epsilon`` and the mean over heads (sliding-window layers that cannot see the first token left out);
  ``massive_token_attention``: the same for the attention mass on the massive tokens;
- ``key_concentration``: per layer the top key channel's max ``|k|`` over the median channel's, the projected
  keys (pre-RoPE) as ``outliers kvcache`` measures them, median over layers;
- ``ppl``: the edited float model's perplexity (chunks of ``window``, ``outliers.eval.perplexity``);
- ``kl_vs_ref_<row>``: each quantized row (``llm.int8`` by default) made from the *edited* float model and
  scored against it as the reference on the same windows (``outliers.eval.rows``): how much error the
  quantization adds to the model as edited, so that an edit that removes the outliers the row struggles with
  lowers it. A weight edit is in the quantized copy (it is made inside the edit); hooks go on both models.

Every change against ``none`` comes with a paired 95 % percentile interval, windows resampled with replacement
(the same resamples for every edit and field; 2000, seeded): ``<field>_delta``, ``<field>_delta_ci95``. Maxima
(the key concentration) are taken over the resampled windows. Few windows give rough intervals.

The chain also reports the share of each row's KL that falls on the massive tokens (the KL of the prediction
made at that position), against their share of the tokens, with intervals.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.kvcache_capture import kv_hooks, kv_layout
from outliers.analysis.lifecycle_edits import EDITS, RESTORE_FRACTION, Edit, plan_edits, recording
from outliers.analysis.scan import cut_windows
from outliers.analysis.sinks import eager_attention, local_layers
from outliers.analysis.superweight_controls import ControlSettings
from outliers.analysis.superweights import SuperWeightResult, down_projections, super_weights
from outliers.arch.registry import architecture_of, blocks
from outliers.display import fmt_interval, named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.eval.intervals import (
    CONFIDENCE,
    N_RESAMPLES,
    SEED,
    delta_ppl_pct_interval,
    few_windows_note,
    rate_interval,
)
from outliers.eval.perplexity import perplexity
from outliers.eval.rows import Row, RowEvaluator
from outliers.eval.windows import PerplexitySettings
from outliers.quant.methods import get_method
from outliers.quant.prefix import outlier_flags

__all__ = ["TraceSettings", "TraceResult", "trace", "FIELDS", "row_field"]

# the per-edit fields with a change against `none`; kl_vs_ref_<row> are added per quantized row
FIELDS = (
    "massive_activation",
    "massive_at_birth",
    "massive_dim_max",
    "max_activation",
    "sink_rate",
    "first_token_attention",
    "massive_token_attention",
    "key_concentration",
    "ppl",
)


def row_field(method: str) -> str:
    """The JSON field of a quantized row's KL: ``kl_vs_ref_llm_int8`` for ``llm.int8``."""
    return "kl_vs_ref_" + "".join(c if c.isalnum() else "_" for c in method)


@dataclass(frozen=True)
class TraceSettings:
    """How ``trace`` runs. ``window``, ``max_windows``: the windows every pass reads (chunks from the text's
    start); ``detect_windows``: the first ones super-weight detection reads; ``rows``: the quantized rows whose
    KL is measured (method names, ``outliers.quant.methods``); ``max_token_share``: a block is token-specific
    when it flags at most this share of positions; ``seed``: the control dims."""

    window: int = 256
    max_windows: int = 8
    detect_windows: int = 2
    batch_size: int = 4
    epsilon: float = 0.3
    k: float = 4.0
    rows: tuple[str, ...] = ("llm.int8",)
    edits: tuple[str, ...] = EDITS
    restore_fraction: float = RESTORE_FRACTION
    seed: int = 0
    jump: float = 50.0
    max_found: int = 4
    max_token_share: float = 0.05

    def check(self) -> None:
        """Raises InvalidArgumentError for a bad value, before any model runs."""
        if self.window < 3 or min(self.max_windows, self.detect_windows, self.batch_size, self.max_found) < 1:
            raise InvalidArgumentError(
                "window must be >= 3 and max_windows, detect_windows, batch_size, max_found >= 1; got "
                f"{self.window}, {self.max_windows}, {self.detect_windows}, {self.batch_size}, {self.max_found}"
            )
        if not 0 < self.epsilon < 1 or not self.k > 1 or not self.jump > 1:
            raise InvalidArgumentError(f"epsilon must be in (0, 1), k and jump > 1; got {self.epsilon}, {self.k}")
        if not 0 < self.restore_fraction <= 1 or not 0 < self.max_token_share < 1:
            raise InvalidArgumentError("restore_fraction must be in (0, 1] and max_token_share in (0, 1)")
        if "none" not in self.edits:
            raise InvalidArgumentError("the edits must include 'none': every change is measured against it")
        for method in self.rows:
            if method == "fp32":
                raise InvalidArgumentError("rows are quantization methods; the float model is scored anyway")
            get_method(method)
        plan_edits([], [], 1, names=self.edits)  # unknown edit names fail here


# ---------------------------------------------------------------------------------------------------- detection


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
def _detect(model: nn.Module, windows: torch.Tensor, settings: TraceSettings, progress: bool) -> Detection:
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
        for b in tqdm(range(0, n, settings.batch_size), desc="trace: detect", disable=not progress, leave=False):
            rows = slice(b, min(b + settings.batch_size, n))
            flags = outlier_flags(model, windows[rows])
            sun[rows] = flags.sun
            pq += flags.prefixquant.sum((0, 1))
    finally:
        for h in handles:
            h.remove()
    share = sun.float().mean((0, 1))
    specific = [bool(0 < x <= settings.max_token_share) for x in share.tolist()]
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


class _Recorder:
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
class _Pass:
    """One edit's per-window arrays and the results of its rows."""

    edit: Edit
    rec: _Recorder | None = None
    nll: np.ndarray | None = None  # (windows,) the float model's NLL sums
    tokens: np.ndarray | None = None
    kl: dict[str, np.ndarray] = field(default_factory=dict)  # row -> (windows,) KL sums
    token_kl: dict[str, np.ndarray] = field(default_factory=dict)  # row -> (windows, seq - 1)
    float_columns_pct: dict[str, float | None] = field(default_factory=dict)
    clamped_tokens: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- statistics


def _resamples(n: int) -> np.ndarray:
    """``(N_RESAMPLES, n)``: how many times each resample draws each window, seeded as ``outliers.eval.intervals``."""
    draws = np.random.default_rng(SEED).integers(0, n, size=(N_RESAMPLES, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)


def _mean(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Weighted mean over windows: ``(R, ...)`` from ``weights (R, n)`` and ``x (n, ...)``."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    return (weights @ flat / weights.sum(1, keepdims=True)).reshape(len(weights), *x.shape[1:])


def _max(weights: np.ndarray, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Max over the drawn windows (x >= 0): ``(R, ...)``."""
    out = []
    for start in range(0, len(weights), chunk):
        drawn = (weights[start : start + chunk] > 0).reshape(-1, len(x), *([1] * (x.ndim - 1)))
        out.append((drawn * x[None]).max(1))
    return np.concatenate(out)


def _stats(
    p: _Pass, weights: np.ndarray, counted: np.ndarray, epsilon: float, span: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Every per-edit field as ``(R,)`` under resample ``weights`` (a row of ones: the point estimate); ``span``:
    the first and last block where the unedited model carries the massive activation."""
    birth, last = span
    out: dict[str, np.ndarray] = {}
    rec = p.rec
    if rec is not None:
        if rec.dims:
            # per block the largest |h| on its tokens, mean over the blocks that carry it: one late block that
            # writes the dim (SmolLM2's and Qwen's cancel it) does not stand for the whole span
            out["massive_activation"] = _mean(weights, rec.resid_on_tokens[:, birth : last + 1].max(2).mean(1))
            out["massive_at_birth"] = _mean(weights, rec.resid_on_tokens[:, birth].max(-1))
            out["massive_dim_max"] = _mean(weights, rec.resid_peak[:, birth : last + 1].max((1, 2)))
        out["max_activation"] = _mean(weights, rec.resid_max[:, birth : last + 1].max(1))
        if rec.attn_first:
            first = np.stack([rec.attn_first[i] for i in sorted(rec.attn_first)], 1)  # (n, layers, heads)
            massive = np.stack([rec.attn_massive[i] for i in sorted(rec.attn_massive)], 1)
            scores = _mean(weights, first).reshape(len(weights), -1)[:, counted]  # (R, counted heads)
            out["sink_rate"] = (scores > epsilon).mean(-1)
            out["first_token_attention"] = scores.mean(-1)
            out["massive_token_attention"] = _mean(weights, massive).reshape(len(weights), -1)[:, counted].mean(-1)
        if rec.keys["all"]:
            keys = np.stack([rec.keys["all"][i] for i in sorted(rec.keys["all"])], 1)  # (n, layers, channels)
            top = _max(weights, keys)  # (R, layers, channels)
            med = np.median(top, -1)
            conc = np.where(med > 0, top.max(-1) / np.where(med > 0, med, 1), np.nan)
            out["key_concentration"] = np.nanmedian(conc, -1)
    if p.nll is not None and p.tokens is not None:
        nll = weights @ p.nll / (weights @ p.tokens)
        out["ppl"] = np.exp(np.minimum(nll, 700))
        for row, kl in p.kl.items():
            out[row_field(row)] = weights @ kl / (weights @ p.tokens)
    return out


def _interval(x: np.ndarray) -> list[float] | None:
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _kl_share(token_kl: np.ndarray, positions: torch.Tensor, weights: np.ndarray) -> dict[str, Any]:
    """The share of a row's KL that falls on the massive tokens, against their share of the scored tokens."""
    mask = positions[:, : token_kl.shape[1]].numpy()
    kl_m, kl_all = (token_kl * mask).sum(1), token_kl.sum(1)
    n_m, n_all = mask.sum(1).astype(np.float64), np.full(len(mask), float(mask.shape[1]))
    if n_m.sum() == 0:
        return {"kl_share": None, "token_share": 0.0, "per_token_ratio": None}
    one = np.ones((1, len(mask)))

    def ratio(w: np.ndarray) -> np.ndarray:
        inside = (w @ kl_m) / np.maximum(w @ n_m, 1e-12)
        outside = (w @ (kl_all - kl_m)) / np.maximum(w @ (n_all - n_m), 1e-12)
        return np.where((w @ n_m) > 0, inside / np.maximum(outside, 1e-30), np.nan)

    return {
        "kl_share": float(kl_m.sum() / kl_all.sum()) if kl_all.sum() > 0 else None,
        "kl_share_ci95": list(rate_interval(kl_m, kl_all)) if len(mask) > 1 else None,
        "token_share": float(n_m.sum() / n_all.sum()),
        "kl_per_token_massive": float(kl_m.sum() / n_m.sum()),
        "kl_per_token_other": float((kl_all - kl_m).sum() / (n_all - n_m).sum()),
        "per_token_ratio": float(ratio(one)[0]),
        "per_token_ratio_ci95": _interval(ratio(weights)) if len(mask) > 1 else None,
    }


# ---------------------------------------------------------------------------------------------------- result


@dataclass
class TraceResult:
    """The chain (``chain``: what the unedited model shows, link by link) and the edits' effects (``edits``: one
    dict per edit with every field, its interval and its change against ``none``)."""

    chain: dict[str, Any]
    edits: list[dict[str, Any]]
    settings: TraceSettings
    n_windows: int
    bos: str  # "corpus" or "window", as the windows were cut
    cost: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> list[str]:
        return [*FIELDS, *(row_field(r) for r in self.settings.rows)]

    def edit(self, name: str) -> dict[str, Any]:
        """One edit's dict by name."""
        for e in self.edits:
            if e["edit"] == name:
                return e
        raise KeyError(name)

    def table(self) -> pd.DataFrame:
        """Edit × field: the value, and the change against ``none`` with its interval, as text."""
        rows = []
        for e in self.edits:
            row: dict[str, Any] = {"edit": e["edit"]}
            for f in self.fields():
                v = e.get(f)
                if v is None:
                    row[f] = "n/a" if not e["applicable"] else "-"
                    continue
                text = _num(v)
                if e["edit"] != "none" and e.get(f"{f}_delta") is not None:
                    text += f" ({_num(e[f'{f}_delta'], sign=True)} {fmt_interval(e[f'{f}_delta_ci95'], '.3g')})"
                row[f] = text
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON, the ``meta`` facts first."""
        return {
            **self.meta,
            "settings": asdict(self.settings),
            "n_windows": self.n_windows,
            "bos": self.bos,
            "chain": self.chain,
            "edits": self.edits,
            "cost": self.cost,
        }

    def _repr_html_(self) -> str:
        return trace_html(self)


def _num(v: float, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = "+" if sign else ""
    return f"{v:{s}.4g}"


# ---------------------------------------------------------------------------------------------------- trace


def _chain(
    sw: SuperWeightResult,
    det: Detection,
    p: _Pass,
    windows: torch.Tensor,
    settings: TraceSettings,
    local: set[int],
    weights: np.ndarray,
    tokenizer: Any,
) -> dict[str, Any]:
    """The unedited model's chain, link by link, from detection and the ``none`` pass."""
    rec = p.rec
    assert rec is not None
    ids = windows[det.positions]
    where = det.positions.nonzero().tolist()
    tokens = Counter(int(t) for t in ids.tolist())
    by_position = Counter(p_ for _, p_ in where)

    def text(t: int) -> str:
        return tokenizer.decode([t]) if tokenizer is not None else ""

    massive = []
    for m in det.massive:
        feeds = [list(w.coord) for w in sw.weights if w.row == m.dim]
        massive.append(asdict(m) | {"super_weights": feeds})
    down_in = []
    for b in rec.down_blocks:
        inside, outside = rec.down["massive"][b].max(0), rec.down["other"][b].max(0)
        c = int(inside.argmax())
        down_in.append(
            {
                "block": b,
                "channel": c,
                "max_abs_massive_tokens": float(inside[c]),
                "max_abs_other_tokens": float(outside[c]),
                "ratio": float(inside[c] / outside[c]) if outside[c] > 0 else math.inf,
                "super_weight_cols": [w.col for w in sw.weights if w.block == b],
            }
        )
    heads = []
    for layer in sorted(rec.attn_first):
        first, mass = rec.attn_first[layer].mean(0), rec.attn_massive[layer].mean(0)
        for h in range(len(first)):
            heads.append(
                {
                    "layer": layer,
                    "head": h,
                    "first_token": float(first[h]),
                    "massive_tokens": float(mass[h]),
                    "local": layer in local,
                }
            )
    frame = pd.DataFrame(heads, columns=["layer", "head", "first_token", "massive_tokens", "local"])
    counted = frame[~frame.local]
    sinks = counted[counted.massive_tokens > settings.epsilon]
    births = [m.birth_block for m in det.massive]
    keys = []
    for layer in sorted(rec.keys["all"]):
        a, ins, out = (rec.keys[k][layer].max(0) for k in ("all", "massive", "other"))
        med, med_other = float(np.median(a)), float(np.median(out))
        top = int(a.argmax())
        keys.append(
            {
                "layer": layer,
                "top_channel": top,
                "concentration": float(a[top] / med) if med > 0 else math.nan,
                "concentration_other_tokens": float(out.max() / med_other) if med_other > 0 else math.nan,
                "n_outliers": int((a >= settings.k * med).sum()) if med > 0 else 0,
                "n_outliers_on_massive_tokens": int((ins >= settings.k * med_other).sum()) if med_other > 0 else 0,
                "n_outliers_on_other_tokens": int((out >= settings.k * med_other).sum()) if med_other > 0 else 0,
                "top_on_massive_tokens": bool(ins[top] >= out[top]) and bool(det.positions.any()),
            }
        )
    kf = pd.DataFrame(keys)
    kl = {row: _kl_share(p.token_kl[row], det.positions, weights) for row in p.token_kl}
    first_birth = min(births) if births else None
    return {
        "super_weights": [asdict(w) for w in sw.weights],
        "super_weight_rule": f"spike: a block's down-projection output max >= {sw.jump:g} x the median over blocks",
        "super_weight_stop": sw.stop,
        "massive": massive,
        "massive_tokens": [{"token_id": t, "token": text(t), "count": c} for t, c in tokens.most_common(10)],
        "massive_positions": {str(k): v for k, v in sorted(by_position.items())[:20]},
        "massive_token_share": float(det.positions.float().mean()),
        "windows_with_massive_tokens": int(det.positions.any(1).sum()),
        "flagged_share_per_block": det.flagged_share,
        "token_specific_blocks": [b for b, s in enumerate(det.specific) if s],
        "widespread": det.widespread,
        "prefixquant_blocks": det.prefixquant_blocks,
        "down_in": down_in,
        "sink_heads": sinks.to_dict(orient="records"),
        "n_sink_heads": len(sinks),
        "n_counted_heads": len(counted),
        "sink_heads_after_birth": int((sinks.layer > first_birth).sum()) if first_birth is not None else 0,
        "sink_layers": sorted({int(x) for x in sinks.layer}),
        "heads": frame.to_dict(orient="records"),
        "key_layers": keys,
        "key_concentration": float(kf.concentration.median()) if len(kf) else None,
        "key_concentration_other_tokens": float(kf.concentration_other_tokens.median()) if len(kf) else None,
        "key_layers_with_outliers": int((kf.n_outliers > 0).sum()) if len(kf) else 0,
        "key_layers_top_on_massive_tokens": int(kf.top_on_massive_tokens.sum()) if len(kf) else 0,
        "kl_share": kl,
    }


def _edit_dicts(
    passes: dict[str, _Pass],
    settings: TraceSettings,
    counted: np.ndarray,
    span: tuple[int, int],
    n: int,
    fields: list[str],
) -> list[dict[str, Any]]:
    one = np.ones((1, n))
    weights = _resamples(n)
    base = passes["none"]
    base_point, base_res = _stats(base, one, counted, settings.epsilon, span), None
    out = []
    for name in settings.edits if settings.edits else EDITS:
        if name not in passes:
            continue
        p = passes[name]
        d: dict[str, Any] = {"edit": name, "applicable": p.edit.applicable, "description": p.edit.describe()}
        if not p.edit.applicable:
            d |= {f: None for f in fields} | {"note": p.edit.note}
            d |= {f"{f}_delta": None for f in fields} | {f"{f}_delta_ci95": None for f in fields}
            out.append(d)
            continue
        point = _stats(p, one, counted, settings.epsilon, span)
        res = _stats(p, weights, counted, settings.epsilon, span) if n > 1 else {}
        if base_res is None and n > 1:
            base_res = _stats(base, weights, counted, settings.epsilon, span)
        for f in fields:
            if f not in point:
                d[f] = d[f"{f}_ci95"] = None
                if name != "none":
                    d[f"{f}_delta"] = d[f"{f}_delta_ci95"] = None
                continue
            d[f] = float(point[f][0])
            d[f"{f}_ci95"] = _interval(res[f]) if res else None
            if name != "none":
                d[f"{f}_delta"] = float(point[f][0] - base_point[f][0])
                d[f"{f}_delta_ci95"] = _interval(res[f] - base_res[f]) if res and base_res else None
        if p.nll is not None and p.tokens is not None and name != "none" and base.nll is not None:
            d["delta_ppl_pct"] = 100.0 * math.expm1((p.nll.sum() - base.nll.sum()) / p.tokens.sum())
            tokens = [int(t) for t in p.tokens]
            ci = delta_ppl_pct_interval(p.nll.tolist(), base.nll.tolist(), tokens) if n > 1 else None
            d["delta_ppl_pct_ci95"] = list(ci) if ci else None
        if p.rec is not None and p.rec.dims:  # where the activation is, block by block (mean over windows)
            d["massive_by_block"] = [float(x) for x in p.rec.resid_on_tokens.max(-1).mean(0)]
            d["massive_dim_max_by_block"] = [float(x) for x in p.rec.resid_peak.max(-1).mean(0)]
        d["float_columns_pct"] = p.float_columns_pct
        d["clamped_tokens"] = p.clamped_tokens
        d["seconds"] = p.seconds
        out.append(d)
    return out


def trace(
    model: nn.Module,
    ids: torch.Tensor,
    settings: TraceSettings | None = None,
    *,
    bos_token_id: int | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> TraceResult:
    """Trace the outlier chain of a causal LM on ``ids`` and measure the edits' effects (module docstring).

    Windows are cut as ``outliers.analysis.scan`` cuts them (``bos_token_id``: each is that BOS and
    ``window - 1`` corpus tokens; super-weight detection reads the first ``detect_windows`` of the same
    windows). The model is unchanged on return, whatever happens. ``tokenizer`` names the massive tokens;
    ``meta`` (model facts) leads the result's ``to_dict``.

    Raises:
        InvalidArgumentError: bad settings, a family without blocks, attention, keys or a down projection in the
            registry, an attention that returns no probabilities.
        CorpusError: fewer tokens than one window.
    """
    settings = settings or TraceSettings()
    settings.check()
    started = time.perf_counter()
    windows, _ = cut_windows(ids, settings.window, bos_token_id=bos_token_id, max_windows=settings.max_windows)
    n = len(windows)
    d = min(settings.detect_windows, n)
    sw = super_weights(
        model,
        windows[:d].reshape(-1),  # the trace's own first windows, cut again as they are
        window=settings.window,
        max_windows=d,
        max_found=settings.max_found,
        jump=settings.jump,
        batch_size=settings.batch_size,
    )
    sw_seconds = time.perf_counter() - started
    det = _detect(model, windows, settings, progress)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        raise InvalidArgumentError("the model's config gives no hidden size")
    births = [(m.birth_block, m.dim) for m in det.massive]
    coords = [w.coord for w in sw.weights]
    edits = plan_edits(coords, births, int(hidden), seed=settings.seed, names=settings.edits)
    down_blocks = sorted({b for b, _ in births} | {c[0] for c in coords})
    n_blocks = len(det.flagged_share)
    span = (
        min((m.birth_block for m in det.massive), default=0),
        max((m.last_block for m in det.massive), default=n_blocks - 1),
    )
    local = local_layers(model, settings.window)
    ppl_settings = PerplexitySettings(
        window=settings.window,
        max_windows=n,
        batch_size=settings.batch_size,
        bos="corpus" if bos_token_id is None else "window",
    )
    store: dict = {}
    passes: dict[str, _Pass] = {}
    # the order shares quantized copies: the unedited weights' first, then the zeroed ones'; `none` records first
    order = sorted(edits, key=lambda e: (e.name != "none", bool(e.coords), EDITS.index(e.name)))
    ev = RowEvaluator(
        model, ids, ppl_settings, bos_token_id=bos_token_id, progress=False, model_name=(meta or {}).get("model")
    )
    held: tuple | None = None  # the weight edit the held quantized copies were made under
    bar = tqdm(total=len(order), desc="trace: edits", unit="edit", disable=not progress)
    try:
        for e in order:
            if not e.applicable:
                passes[e.name] = _Pass(e)
                bar.update()
                continue
            bar.set_postfix_str(e.name)
            begin = time.perf_counter()
            with e.weights(model):
                if held != e.coords:
                    ev.release()  # copies of other weights go before new ones are made
                    held = e.coords
                assert ev.reference_states is not None
                ev.reference_states.clear()  # the float model as edited is the reference: run it again
                p = _run_edit(model, ids, e, ev, det, n, down_blocks, store, coords, settings, progress)
            p.seconds = time.perf_counter() - begin
            passes[e.name] = p
            bar.update()
    finally:
        bar.close()
        ev.release()
    counted = _counted(passes["none"].rec, local)
    fields = [*FIELDS, *(row_field(r) for r in settings.rows)]
    edit_dicts = _edit_dicts(passes, settings, counted, span, n, fields)
    chain = _chain(sw, det, passes["none"], windows, settings, local, _resamples(n), tokenizer)
    chain["note"] = _chain_note(chain, edit_dicts)
    total = time.perf_counter() - started
    forwards = n * (1 + sum(1 + len(settings.rows) for p in passes.values() if p.edit.applicable))
    cost = {
        "seconds": total,
        "super_weight_detection_seconds": sw_seconds,
        "massive_detection_seconds": det.seconds,
        "edit_seconds": {k: p.seconds for k, p in passes.items()},
        "window_forwards": forwards,
        "tokens_per_forward": settings.window,
        "torch_threads": torch.get_num_threads(),
        "note": few_windows_note(n),
    }
    bos = "corpus" if bos_token_id is None else "window"
    return TraceResult(chain, edit_dicts, settings, n, bos, cost, dict(meta or {}))


def _counted(rec: _Recorder | None, local: set[int]) -> np.ndarray:
    """``(layers * heads,)``: the heads the sink rate counts, in the recorder's (layer, head) order."""
    if rec is None:
        return np.zeros(0, dtype=bool)
    return np.array([i not in local for i in sorted(rec.attn_first) for _ in range(rec.attn_first[i].shape[1])])


def _run_edit(
    model: nn.Module,
    ids: torch.Tensor,
    e: Edit,
    ev: RowEvaluator,
    det: Detection,
    n: int,
    down_blocks: list[int],
    store: dict,
    coords: list,
    settings: TraceSettings,
    progress: bool,
) -> _Pass:
    """One pass: the float model as edited, measured by hooks, scored with each quantized row against it.

    Each row's quantized copy is made while the float model carries no hook (a copy would inherit them); the
    float model runs with the first row only, its final states kept for the others (``RowEvaluator``).
    """
    rec = _Recorder(model, det, n, down_blocks)
    p = _Pass(e, rec)
    rows: list[Row | None] = [Row(m) for m in settings.rows] or [None]
    for i, row in enumerate(rows):
        q = ev.prepare(row).model if row is not None else None
        with ExitStack() as stack:
            if q is not None:
                stack.enter_context(e.hooks(q, store, settings.restore_fraction))
            if i == 0:
                stack.enter_context(eager_attention(model))
                counts = stack.enter_context(e.hooks(model, store, settings.restore_fraction))
                if e.name == "none" and coords and "restore_super_activation" in settings.edits:
                    stack.enter_context(recording(model, coords, store))
                stack.enter_context(rec.hooks())
            if row is None:  # no quantized row: the float model alone
                res = perplexity(
                    model, ids, ev.settings, bos_token_id=ev.bos_token_id, progress=progress, model_name=ev.model_name
                )
                p.nll = np.asarray(res.window_nll)
                p.tokens = np.asarray(res.window_tokens, dtype=np.float64)
            else:
                ev.progress = progress
                r = ev.evaluate(row)
                res = r.result
                if i == 0:
                    p.nll = np.asarray(res.window_ref_nll)
                    p.tokens = np.asarray(res.window_tokens, dtype=np.float64)
                p.kl[row.method] = np.asarray(res.window_kl)
                p.token_kl[row.method] = np.asarray(res.token_kl).reshape(n, -1)
                p.float_columns_pct[row.method] = r.float_columns_pct
            if i == 0:
                p.clamped_tokens = counts["tokens"]
                if rec.next != n:
                    raise RuntimeError(f"the float model ran {rec.next} windows, not the trace's {n}")
    return p


MIN_EFFECT_PCT = ControlSettings().min_effect  # the Δppl (%) `outliers superweights` asks of a super weight


def _chain_note(chain: dict[str, Any], edits: list[dict[str, Any]]) -> str:
    """The chain in words: what feeds what, and what the edits show."""
    parts = []
    sws, massive = chain["super_weights"], chain["massive"]
    if sws:
        sw = sws[0]
        where = f"W[{sw['row']}, {sw['col']}] in block {sw['block']}'s down projection"
        zero = next((e for e in edits if e["edit"] == "zero_super_weights" and e.get("applicable")), None)
        effect = zero.get("delta_ppl_pct") if zero else None
        if effect is None:
            parts.append(f"super-weight candidate {where} (spike rule)")
        elif effect >= MIN_EFFECT_PCT:
            parts.append(f"super weight {where} (zeroed: perplexity {effect:+.0f} %)")
        else:  # Yu et al. define a super weight by its effect: the spike alone does not make one
            parts.append(
                f"spike-rule candidate {where}, a spike rather than a super weight by its effect (zeroed: perplexity "
                f"{effect:+.1f} %, under {MIN_EFFECT_PCT:.0f} %; `outliers superweights` tests it against controls)"
            )
    else:
        parts.append("no super weight by the spike rule")
    if massive:
        m = massive[0]
        toks = ", ".join(repr(t["token"]) if t["token"] else str(t["token_id"]) for t in chain["massive_tokens"][:3])
        feeds = "fed by it" if m["super_weights"] else "not fed by a super weight"
        parts.append(
            f"massive activation in dim {m['dim']} born at block {m['birth_block']} (peak {m['peak']:.4g} at block "
            f"{m['peak_block']}), {feeds}, on {100 * chain['massive_token_share']:.2f} % of the tokens ({toks})"
        )
    else:
        parts.append("no token-specific massive activation")
    from outliers.quant.prefix import compact_blocks

    by_dim: dict[int, list[dict[str, Any]]] = {}
    for w in chain["widespread"]:
        by_dim.setdefault(w["dim"], []).append(w)
    for d, ws in list(by_dim.items())[:2]:
        parts.append(
            f"dim {d} is large on up to {100 * max(w['share'] for w in ws):.0f} % of the tokens in blocks "
            f"{compact_blocks([w['block'] for w in ws])} (a massive dimension, not a token's activation)"
        )
    parts.append(f"{chain['n_sink_heads']} of {chain['n_counted_heads']} heads attend mostly to those tokens")
    return "; ".join(parts)


def trace_html(r: TraceResult) -> str:
    """``TraceResult``: the chain in words, the edits' table."""
    c = r.chain
    rows: list[tuple[Any, ...]] = [("chain", c["note"])]
    for row, share in c["kl_share"].items():
        if share.get("kl_share") is not None:
            rows.append(
                (
                    f"{row} KL on massive tokens",
                    f"{100 * share['kl_share']:.1f} % {fmt_interval(share['kl_share_ci95'], '.3f', 100)}",
                    f"of the KL on {100 * share['token_share']:.2f} % of the tokens",
                )
            )
    settings = [
        ("model", r.meta.get("model")),
        ("corpus", r.meta.get("corpus")),
        ("window", r.settings.window),
        ("windows", r.n_windows),
        ("seconds", f"{r.cost['seconds']:.0f}"),
        *provenance(r.meta),
    ]
    tables = [("edits: value (change against none [95 % paired interval])", r.table())]
    return render_html(named("Outlier lifecycle", r.meta.get("model", "")), rows, settings, tables=tables)
