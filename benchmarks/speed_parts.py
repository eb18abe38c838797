"""Where a quantized forward's time goes, and the speed it could reach: the machinery of ``eval_speed.py``.

The **ceiling** is the speed-up over fp32 if every quantized linear cost only
its int8 GEMM and nothing else in the forward changed::

    ceiling = T / (T - F + I)

``T`` is the fp32 model's time over the benchmark's batches (the seconds
``perplexity`` reports), ``F`` the time those batches spend in the linears a
method quantizes, ``I`` the pure int8 GEMM time of the same calls on this machine's best exact
backend (``outliers.quant.gemm``: ``torch._int_mm`` where oneDNN has VNNI, the float32 path or
the Numba int16 kernel elsewhere).
``F`` is timed *inside the real forward* by hooks on those linears: that is
what the forward pays for them, with the caches as the surrounding ops leave
them, so removing it leaves exactly the rest. ``I`` is timed apart, at the
shapes the hooks recorded (``(tokens, in) x (in, out)``, each call), on random
int8 operands: the floor of an int8 linear, nothing but its GEMM. The same
shapes' fp32 matmul timed the same way gives ``F_isolated``; its gap to ``F``
says how much the forward's surroundings slow a GEMM (``ceiling_isolated``
uses it in place of ``F``, both sides then timed alike).

The **shares** split one llm.int8 pass into the output head, attention (the
attention modules minus their linears), the int8 GEMMs, the quantize pass
(codes, row statistics, and the outlier columns found and gathered), the
dequantize pass, the decomposition with the layers' glue (each int8 linear's
time minus those three: the outlier columns' float product where it is not
fused into dequantization, weight columns, input checks, reshapes), and the rest (norms, MLP activations, embeddings,
log-softmax). The functions are timed by wrappers patched in for that pass
only, so the library's hot path carries no timing code.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from outliers.arch.linear import in_features, out_features
from outliers.arch.registry import architecture_of, blocks
from outliers.quant.linear import Int8Linear
from outliers.quant.quantizers import int8_matmul

__all__ = [
    "Shape",
    "LinearTimes",
    "cpu_model",
    "machine_facts",
    "gemm_pair",
    "isolated_gemms",
    "backend_seconds",
    "timed_linears",
    "ceiling",
    "attention_modules",
    "int8_parts",
    "PARTS",
]

Shape = tuple[int, int, int]  # (tokens, in, out) of one linear call


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    from outliers.quant.gemm import machine_facts

    return machine_facts()["cpu"] or "unknown"


def gemm_pair(shape: Shape, repeats: int = 3) -> tuple[float, float]:
    """Return the best seconds of one fp32 matmul and one int8 GEMM of ``shape``, timed interleaved.

    fp32: ``x @ w.T`` with ``w`` stored ``(out, in)`` as ``nn.Linear`` keeps it. int8:
    ``int8_matmul`` as ``Int8Linear`` calls it, on the backend chosen for this machine
    (``outliers.quant.gemm``; a few microseconds of argument checks around the GEMM).
    """
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    fp, i8 = [], []
    with torch.inference_mode():
        torch.mm(x, w.t()), int8_matmul(a, b)  # first calls set up their kernels
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, w.t())
            fp.append(time.perf_counter() - start)
            start = time.perf_counter()
            int8_matmul(a, b)
            i8.append(time.perf_counter() - start)
    return min(fp), min(i8)


def isolated_gemms(shapes: Counter[Shape], repeats: int = 3) -> tuple[float, float]:
    """Return ``(fp32 seconds, int8 seconds)`` summed over every call: each shape's best times its count."""
    fp = i8 = 0.0
    for shape, calls in shapes.items():
        f, i = gemm_pair(shape, repeats)
        fp, i8 = fp + calls * f, i8 + calls * i
    return fp, i8


def backend_seconds(shapes: Counter[Shape], repeats: int = 3) -> dict[str, float]:
    """Seconds of every exact int8 GEMM backend over the calls ``shapes`` counts: each shape's best x its count."""
    from outliers.quant import gemm

    g = torch.Generator().manual_seed(0)
    out = {}
    for name in gemm.BACKENDS:
        if not gemm.verify(name):
            continue
        fn, total = gemm.BACKENDS[name].fn, 0.0
        for (m, k, n), calls in shapes.items():
            a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
            b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            fn(a, b)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn(a, b)
                best = min(best, time.perf_counter() - start)
            total += calls * best
        out[name] = total
    return out


def machine_facts(shape: Shape = (2048, 576, 1536), repeats: int = 5) -> list[str]:
    """Lines naming the machine: CPU and flags, threads, date, fp32 GFLOPS and each int8 backend's GOPS at ``shape``."""
    from outliers.quant import gemm

    fp, _ = gemm_pair(shape, repeats)
    ops = 2 * shape[0] * shape[1] * shape[2]
    per = backend_seconds(Counter({shape: 1}), repeats)
    facts = gemm.machine_facts()
    return [
        f"CPU: {facts['cpu']} ({platform.machine()}; {' '.join(facts['flags'])}), torch {torch.__version__} "
        f"(capability {facts['torch_cpu_capability']}), {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f}",
        f"GEMM at (tokens, in, out) = {shape}, best of {repeats}: fp32 matmul {ops / fp / 1e9:.0f} GFLOPS; exact int8 "
        + ", ".join(f"{n} {ops / s / 1e9:.0f} GOPS ({fp / s:.2f}x)" for n, s in per.items())
        + f"; in use: {gemm.describe_choice()}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
    ]


@dataclass
class LinearTimes:
    """Hook-timed linears of one pass: seconds per module name, and calls per ``(tokens, in, out)``."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    shapes: dict[str, Counter[Shape]] = field(default_factory=lambda: defaultdict(Counter))

    def total(self, names: Sequence[str]) -> float:
        return sum(self.seconds.get(n, 0.0) for n in names)

    def calls(self, names: Sequence[str]) -> Counter[Shape]:
        out: Counter[Shape] = Counter()
        for n in names:
            out.update(self.shapes.get(n, Counter()))
        return out


@contextmanager
def timed_linears(model: nn.Module, names: Sequence[str]) -> Iterator[LinearTimes]:
    """Time the named linear modules inside every forward of ``model`` (hooks, removed on exit)."""
    times, handles, started = LinearTimes(), [], {}
    for name in names:
        module = model.get_submodule(name)
        k, n = in_features(module), out_features(module)

        def pre(mod, args, name=name, k=k, n=n):
            times.shapes[name][(args[0].numel() // k, k, n)] += 1
            started[name] = time.perf_counter()

        def post(mod, args, out, name=name):
            times.seconds[name] += time.perf_counter() - started.pop(name)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


def ceiling(forward_s: float, linear_s: float, int8_s: float) -> float:
    """Return ``T / (T - F + I)``: the speed-up if the quantized linears cost only their int8 GEMMs."""
    return forward_s / (forward_s - linear_s + int8_s)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The blocks' attention modules, where the architecture registry says where they are (else none)."""
    arch = architecture_of(model)
    if arch.attention is None or arch.blocks is None:
        return []
    return [block.get_submodule(arch.attention) for _, _, block in blocks(model, arch)]


# the partition int8_parts reports, in print order
PARTS = ("lm_head", "attention", "int8 GEMM", "quantize", "decompose + glue", "dequantize", "rest")
# the functions an int8 linear's CPU path calls, by part; patched where the layer looks them up
_WRAPPED = {
    "int8 GEMM": (("outliers.quant.linear", "int8_matmul"),),
    "quantize": (("outliers.quant.cpu_kernels", "quantize_decompose"),),
    "dequantize": tuple(
        (module, name)
        for module in ("outliers.quant.cpu_kernels", "outliers.quant.linear")
        for name in ("dequantize_into", "dequantize_inplace")  # into a fresh buffer, or over the int32 product
    ),
}


@dataclass
class _State:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: Counter[str] = field(default_factory=Counter)
    in_head: int = 0
    in_attention: int = 0
    started: dict[int, float] = field(default_factory=dict)


def _wrap(fn: Callable, part: str, state: _State) -> Callable:
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if not state.in_head:  # the head's time is its own part, whatever it calls
                state.seconds[part] += time.perf_counter() - start
                state.calls[part] += 1

    return timed


def _timed_module(module: nn.Module, state: _State, on_exit: Callable[[float], None], flag: str | None) -> list:
    def pre(mod, args):
        if flag:
            setattr(state, flag, getattr(state, flag) + 1)
        state.started[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        if flag:
            setattr(state, flag, getattr(state, flag) - 1)
        on_exit(time.perf_counter() - state.started.pop(id(mod)))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextmanager
def int8_parts(model: nn.Module) -> Iterator[Callable[[float], tuple[dict[str, float], list[str]]]]:
    """Time the parts of ``model``'s forwards while in the context; yield ``shares(total_seconds)``.

    ``shares(total)`` returns ``({part: seconds}, notes)`` over ``PARTS``, "rest" being ``total``
    minus the others, and notes naming any wrapped function that was never called (the layer's
    hot path no longer calls it by that name: its time is then in "decompose + glue").
    """
    import importlib

    state = _State()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    patched: list[tuple[object, str, Callable]] = []
    handles: list = []

    def add(part: str) -> Callable[[float], None]:
        def on_exit(dt: float) -> None:
            state.seconds[part] += dt

        return on_exit

    def linear_exit(dt: float) -> None:
        if not state.in_head:
            state.seconds["int8 linears"] += dt
            if state.in_attention:
                state.seconds["linears in attention"] += dt

    try:
        for part, places in _WRAPPED.items():
            for module_name, attr in places:
                mod = importlib.import_module(module_name)
                if hasattr(mod, attr):
                    fn = getattr(mod, attr)
                    patched.append((mod, attr, fn))
                    setattr(mod, attr, _wrap(fn, part, state))
        if head is not None:
            handles += _timed_module(head, state, add("lm_head"), "in_head")
        for attn in attention_modules(model):
            handles += _timed_module(attn, state, add("attention modules"), "in_attention")
        for m in model.modules():
            if isinstance(m, Int8Linear) and m is not head:
                handles += _timed_module(m, state, linear_exit, None)

        def shares(total: float) -> tuple[dict[str, float], list[str]]:
            s = state.seconds
            inner = s["int8 GEMM"] + s["quantize"] + s["dequantize"]
            out = {
                "lm_head": s["lm_head"],
                "attention": s["attention modules"] - s["linears in attention"],
                "int8 GEMM": s["int8 GEMM"],
                "quantize": s["quantize"],
                "decompose + glue": s["int8 linears"] - inner,
                "dequantize": s["dequantize"],
            }
            out["rest"] = total - sum(out.values())
            notes = [f"{p} ({', '.join(sorted({a for _, a in _WRAPPED[p]}))}) was never called" for p in _WRAPPED]
            return out, [n for n, p in zip(notes, _WRAPPED, strict=True) if not state.calls[p]]

        yield shares
    finally:
        for h in handles:
            h.remove()
        for mod, attr, fn in reversed(patched):
            setattr(mod, attr, fn)
