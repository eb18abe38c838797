"""Number-format headroom: how far each capture point's activations sit from the edges of float16, bfloat16
and FP8, and where an emulated float16 run first goes non-finite.

Per capture point (``outliers.analysis.points``: every kind, ``attn_in``, ``attn_out``, ``ffn_in``,
``down_in``, ``residual``), streamed over the windows of ``outliers.eval.windows`` and kept as a running
max and a few counts (memory does not grow with the tokens):

* **range**: max |x| against the largest finite value of float16 (65504) and bfloat16 (≈ 3.39e38);
  ``headroom`` is max |x| / that value (> 1: past the range), ``margin`` log2 of its inverse (in bits,
  negative past the range). The **first overflow** of a format is the first point past its range in
  forward order (block, then ``attn_in``, ``attn_out``, ``ffn_in``, ``down_in``, ``residual``).
* **underflow**: the share of *nonzero* values below each format's smallest normal (float16 6.1e-05,
  bfloat16 1.2e-38), where precision thins out. Exact zeros are representable in every format and
  counted apart (``zeros``: their share of all values); no share below counts them.
* **FP8** is always scaled, so its range is the scale's business; what a scale cannot fix is a wide
  spread. With the max |x| scaled to the format's max (E4M3 448, E5M2 57344), the share of nonzero
  values below its smallest subnormal (2^-9, 2^-16), which round to zero or to that one subnormal:
  once per tensor, one scale per (point, window): the point's values of one window, whatever the
  batch size, and once per token, one scale per token's row.

The **emulated float16 run** rounds activations to float16's range and precision at every linear's input
inside the blocks, at the output head's input and at every block's output (``x.to(float16).to(x.dtype)``:
past 65504 the value becomes inf, as a real float16 store makes it) while the arithmetic stays in the
model's dtype (float32 on the CPU, where float16 arithmetic is some 100x slower). It is storage rounding,
not float16 arithmetic: sums inside a block (the residual after attention, norms, attention scores) are
not rounded. It reports the first tensor, in forward order, holding an inf or NaN and the perplexity
(inf where a NaN or inf reached the loss). Hooks live in context managers that remove them on every
exit; the model is unchanged afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from outliers.analysis.points import KINDS, CapturePoint, resolve_points
from outliers.arch.hooks import pre_hooks
from outliers.arch.linear import in_features, is_linear
from outliers.arch.registry import blocks
from outliers.display import named, provenance, render_html
from outliers.eval.perplexity import perplexity
from outliers.eval.windows import PerplexitySettings

__all__ = [
    "NumberFormat",
    "FLOAT16",
    "BFLOAT16",
    "E4M3",
    "E5M2",
    "FP8",
    "Location",
    "PointRange",
    "EmulatedRun",
    "RangeResult",
    "format_headroom",
    "range_counts",
    "emulated_float16",
]


@dataclass(frozen=True)
class NumberFormat:
    name: str
    max: float  # largest finite value
    smallest_normal: float
    smallest_subnormal: float


def _format(name: str, dtype: torch.dtype) -> NumberFormat:
    f = torch.finfo(dtype)
    # torch.finfo has no smallest subnormal; subnormals step by one ulp of the smallest normal: tiny * eps
    return NumberFormat(name, float(f.max), float(f.tiny), float(f.tiny) * float(f.eps))


FLOAT16 = _format("float16", torch.float16)
BFLOAT16 = _format("bfloat16", torch.bfloat16)
E4M3 = _format("e4m3", torch.float8_e4m3fn)
E5M2 = _format("e5m2", torch.float8_e5m2)
FP8 = (E4M3, E5M2)
SCALES = ("tensor", "token")  # FP8 scale granularity: one per (point, window), one per token row

# the counts kept per point, in this order
COUNTS = (
    "n_values",
    "n_zero",
    "below_float16_normal",
    "below_bfloat16_normal",
    *(f"{f.name}_{s}" for f in FP8 for s in SCALES),
)


@dataclass(frozen=True)
class Location:
    """A tensor in forward order: its block (None: the output head), kind and module path."""

    block: int | None
    tensor: str  # a capture-point kind, "lm_head" (the head's input) or "linear"
    module: str

    def __str__(self) -> str:
        where = "the output head" if self.block is None else f"block {self.block}"
        return f"{where}, {self.tensor} ({self.module})"


@dataclass(frozen=True)
class PointRange:
    """One capture point's max |x| and counts over every window (``COUNTS``)."""

    name: str
    module: str
    block: int
    kind: str
    dims: int
    max_abs: float
    counts: dict[str, int]

    @property
    def nonzero(self) -> int:
        return self.counts["n_values"] - self.counts["n_zero"]

    def share(self, count: str) -> float:
        """A count's share of the point's nonzero values (NaN without any)."""
        return self.counts[count] / self.nonzero if self.nonzero else math.nan

    def headroom(self, fmt: NumberFormat = FLOAT16) -> float:
        return self.max_abs / fmt.max

    def record(self) -> dict[str, Any]:
        """The point's row of ``RangeResult.table``."""
        return {
            "point": self.name,
            "block": self.block,
            "kind": self.kind,
            "dims": self.dims,
            "max_abs": self.max_abs,
            "fp16_headroom": self.headroom(FLOAT16),
            "fp16_margin_log2": math.log2(FLOAT16.max / self.max_abs) if self.max_abs > 0 else math.inf,
            "bf16_headroom": self.headroom(BFLOAT16),
            "zeros": self.counts["n_zero"] / self.counts["n_values"] if self.counts["n_values"] else math.nan,
            "below_fp16_normal": self.share("below_float16_normal"),
            "below_bf16_normal": self.share("below_bfloat16_normal"),
            **{f"{f.name}_{s}": self.share(f"{f.name}_{s}") for f in FP8 for s in SCALES},
            "n_values": self.counts["n_values"],
            "module": self.module,
        }


@dataclass(frozen=True)
class EmulatedRun:
    """The emulated float16 run: the first non-finite tensor (None: none) and its perplexity."""

    first_nonfinite: Location | None
    ppl: float
    nll: float
    value: str | None = None  # what the first non-finite tensor held: "inf" (an overflow) or "NaN"

    @property
    def clean(self) -> bool:
        return self.first_nonfinite is None and math.isfinite(self.ppl)

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_nonfinite": None
            if self.first_nonfinite is None
            else asdict(self.first_nonfinite) | {"value": self.value},
            "ppl": _finite(self.ppl),  # JSON has no inf or NaN: null
            "nll": _finite(self.nll),
            "clean": self.clean,
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class RangeResult:
    """Per capture point, max |x| against float16's and bfloat16's range and the underflow shares
    (module docstring); the first overflow per format, and the emulated float16 run (None: not run).

    ``ppl`` is the model's perplexity as loaded (``dtype``) on the same windows.
    """

    points: tuple[PointRange, ...]
    first_overflow: dict[str, Location | None]  # "float16", "bfloat16"
    emulated: EmulatedRun | None
    ppl: float
    dtype: str
    window: int
    n_windows: int
    n_tokens: int  # tokens the model read (every window's, BOS included)
    bos: str
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per point, in forward order: max |x|, headroom, zeros, underflow shares, FP8 shares."""
        return pd.DataFrame([p.record() for p in self.points])

    def block_table(self) -> pd.DataFrame:
        """One row per block: max |x| per kind, and the block's worst float16 headroom and its kind."""
        rows = []
        for block in sorted({p.block for p in self.points}):
            mine = [p for p in self.points if p.block == block]
            worst = max(mine, key=lambda p: p.max_abs)
            rows.append(
                {
                    "block": block,
                    **{p.kind: p.max_abs for p in mine},
                    "fp16_headroom": worst.headroom(FLOAT16),
                    "worst": worst.kind,
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Pooled over points: the share of zeros and of nonzero values below each threshold, and the
        point with the largest share of each (``worst_*``)."""
        n = sum(p.counts["n_values"] for p in self.points)
        nonzero = sum(p.nonzero for p in self.points)
        out: dict[str, Any] = {"zeros": sum(p.counts["n_zero"] for p in self.points) / n if n else math.nan}
        for count in COUNTS[2:]:
            out[count] = sum(p.counts[count] for p in self.points) / nonzero if nonzero else math.nan
            worst = max(self.points, key=lambda p: p.share(count) if p.nonzero else -1.0)
            out[f"worst_{count}"] = {"point": worst.name, "share": worst.share(count)}
        top = max(self.points, key=lambda p: p.max_abs)
        out["max_abs"] = {"point": top.name, "module": top.module, "value": top.max_abs}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the ``meta`` facts first, shares as fractions; non-finite numbers as null."""
        formats = {f.name: asdict(f) for f in (FLOAT16, BFLOAT16, *FP8)}
        records = [{k: _finite(v) if isinstance(v, float) else v for k, v in p.record().items()} for p in self.points]
        return {
            **self.meta,
            "window": self.window,
            "n_windows": self.n_windows,
            "n_tokens": self.n_tokens,
            "bos": self.bos,
            "dtype": self.dtype,
            "ppl": _finite(self.ppl),
            "formats": formats,
            "shares_of": "nonzero values (exact zeros are representable and counted apart, as 'zeros')",
            "fp8_scales": {
                "tensor": "one scale per (capture point, window): max |x| of that window's values",
                "token": "one scale per token's row",
            },
            "first_overflow": {k: None if v is None else asdict(v) for k, v in self.first_overflow.items()},
            "emulated_float16": None if self.emulated is None else self.emulated.to_dict(),
            "summary": self.summary(),
            "points": records,
        }

    def _repr_html_(self) -> str:
        return range_html(self)


# ---------------------------------------------------------------- the float pass: running maxima and counts


def range_counts(x: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(max |x|, counts in COUNTS order)`` of one captured tensor holding ``windows`` windows.

    ``x`` is ``(windows, tokens, dims)`` or flattened to ``(windows * tokens, dims)`` (OPT's MLP); its
    first ``windows`` slices along the token axis are the windows the per-tensor FP8 scale is taken over.
    """
    a = x.detach().float().abs().reshape(windows, -1, x.shape[-1])
    zero = a == 0
    nonzero = a.masked_fill(zero, math.inf)  # a zero is exact in every format: never below a threshold
    scale = {"tensor": a.amax(dim=(1, 2), keepdim=True), "token": a.amax(dim=-1, keepdim=True)}
    counts = [
        torch.tensor(a.numel(), device=a.device),
        zero.sum(),
        (nonzero < FLOAT16.smallest_normal).sum(),
        (nonzero < BFLOAT16.smallest_normal).sum(),
        # below the smallest subnormal once max |x| is scaled to the format's max: |x| < max * sub / fmt max
        *((nonzero < scale[s] * (f.smallest_subnormal / f.max)).sum() for f in FP8 for s in SCALES),
    ]
    return a.amax(), torch.stack(counts)


@dataclass
class _Running:
    amax: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor, windows: int) -> None:
        amax, counts = range_counts(x, windows)
        if self.amax is None or self.counts is None:
            self.amax, self.counts = amax, counts
            return
        # a model dispatched over devices: keep the sums where they began
        self.amax = torch.maximum(self.amax, amax.to(self.amax.device))
        self.counts = self.counts + counts.to(self.counts.device)


def _input_ids_hook(model: nn.Module, state: dict[str, int]):
    """A pre-hook on the input embedding that notes the batch's window count: a flattened tensor
    (OPT's MLP input, ``(windows * tokens, dims)``) says nothing of it. The embedding runs whether the
    model or its body (``outliers.arch.lmhead``) is called."""

    def note(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            state["windows"] = int(args[0].shape[0])

    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return embeddings.register_forward_pre_hook(note)


@contextmanager
def _measure(model: nn.Module, points: list[CapturePoint]) -> Iterator[dict[str, _Running]]:
    """Keep each point's running max and counts while the model runs; every hook removed on exit."""
    running = {p.name: _Running() for p in points}
    state = {"windows": 1}
    modules = dict(model.named_modules())
    handles = []

    def residual(p: CapturePoint):
        return lambda mod, args, out: running[p.name].add(out[0] if isinstance(out, tuple) else out, state["windows"])

    try:
        handles.append(_input_ids_hook(model, state))
        for p in points:
            if p.kind == "residual":
                handles.append(modules[p.module].register_forward_hook(residual(p)))
        inputs = [p for p in points if p.kind != "residual"]
        by_module = {p.module: p for p in inputs}
        with pre_hooks(
            model,
            [p.module for p in inputs],
            lambda name, mod, args: running[by_module[name].name].add(args[0], state["windows"]),
        ):
            yield running
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the emulated float16 run


def _to_float16(x: torch.Tensor) -> torch.Tensor:
    """float16's range and precision, stored back in ``x``'s dtype: past 65504 becomes inf."""
    return x.to(torch.float16).to(x.dtype)


def _sites(model: nn.Module) -> tuple[list[tuple[str, int, str]], list[tuple[str, int]], str | None]:
    """Where the emulation rounds: ``(module path, block, kind)`` of each linear inside a block, the
    ``(path, index)`` of each block, and the output head's path (None: no linear head)."""
    points = resolve_points(model, KINDS)
    kind_of = {p.module: p.kind for p in points}
    modules = dict(model.named_modules())
    linears = []
    found = blocks(model)
    for index, path, block in found:
        for name, module in block.named_modules():
            if not is_linear(module):
                continue
            full = f"{path}.{name}"
            linears.append((full, index, kind_of.get(full) or _sibling_kind(full, module, points)))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_path = (
        next((n for n, m in modules.items() if m is head), None) if head is not None and is_linear(head) else None
    )
    return linears, [(path, index) for index, path, _ in found], head_path


def _sibling_kind(path: str, module: nn.Module, points: list[CapturePoint]) -> str:
    """A linear that is no capture point reads what a sibling point reads (k and v beside q, gate beside
    up): the first kind in ``KINDS`` order under the same parent with as many input features."""
    parent = path.rsplit(".", 1)[0]
    dims = in_features(module)
    for p in points:  # sorted by block, then KINDS order
        if p.kind != "residual" and p.module.rsplit(".", 1)[0] == parent and p.dims == dims:
            return p.kind
    return "linear"


@dataclass
class _Watch:
    """The rounding sites' ranks in forward order (from their first call) and the ranks seen non-finite."""

    order: list[Location] = field(default_factory=list)
    rank: dict[str, int] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)  # rank -> "inf" or "NaN"

    def see(self, where: Location, x: torch.Tensor) -> None:
        if where.module not in self.rank:
            self.rank[where.module] = len(self.order)
            self.order.append(where)
        if not bool(torch.isfinite(x).all()):
            self.bad.setdefault(self.rank[where.module], "inf" if bool(torch.isinf(x).any()) else "NaN")

    @property
    def first(self) -> tuple[Location, str] | None:
        """The earliest site in forward order that held an inf or NaN in any batch, and which of them."""
        return (self.order[min(self.bad)], self.bad[min(self.bad)]) if self.bad else None


@contextmanager
def emulated_float16(model: nn.Module, *, head: bool = True) -> Iterator[_Watch]:
    """Round every block linear's input, the output head's (``head``) and every block's output to float16's
    range and precision while the model runs; yield the record of where values first went non-finite.

    Every hook is removed on exit, exceptions included; no weight is touched.
    """
    linears, block_paths, head_path = _sites(model)
    watch = _Watch()
    where = {path: Location(index, kind, path) for path, index, kind in linears}
    if head and head_path is not None:
        where[head_path] = Location(None, "lm_head", head_path)
    modules = dict(model.named_modules())

    def round_input(loc: Location):
        def hook(mod, args):
            x = _to_float16(args[0])
            watch.see(loc, x)
            return (x, *args[1:])

        return hook

    def round_output(loc: Location):
        def hook(mod, args, out):
            h = _to_float16(out[0] if isinstance(out, tuple) else out)
            watch.see(loc, h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    handles = []
    try:
        for path, index in block_paths:
            handles.append(modules[path].register_forward_hook(round_output(Location(index, "residual", path))))
        for path, loc in where.items():
            handles.append(modules[path].register_forward_pre_hook(round_input(loc)))
        yield watch
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the analysis


def format_headroom(
    model: nn.Module,
    ids: torch.Tensor,
    settings: PerplexitySettings | None = None,
    *,
    bos_token_id: int | None = None,
    progress: bool = True,
    emulate: bool = True,
    kinds: tuple[str, ...] = KINDS,
    patterns: dict[str, str] | None = None,
    meta: dict[str, Any] | None = None,
) -> RangeResult:
    """Measure every capture point's headroom to float16, bfloat16 and FP8 over the windows ``settings`` cuts,
    and (``emulate``) run the model again with its activations rounded to float16.

    The float pass is a perplexity run (``outliers.eval.perplexity``) with the points' hooks on, so its
    perplexity comes with it; the emulated run scores the same windows.

    Args:
        ids: the corpus' token ids (1-D), e.g. from ``encode_corpus``.
        settings: windows and batches (default: chunks of 512, 4 per batch, every window).
        bos_token_id: the BOS id, needed for ``bos="window"``.
        kinds: the capture-point kinds measured (default: all of them).
        patterns: per-kind regexes overriding the architecture table.
        meta: model facts, kept in the result and leading its ``to_dict``.

    Raises:
        InvalidArgumentError: bad settings or ids; a family the registry does not know.
        CorpusError: fewer tokens than one window.
    """
    settings = settings or PerplexitySettings()
    points = resolve_points(model, kinds, patterns)
    with _measure(model, points) as running:
        base = perplexity(model, ids, settings, bos_token_id=bos_token_id, progress=progress)
    measured = tuple(_point_range(p, running[p.name]) for p in points)
    emulated = None
    if emulate:
        with emulated_float16(model) as watch, warnings.catch_warnings():
            # a NaN loss makes the bootstrap interval degenerate; the result says so by its inf perplexity
            warnings.simplefilter("ignore", RuntimeWarning)
            run = perplexity(model, ids, settings, bos_token_id=bos_token_id, progress=progress)
        first, value = watch.first or (None, None)
        emulated = EmulatedRun(first, run.ppl, run.nll, value)
    return RangeResult(
        points=measured,
        first_overflow={f.name: _first_past(measured, f) for f in (FLOAT16, BFLOAT16)},
        emulated=emulated,
        ppl=base.ppl,
        dtype=base.dtype,
        window=settings.window,
        n_windows=base.n_windows,
        n_tokens=base.n_windows * settings.window,
        bos=settings.bos,
        meta=({"model": base.model} if base.model else {}) | dict(meta or {}),
    )


def _point_range(p: CapturePoint, r: _Running) -> PointRange:
    if r.amax is None or r.counts is None:  # the module never ran
        return PointRange(p.name, p.module, p.layer, p.kind, p.dims, math.nan, dict.fromkeys(COUNTS, 0))
    counts = [int(c) for c in r.counts.cpu()]
    return PointRange(p.name, p.module, p.layer, p.kind, p.dims, float(r.amax), dict(zip(COUNTS, counts, strict=True)))


def _first_past(points: tuple[PointRange, ...], fmt: NumberFormat) -> Location | None:
    """The first point in forward order whose max |x| is past the format's largest finite value."""
    return next((Location(p.block, p.kind, p.module) for p in points if p.max_abs > fmt.max), None)


def range_html(r: RangeResult) -> str:
    """``RangeResult``: the largest |x|, the first overflow per format, the emulated run; the points."""
    s = r.summary()
    rows: list[tuple[Any, ...]] = [
        ("max |x|", s["max_abs"]["value"], f"{s['max_abs']['point']}; float16's max is {FLOAT16.max:g}"),
        *((f"first past {k}", str(v) if v else "none") for k, v in r.first_overflow.items()),
        ("below float16 normal", s["below_float16_normal"], "share of nonzero values"),
        *(
            (f"{f.name} per {sc}", s[f"{f.name}_{sc}"], "share below its subnormal, scaled")
            for f in FP8
            for sc in SCALES
        ),
    ]
    if r.emulated is not None:
        e = r.emulated
        text = "runs clean" if e.clean else f"first {e.value or 'non-finite'} at {e.first_nonfinite or 'the loss'}"
        rows.append(("emulated float16", f"{e.ppl:.4f}", f"{text}; {r.dtype} {r.ppl:.4f}"))
    settings = [("model", r.meta.get("model")), ("window", r.window), ("windows", r.n_windows), *provenance(r.meta)]
    return render_html(
        named("Number-format headroom", r.meta.get("model", "")), rows, settings, tables=[("points", r.table())]
    )
