"""Exact int8 GEMM backends for the CPU, and the one this machine uses, chosen by measurement.

Every backend returns the exact int32 ``a @ b.T`` for int8 codes from -128 to 127,
so which one runs never changes a number, only the time (the tests compare each
bit for bit against an int64 product). They differ in speed by 100x between
processors of one kind: ``torch._int_mm`` is fast only where oneDNN has VNNI or
AMX instructions; elsewhere it is a scalar loop (1-4 GOPS on an AVX2-only AMD Zen 3
against 90-150 for the float32 path).

=========  ==============================================================  ==============
name       arithmetic                                                      extra memory
=========  ==============================================================  ==============
int_mm     ``torch._int_mm`` (oneDNN's s8 x s8 -> s32)                     none
float32    codes as float32, K in chunks of at most 1,024, chunk sums      one chunk of
           added in int32: 1,024 x 128² = 2^24, so every partial sum of a  the weight's
           chunk is an exact float32 integer, whatever order the BLAS      codes per call
           sums in                                                          (transient)
int16      a Numba loop over codes widened to int16/int32 (``vpmaddwd``    none
           on x86), one weight row against a few rows of X at a time: for
           few rows (generation) it reads the int8 weight once
=========  ==============================================================  ==============

u8 x s8 paths (``vpmaddubsw``, fbgemm's AVX2 kernel) saturate pair sums at int16
and are not exact over the full range: none is here.

The choice (``selected``) is made once per machine: each backend is timed at
SmolLM2's two MLP shapes, for few rows (M <= 16) and many, and the fastest wins,
except that ``int_mm`` is left only for a median gain of at least 1.2x. The choice is
cached under ``$OUTLIERS_CACHE/int8_gemm/``, keyed by the CPU's model and flags, the
thread count and torch's version; ``OUTLIERS_INT8_GEMM=NAME`` (or ``use(NAME)``, or
``outliers eval --int8-gemm NAME``) forces one. The choice is never part of a
result's fingerprint: the arithmetic is the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Backend",
    "BACKENDS",
    "ENV",
    "SMALL_ROWS",
    "FLOAT32_CHUNK",
    "available",
    "get_backend",
    "int8_gemm",
    "selected",
    "choice",
    "use",
    "measure",
    "verify",
    "machine_facts",
    "describe_choice",
    "record",
    "calls",
]

ENV = "OUTLIERS_INT8_GEMM"
SMALL_ROWS = 16  # M <= 16: generation and short inputs, where reading the weight dominates
FLOAT32_CHUNK = 1024  # 1024 * 128 * 128 = 2**24: the largest exact float32 integer run
INT16_MAX_K = (2**31 - 1) // (128 * 128)  # an int32 accumulator holds any sum of this many products
# the weight's codes are widened to float32 in row blocks of at most this many elements (64 MiB)
_FLOAT32_BLOCK = 1 << 24
CHOICE_VERSION = 1  # bump when the timing protocol or the backends change: old choices are remeasured
GAIN_TO_LEAVE_INT_MM = 1.2


@dataclass(frozen=True)
class Backend:
    """One exact int8 GEMM: ``fn(a (m, k) int8, b (n, k) int8) -> (m, n) int32`` on CPU tensors."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    summary: str
    extra_weight_memory: str  # what it keeps or makes besides the int8 weight


def _float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    chunks = max(1, math.ceil(k / FLOAT32_CHUNK))
    step = math.ceil(k / chunks)  # balanced: 1536 -> 2 x 768, not 1024 + 512
    rows = max(1, min(n, _FLOAT32_BLOCK // max(step, 1)))  # a huge head is widened in row blocks
    if chunks == 1 and rows == n:
        return torch.mm(a.float(), b.float().t()).to(torch.int32)
    out = torch.empty(m, n, dtype=torch.int32)
    for r0 in range(0, n, rows):
        bo = b[r0 : r0 + rows]
        acc = torch.mm(a[:, :step].float(), bo[:, :step].float().t()).to(torch.int32)
        for s in range(step, k, step):
            acc.add_(torch.mm(a[:, s : s + step].float(), bo[:, s : s + step].float().t()).to(torch.int32))
        out[:, r0 : r0 + rows] = acc
    return out


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1] == 1:  # torch 2.13's CPU _int_mm returns garbage for k == 1 (found by the exactness tests)
        return _float32_mm(a, b)
    return torch._int_mm(a, b.t())


def _int16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1] > INT16_MAX_K:  # beyond what one int32 accumulator holds: split K, add in int32
        step = INT16_MAX_K
        out = _int16_mm(a[:, :step], b[:, :step])
        for s in range(step, a.shape[1], step):
            out += _int16_mm(a[:, s : s + step], b[:, s : s + step])
        return out
    from outliers.quant.cpu_kernels import int8_gemm_int16

    a_np = a.contiguous().numpy()
    b_np = b.contiguous().numpy()
    c = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    int8_gemm_int16(a_np, b_np, c)
    return torch.from_numpy(c)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("int_mm", _int_mm, "torch._int_mm (oneDNN s8 x s8 -> s32)", "none"),
        Backend(
            "float32",
            _float32_mm,
            f"codes as float32, K in chunks of <= {FLOAT32_CHUNK}, chunk sums added in int32",
            "transient float32 codes of one weight chunk per call (4 B per weight element in it), none kept",
        ),
        Backend("int16", _int16_mm, "Numba: codes widened to int16, int32 accumulators (vpmaddwd)", "none"),
    )
}


def available() -> list[str]:
    """The backends this machine can run (all of them on a CPU build of torch)."""
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    """Return the backend called ``name``.

    Raises:
        InvalidArgumentError: no backend has that name (the message lists those that do).
    """
    try:
        return BACKENDS[name]
    except KeyError:
        from outliers.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"unknown int8 GEMM backend {name!r}; available: {', '.join(available())} (set by --int8-gemm or ${ENV})"
        ) from None


# --- which backend runs --------------------------------------------------------------------------

_lock = threading.Lock()
_forced = threading.local()  # use(NAME) inside one thread
_choice: dict[str, Any] | None = None  # this process's measured (or cached) choice


@contextmanager
def use(name: str | None) -> Iterator[None]:
    """Run the block with backend ``name`` for every CPU int8 product on this thread (``None``: the choice)."""
    if name is not None:
        get_backend(name)
    before = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = before


def _pinned() -> str | None:
    name = getattr(_forced, "name", None) or os.environ.get(ENV) or None
    if name is not None:
        get_backend(name)
        if not verify(name):  # memoized: a dict lookup after the first call
            from outliers.errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"int8 GEMM backend {name!r} is not exact on this machine (it differs from the int64 "
                f"product on full-range int8 codes); use one of: "
                f"{', '.join(n for n in BACKENDS if n != name and verify(n))}"
            )
    return name


_verify_results: dict[str, bool] = {}  # backend -> exact on this machine, checked once per process


def _probe_operands() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Operands that catch a kernel that saturates, drops a sign or mishandles a shape."""
    gen = torch.Generator().manual_seed(1234)
    pairs = []
    for m, k, n in ((1, 1, 3), (3, 7, 5), (4, 576, 64), (33, 1536, 40), (17, 2100, 9)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        a[0] = -128  # the largest sums: -128 * -128 on every k, both signs
        b[0] = -128
        if n > 1:
            b[1] = 127
        if m > 1:
            a[1, ::2], a[1, 1::2] = 127, -128
        pairs.append((a, b))
    return pairs


def verify(name: str) -> bool:
    """Whether backend ``name`` gives the int64 product, bit for bit, on probe operands on this machine.

    Not a formality: under ``ONEDNN_MAX_CPU_ISA=AVX2`` ``torch._int_mm`` takes a u8 x s8 path that
    saturates and is wrong on almost every full-range output (seen with torch 2.13).
    """
    if name not in _verify_results:
        fn = get_backend(name).fn
        ok = True
        for a, b in _probe_operands():
            if not torch.equal(fn(a, b).long(), a.long() @ b.long().t()):
                ok = False
                break
        _verify_results[name] = ok
    return _verify_results[name]


def selected(rows: int | None = None) -> str:
    """The backend a product with ``rows`` rows of X runs on (``None``: the many-rows class)."""
    if (name := _pinned()) is not None:
        return name
    c = choice()
    return c["small"] if rows is not None and rows <= SMALL_ROWS else c["large"]


def describe_choice() -> str:
    """One line for a command's set-up: the backend(s) in use and why."""
    if (name := _pinned()) is not None:
        how = "use(...)" if getattr(_forced, "name", None) else f"${ENV}"
        return f"{name} (forced by {how})"
    c = choice()
    where = "measured now" if c.get("measured_now") else "measured earlier, cached"
    if c["small"] == c["large"]:
        return f"{c['large']} ({where}; {_gops_text(c, c['large'])})"
    return f"{c['large']}, {c['small']} for <= {SMALL_ROWS} rows ({where}; {_gops_text(c, c['large'])})"


def record() -> dict[str, Any]:
    """What a result records of the int8 GEMM it ran on: provenance only, never a fingerprint's part."""
    pinned = _pinned()
    return {
        "backend": selected(),
        f"backend_rows_le_{SMALL_ROWS}": selected(1),
        "how": "forced" if pinned else "measured",
        "cpu": machine_facts()["cpu"],
    }


def _gops_text(c: dict[str, Any], name: str) -> str:
    g = c.get("gops", {}).get("large", {}).get(name)
    return f"{g:.0f} GOPS at SmolLM2's shapes" if g else "no timing"


_calls = 0  # CPU int8 products run by this process: a result that ran some records the backend


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b.T`` of CPU int8 ``a (m, k)``, ``b (n, k)`` on the selected backend."""
    global _calls
    _calls += 1
    return BACKENDS[selected(a.shape[0])].fn(a, b)


def calls() -> int:
    """How many CPU int8 products this process has run (compare before and after a piece of work)."""
    return _calls


# --- machine facts and the choice's cache -------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    facts = {"model": platform.processor() or platform.machine(), "flags": ""}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and facts["model"] in ("", platform.machine(), platform.processor()):
                    facts["model"] = value.strip()
                elif key in ("flags", "Features") and not facts["flags"]:
                    facts["flags"] = value.strip()
                if facts["flags"] and key == "":
                    break
    except OSError:
        pass
    return facts


_INTERESTING = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimd")


def machine_facts() -> dict[str, Any]:
    """CPU model and the flags that decide int8 speed, cores, threads and the torch build."""
    cpu = _cpuinfo()
    flags = cpu["flags"].split()
    return {
        "cpu": cpu["model"],
        "flags": [f for f in _INTERESTING if f in flags],
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME", ""),
    }


def _key(facts: dict[str, Any]) -> str:
    parts = {
        k: facts[k]
        for k in ("cpu", "flags_sha256", "threads", "torch", "torch_cpu_capability", "onednn_max_isa", "numba_cpu_name")
    }
    parts["version"] = CHOICE_VERSION
    parts["backends"] = sorted(BACKENDS)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _cache_file(facts: dict[str, Any]):
    from outliers.cache import cache_dir

    return cache_dir("int8_gemm") / f"{_key(facts)}.json"


def _valid(c: Any, key: str) -> bool:
    return (
        isinstance(c, dict)
        and c.get("key") == key
        and c.get("small") in BACKENDS
        and c.get("large") in BACKENDS
        and isinstance(c.get("gops"), dict)
        and isinstance(c.get("exact"), dict)
        and set(c["exact"]) == set(BACKENDS)
    )


def choice(*, remeasure: bool = False) -> dict[str, Any]:
    """This machine's choice: ``{"small": NAME, "large": NAME, "gops": {...}, "machine": {...}}``.

    Read from the cache, or measured (about a second; more where ``_int_mm`` is slow) and cached. A
    cache file that does not read or verify is moved aside with a one-line warning and remeasured.
    """
    global _choice
    with _lock:
        if _choice is not None and not remeasure:
            return _choice
        from outliers.cache import atomic_write, heal

        facts = machine_facts()
        key = _key(facts)
        path = _cache_file(facts)
        if not remeasure and path.exists():
            try:
                c = json.loads(path.read_text(encoding="utf-8"))
                if not _valid(c, key):
                    raise ValueError("not a choice for this machine")
                _choice = c | {"measured_now": False}
                return _choice
            except (OSError, ValueError, UnicodeDecodeError) as e:
                heal(path, e)
        exact = {name: verify(name) for name in BACKENDS}
        gops = measure(names=[n for n, ok in exact.items() if ok])
        c = {"key": key, "machine": facts, "exact": exact, "gops": gops, "measured_on": time.strftime("%Y-%m-%d")}
        c["small"], c["large"] = _pick(gops["small"]), _pick(gops["large"])
        try:
            atomic_write(path, json.dumps(c, indent=2) + "\n")
        except OSError:
            pass  # a read-only cache: the choice still holds for this process
        _choice = c | {"measured_now": True}
        return _choice


def _pick(gops: dict[str, float]) -> str:
    if not gops:
        return "float32"  # no backend verified: cannot happen for float32 on IEEE hardware, but say something
    best = max(gops, key=lambda n: gops[n])
    if "int_mm" in gops and best != "int_mm" and gops[best] < GAIN_TO_LEAVE_INT_MM * gops["int_mm"]:
        return "int_mm"  # not worth leaving the incumbent for a gain inside the timing noise
    return best


# SmolLM2-135M's MLP: (M, 576) x (1536, 576)ᵀ and (M, 1536) x (576, 1536)ᵀ
SHAPES = ((576, 1536), (1536, 576))
ROWS = {"small": 4, "large": 256}


def measure(
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    rows: dict[str, int] | None = None,
    *,
    budget_s: float = 0.25,
    names: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """GOPS of each backend per shape class: the median over ``shapes`` of each shape's best time.

    Each backend runs once to warm up (Numba compiles, oneDNN builds its kernel), then again until
    ``budget_s`` is spent on that shape, at least twice. Returns ``{"small": {name: GOPS}, "large": ...}``.
    """
    rows = rows or ROWS
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for cls, m in rows.items():
        per: dict[str, list[float]] = {n: [] for n in names or BACKENDS}
        for k, n in shapes:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
            b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
            for name in per:
                fn = BACKENDS[name].fn
                fn(a, b)
                best, spent, reps = math.inf, 0.0, 0
                while reps < 2 or spent < budget_s:
                    t0 = time.perf_counter()
                    fn(a, b)
                    dt = time.perf_counter() - t0
                    best, spent, reps = min(best, dt), spent + dt, reps + 1
                    if reps >= 50:
                        break
                per[name].append(2.0 * m * k * n / best / 1e9)
        out[cls] = {name: statistics.median(g) for name, g in per.items()}
    return out
