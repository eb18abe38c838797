"""Compile every kernel for real GPUs without one: ``python -m cuda_kernels.check``.

The simulator runs kernels as Python and skips Numba's CUDA type checks, so a kernel
can pass every simulated test and still fail to compile. This builds each kernel, for
each argument type the launchers pass, the way numba-cuda does at first launch: Numba
to LTO-IR, the CUDA C of ``mma_s8_16x8x32.cu`` through NVRTC, both linked by nvJitLink
into a cubin for each compute capability asked for. It builds the kernels of
``PRODUCTION_TILES``, the tiling the launchers use on a GPU. It prints what ptxas reports
(registers, spills, stack) and exits 1 when a kernel fails to build or spills.

Needs numba-cuda with the CUDA 12 toolkit wheels (``pip install 'outliers[cuda]'``),
no GPU; exits 3 when they are missing. Run it without NUMBA_ENABLE_CUDASIM.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import types

from .tiles import PRODUCTION_TILES, TileConfig

MISSING = 3


def signatures():
    """Kernel name -> the argument types its launcher (``launch.py``, ``gemm.py``) passes (add yours here)."""
    from numba import types as T

    def arr(dtype, ndim):
        return T.Array(dtype, ndim, "C")

    f32 = T.float32

    def gemm_tail(out):  # out: float32, float16, or int16 holding bfloat16 bits
        return (
            arr(f32, 1),
            arr(f32, 1),
            arr(f32, 1),
            T.boolean,
            arr(f32, 2),
            arr(f32, 2),
            T.boolean,
            T.boolean,
            arr(out, 2),
            arr(T.int32, 2),
        )

    outs = (f32, T.float16, T.int16)
    floats = (f32, T.float16)
    return {
        "outlier_columns_kernel": [(arr(x, 2), f32, arr(T.uint8, 1)) for x in floats],
        "quantize_rows_kernel": [(arr(x, 2), f32, arr(T.uint8, 1), arr(T.int8, 2), arr(f32, 1)) for x in floats],
        "gather_columns_kernel": [
            (arr(x, 2), arr(T.int64, 1), arr(f32, 1), T.boolean, arr(f32, 2)) for x in (*floats, T.int8)
        ],
        "int8_gemm_dequant_kernel": [(arr(T.int8, 2), arr(T.int8, 2), *gemm_tail(o)) for o in outs],
        "int8_gemm_mma_kernel": [(arr(T.int32, 2), arr(T.int32, 2), *gemm_tail(o)) for o in outs],
    }


LINKS_MMA = {"int8_gemm_mma_kernel"}


@contextlib.contextmanager
def _device_of(cc: tuple[int, int]):
    """numba-cuda compiles a kernel's device functions (``kernels._store``) for the current
    device's compute capability; with no GPU there is none, so name the one being built for."""
    from numba.cuda import dispatcher

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def build(name: str, sig: tuple, cc: tuple[int, int], tiles: TileConfig = PRODUCTION_TILES) -> str:
    """Return ptxas' info log for kernel ``name`` of ``tiles`` built for ``sig`` on compute capability ``cc``."""
    from cuda.core import Linker, LinkerOptions, ObjectCode
    from numba import cuda
    from numba.cuda.cudadrv import nvrtc

    from . import kernels, mma

    with _device_of(cc):
        kernel = getattr(kernels.build(tiles), name)
        ltoir, _ = cuda.compile(kernel.py_func, sig, cc=cc, device=False, abi="numba", output="ltoir")
    parts = [ObjectCode.from_ltoir(ltoir)]
    if name in LINKS_MMA:
        with open(mma.MMA_SOURCE) as f:
            parts.append(nvrtc.compile(f.read(), "mma_s8_16x8x32.cu", cc, ltoir=True)[0])
    linker = Linker(*parts, options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", link_time_optimization=True, verbose=True))
    linker.link("cubin")
    return linker.get_info_log()


def resources(log: str) -> dict:
    """Registers, spill bytes and stack bytes from ptxas' info log."""

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuda_kernels.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cc", nargs="+", default=["8.0", "9.0"], help="compute capabilities (default: 8.0 9.0)")
    args = p.parse_args(argv)
    try:
        import numba

        if numba.config.ENABLE_CUDASIM:
            print("cuda_kernels.check: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")
            return 2
        import cuda.core  # noqa: F401  (numba-cuda's dependency: NVRTC and nvJitLink bindings)
        import numba_cuda  # noqa: F401
    except ImportError as e:
        print(
            f"cuda_kernels.check: needs numba-cuda and the CUDA 12 toolkit wheels (pip install 'outliers[cuda]'): {e}"
        )
        return MISSING
    ccs = [tuple(int(v) for v in c.split(".")) for c in args.cc]
    print(f"building {PRODUCTION_TILES}")
    failed = 0
    for cc in ccs:
        for name, sigs in signatures().items():
            for sig in sigs:
                out = f", out {str(sig[-2].dtype).replace('int16', 'bfloat16 bits')}" if "gemm" in name else ""
                label = f"sm_{cc[0]}{cc[1]}  {name}({sig[0].dtype}{out})"
                try:
                    r = resources(build(name, sig, cc))
                except Exception as e:  # report every kernel, then fail
                    failed += 1
                    print(f"FAIL {label}\n     {type(e).__name__}: {str(e).strip()[:2000]}")
                    continue
                spills = r["spill_stores"] + r["spill_loads"]
                failed += bool(spills)
                print(
                    f"{'SPILL' if spills else 'ok  '} {label}: {r['registers']} registers, "
                    f"{r['stack']} B stack, {spills} B spilled"
                )
    print(f"{'all kernels built' if not failed else f'{failed} failed'} for " + ", ".join(f"sm_{a}{b}" for a, b in ccs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
