"""Static W8A8: int8 activations on one per-tensor scale fixed offline, int8 weights per output channel.

SmoothQuant's static W8A8 (Xiao et al. 2023, "O3"): each quantized linear's input X is quantized with one
absmax scale ``s`` per tensor, calibrated once on text set apart, instead of the dynamic scales computed
per call (``absmax``: per tensor; ``absmax-vector``: per token). Codes are
``clamp(round(x * 127 / s), -127, 127)``: a value beyond ``s`` saturates at ±127. Weights are int8 absmax
per output channel, the very codes ``absmax-vector`` stores; the product is the exact int8 GEMM of
``outliers.quant.quantizers.int8_matmul``.

Calibration (``calibrate``) runs the float model on calibration windows and keeps, per linear input,
the exact top ``k`` of ``|x|`` over all calibration values, streamed batch by batch (``TopK``): ``k`` is
what the lowest asked-for quantile needs (``N - floor((N - 1) q)`` of ``N`` values: about 0.1 % of them
for the 99.9th percentile), so a percentile is exact (numpy's default, linear interpolation) in memory a
thousandth of the values'. From it: ``minmax`` (the calibration max) and any quantile at or above the
lowest asked for. Sibling linears reading one tensor (q, k, v; gate, up) share one record.

PrefixQuant (Chen et al. 2024, arXiv 2410.05265) puts the outlier tokens (``outliers.quant.prefix``)
before every window and keeps them out of quantization. ``set_prefix(model, n)`` makes every static
linear pass the first ``n`` positions of each sequence through the float weight; ``calibrate(...,
prefix=ids)`` reads the windows after the prefix and leaves its positions out of the statistics.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from outliers.arch.linear import is_linear, weight_of
from outliers.arch.lmhead import run_for_hooks
from outliers.arch.registry import architecture_of, is_skipped
from outliers.errors import InvalidArgumentError
from outliers.models.dispatch import input_device
from outliers.quant.linear import Int8Linear
from outliers.quant.quantizers import absmax_matmul_dequant, int8_matmul

__all__ = [
    "StaticState",
    "StaticInt8Linear",
    "static_copy",
    "static_linears",
    "set_scales",
    "set_prefix",
    "TopK",
    "Calibration",
    "calibrate",
    "quantize_static",
]


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """int8 codes of ``x`` on the fixed absmax ``scale``: ``clamp(round(x * 127 / scale), -127, 127)``; a zero
    scale gives zero codes."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    inv = torch.where(s > 0, 127.0 / s, torch.zeros_like(s))
    return torch.round(x.float() * inv).clamp_(-127, 127).to(torch.int8)


@dataclass
class StaticState:
    """What the static linears of one model share: the float prefix's length, the sequence length for
    layers that see 2-D inputs, and the saturation counts (values beyond the scale, values quantized)."""

    prefix: int = 0
    seq: int | None = None
    saturated: int = 0
    values: int = 0

    def reset_counts(self) -> None:
        self.saturated = self.values = 0


class StaticInt8Linear(nn.Module):
    """``y = x @ W.T + b``: X int8 on the fixed per-tensor scale ``x_scale``, W int8 per output channel.

    The first ``state.prefix`` positions of every sequence pass through the float weight unquantized.
    """

    weight_q: torch.Tensor  # int8 (out, in)
    weight_scale: torch.Tensor  # float32 (out,): absmax per output channel
    x_scale: torch.Tensor  # float32 0-dim: the static activation absmax (NaN until calibrated)
    weight_fp: torch.Tensor  # the float weight (out, in), shared with the float model: prefix positions
    bias: torch.Tensor | None

    def __init__(self, module: nn.Module, state: StaticState, name: str = ""):
        super().__init__()
        q = Int8Linear.from_linear(module, "absmax-vector", name=name)  # the codes absmax-vector stores
        self.in_features, self.out_features, self.name, self.state = q.in_features, q.out_features, name, state
        self.register_buffer("weight_q", q.weight_q)
        self.register_buffer("weight_scale", q.weight_scale)
        self.register_buffer("x_scale", torch.tensor(float("nan")))
        self.register_buffer("weight_fp", weight_of(module), persistent=False)
        self.register_buffer("bias", q.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(self.x_scale)):
            raise InvalidArgumentError(f"{self.name or 'StaticInt8Linear'} has no activation scale: calibrate first")
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        n = self.state.prefix
        if not n:
            out = self._quantized(x2)
        else:
            seq = x.shape[-2] if x.dim() >= 3 else self.state.seq
            if seq is None or x2.shape[0] % seq:
                raise InvalidArgumentError(f"{self.name or 'StaticInt8Linear'}: cannot tell the prefix positions")
            x3 = x2.reshape(-1, seq, self.in_features)
            bias = None if self.bias is None else self.bias.float()
            head = nn.functional.linear(x3[:, :n].float(), self.weight_fp.float(), bias)
            tail = self._quantized(x3[:, n:].reshape(-1, self.in_features)).reshape(len(x3), seq - n, -1)
            out = torch.cat([head, tail], dim=1)
        return out.to(dtype).reshape(*lead, self.out_features)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        s = self.x_scale
        self.state.saturated += int((x.abs() > s).sum())
        self.state.values += x.numel()
        product = int8_matmul(quantize_static(x, s), self.weight_q)
        return absmax_matmul_dequant(product, s, self.weight_scale, None if self.bias is None else self.bias.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, x_scale={float(self.x_scale):.4g}"


def static_linears(model: nn.Module) -> dict[str, StaticInt8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, StaticInt8Linear)}


def _targets(model: nn.Module, skip: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """The linears static quantization replaces (every one outside ``skip``; None: the architecture's), and
    those it leaves."""
    skip = architecture_of(model).skip if skip is None else skip
    linears = [n for n, m in model.named_modules() if n and is_linear(m)]
    return [n for n in linears if not is_skipped(n, skip)], [n for n in linears if is_skipped(n, skip)]


def static_copy(
    model: nn.Module, skip: tuple[str, ...] | None = None
) -> tuple[nn.Module, list[str], list[str], int, int]:
    """Return a copy of ``model`` with its linears outside ``skip`` made ``StaticInt8Linear`` (scales unset).

    The copy shares every float tensor with ``model`` (the float weights too: the prefix positions read
    them). Returns ``(copy, replaced, skipped, weight bytes before, codes and statistics bytes after)``.
    """
    names, skipped = _targets(model, skip)
    if not names:
        raise InvalidArgumentError("no linear layer to quantize")
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy = deepcopy(model, memo=shared)
    state = StaticState()
    before = after = 0
    for name in names:
        old = copy.get_submodule(name)
        new = StaticInt8Linear(old, state, name)
        before += sum(t.numel() * t.element_size() for t in old.parameters())
        after += sum(b.numel() * b.element_size() for n, b in new.named_buffers() if n != "weight_fp")
        parent, _, child = name.rpartition(".")
        setattr(copy.get_submodule(parent) if parent else copy, child, new)
    embed = getattr(copy, "get_input_embeddings", lambda: None)()
    if embed is not None:  # layers that flatten (batch, seq) to rows learn the sequence length here

        def seq(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                state.seq = int(args[0].shape[-1])

        embed.register_forward_pre_hook(seq)
    return copy, names, skipped, before, after


def _state(model: nn.Module) -> StaticState:
    layers = static_linears(model)
    if not layers:
        raise InvalidArgumentError("model has no StaticInt8Linear: make it with static_copy")
    return next(iter(layers.values())).state


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Give each static linear its activation scale (``Calibration.scales``), in place.

    Raises:
        InvalidArgumentError: a static linear without a scale.
    """
    for name, m in static_linears(model).items():
        if name not in scales:
            raise InvalidArgumentError(f"no activation scale for {name}")
        m.x_scale.fill_(scales[name])


def set_prefix(model: nn.Module, n: int) -> StaticState:
    """Pass the first ``n`` positions of every sequence through the float weights (0: quantize all); return the
    shared state, its saturation counts reset."""
    state = _state(model)
    state.prefix = int(n)
    state.reset_counts()
    return state


def needed(n: int, q: float) -> int:
    """How many of the largest of ``n`` values the ``q`` quantile (linear interpolation) reads."""
    return n - math.floor((n - 1) * q)


class TopK:
    """The exact ``k`` largest of a stream of values, and how many values there were."""

    def __init__(self, k: int):
        if k < 1:
            raise InvalidArgumentError(f"k must be >= 1, got {k}")
        self.k, self.n = k, 0
        self.values: torch.Tensor | None = None  # descending

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).float()
        self.n += v.numel()
        if self.values is not None:
            v = torch.cat([self.values, v.topk(min(self.k, v.numel())).values])
        self.values = v.topk(min(self.k, v.numel())).values

    def max(self) -> float:
        if self.values is None:
            raise InvalidArgumentError("no values added")
        return float(self.values[0])

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of every value added, as ``numpy.quantile(values, q)`` gives it.

        Raises:
            InvalidArgumentError: ``q`` outside [0, 1], or below what the kept values can answer.
        """
        if not 0 <= q <= 1:
            raise InvalidArgumentError(f"a quantile is in [0, 1], got {q}")
        if self.values is None:
            raise InvalidArgumentError("no values added")
        if needed(self.n, q) > len(self.values):
            raise InvalidArgumentError(f"quantile {q} needs the top {needed(self.n, q)} values; {self.k} are kept")
        h = (self.n - 1) * q
        lo = math.floor(h)
        hi = min(lo + 1, self.n - 1)
        v_lo, v_hi = float(self.values[self.n - 1 - lo]), float(self.values[self.n - 1 - hi])
        return v_lo + (h - lo) * (v_hi - v_lo)


@dataclass
class Calibration:
    """Each static linear's kept ``|x|`` (``TopK``) over the calibration windows; ``tokens``: positions read."""

    tops: dict[str, TopK]
    tokens: int
    lowest: float  # the lowest quantile the kept values answer
    prefix: list[int] = field(default_factory=list)

    def scales(self, q: float | None = None) -> dict[str, float]:
        """Each linear's activation scale: the calibration max (``q=None``: min-max) or the ``q`` quantile."""
        return {n: t.max() if q is None else t.quantile(q) for n, t in self.tops.items()}

    def facts(self) -> dict[str, Any]:
        return {"calib_tokens": self.tokens, "calib_prefix": list(self.prefix)}


@torch.no_grad()
def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    lowest: float = 0.999,
    prefix: torch.Tensor | None = None,
    skip: tuple[str, ...] | None = None,
    batch_size: int = 4,
) -> Calibration:
    """Run the float ``model`` on ``windows`` (``(n, length)`` token ids) and keep what static scales need.

    ``prefix``: token ids put before every window; its positions are read (the windows' activations
    depend on them) but left out of the statistics. ``lowest``: the lowest quantile to answer
    (``Calibration.scales``); the max is always there. ``skip`` as ``static_copy`` takes it.
    """
    names = _targets(model, skip)[0]
    n_pre = 0 if prefix is None else len(prefix)
    if prefix is not None:
        windows = torch.cat([prefix.to(windows).expand(len(windows), -1), windows], dim=1)
    n_win, length = windows.shape
    tops: dict[str, TopK] = {}
    alias: dict[str, str] = {}
    last: list[Any] = [None, None]  # the tensor the last hooked linear read, and its name
    rows_of: list[int] = [0]

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x is last[0]:  # a sibling reading the same tensor: one record for both
            alias[name] = last[1]
            return
        last[0], last[1] = x, name
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] != rows_of[0] * length:
            raise InvalidArgumentError(f"calibration: {name} read {x2.shape[0]} rows, not batch x length")
        a = x2.reshape(rows_of[0], length, -1)[:, n_pre:].abs()
        if name not in tops:
            total = n_win * (length - n_pre) * x2.shape[-1]
            tops[name] = TopK(needed(total, lowest))
        tops[name].add(a)

    device = input_device(model)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    whole = head is not None and any(model.get_submodule(n) is head for n in names)  # the head reads every position
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n in names]
    try:
        for start in range(0, n_win, batch_size):
            batch = windows[start : start + batch_size]
            rows_of[0] = len(batch)
            (model if whole else partial(run_for_hooks, model))(input_ids=batch.to(device))
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in tops and n not in alias]
    if missing:
        raise InvalidArgumentError(f"calibration never reached {', '.join(missing[:4])}")
    tops |= {n: tops[first] for n, first in alias.items()}
    return Calibration(tops, n_win * (length - n_pre), lowest, [] if prefix is None else prefix.tolist())
