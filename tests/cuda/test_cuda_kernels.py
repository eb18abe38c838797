"""The Numba CUDA kernels against the CPU reference (``outliers.quant.int8``).

Without a GPU they run in Numba's CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM=1) with the launchers' default there, ``SMALL_TILES``: shapes
stay tiny and are not tile multiples. On a GPU the same tests run unsimulated on CUDA
tensors with ``PRODUCTION_TILES``; test_cuda_tiling.py runs those in the simulator too.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_kernels import PRODUCTION_TILES, SMALL_TILES, KernelArgumentError
from cuda_kernels import device as D
from cuda_kernels import gemm as G
from cuda_kernels import launch as L
from outliers import InvalidArgumentError
from outliers.quant.int8 import int8_vectorwise_quant, llm_int8_matmul, outlier_columns
from outliers.quant.linear import Int8Linear, NonFiniteInputError
from outliers.quant.quantizers import int8_matmul

DEV = "cuda" if D.available() else "cpu"
if DEV == "cpu" and not D.simulated():
    pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)


def planted(rows, cols, outlier_cols=(), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * 2).clamp_(-5.5, 5.5)  # outliers only where planted
    for c in outlier_cols:
        x[::2, c] = 7.5 + torch.rand(len(range(0, rows, 2)), generator=g)
    return x.to(dtype).to(DEV)


def weight(n, k, seed=1):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    cb, scb, _ = int8_vectorwise_quant(w, 0.0)
    return cb.to(DEV), scb.to(DEV)


@pytest.mark.parametrize("rows", [1, 5, 33], ids=lambda r: f"rows={r}")
def test_quantize_rows_is_bit_exact(rows):
    x = planted(rows, 23, outlier_cols=(5, 22))
    got = L.quantize_rows(x, 6.0)
    ref = int8_vectorwise_quant(x.cpu(), 6.0)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    assert torch.equal(got[2].cpu(), ref[2]) and got[2].tolist() == [5, 22]


@pytest.mark.parametrize("case", ["fp16", "no-outliers", "threshold=0", "all-columns-outliers"])
def test_quantize_rows_edge_cases(case):
    if case == "all-columns-outliers":
        x = (torch.full((4, 6), 8.0) * torch.tensor([1.0, -1, 1, -1, 1, 1])).to(DEV)
    else:
        x = planted(
            5,
            23,
            outlier_cols=() if case == "no-outliers" else (3,),
            dtype=torch.float16 if case == "fp16" else torch.float32,
        )
    t = 0.0 if case == "threshold=0" else 6.0
    got = L.quantize_rows(x, t)
    ref = int8_vectorwise_quant(x.cpu(), t)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    assert got[2].tolist() == ([] if ref[2] is None else ref[2].tolist())
    assert torch.equal(L.outlier_columns(x, t).cpu(), outlier_columns(x.cpu(), t))


def test_threshold_compares_in_float32_like_torch(monkeypatch):
    # float32(0.7) < 0.7: a float64 comparison on the GPU would miss this outlier; torch and the
    # CPU path count it. The simulator compares NumPy scalars in float32 either way, so the
    # argument type is checked too.
    x = torch.zeros(3, 5)
    x[1, 2] = 0.7
    x = x.to(DEV)
    launched = []
    real = L._launch
    monkeypatch.setattr(
        L, "_launch", lambda kernel, grid, block, *args: (launched.append(args[1]), real(kernel, grid, block, *args))
    )
    assert L.outlier_columns(x, 0.7).tolist() == outlier_columns(x.cpu(), 0.7).tolist() == [2]
    assert L.quantize_rows(x, 0.7)[2].tolist() == [2]
    assert launched and all(type(t) is np.float32 for t in launched)


@pytest.mark.parametrize("m, k, n", [(5, 23, 7), (33, 23, 7), (1, 23, 7), (17, 40, 19)], ids=lambda v: str(v))
def test_int8_gemm_accumulators_are_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(G.int8_matmul(a.to(DEV), b.to(DEV)).cpu(), int8_matmul(a, b))


def test_gemm_epilogue_dequantizes_adds_bias_and_outliers():
    x = planted(9, 23)
    codes, rs, _ = int8_vectorwise_quant(x.cpu(), 0.0)
    cb, scb = weight(7, 23)
    bias = torch.randn(7)
    xo, wo = torch.randn(9, 2), torch.randn(7, 2)
    got = G.int8_matmul_dequant(codes.to(DEV), cb, rs.to(DEV), scb, bias.to(DEV), xo.to(DEV), wo.to(DEV))
    ref = int8_matmul(codes, cb.cpu()) * (rs[:, None] / 127**2) * scb.cpu() + bias + xo @ wo.t()
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*overflow encountered in cast:RuntimeWarning")  # the simulator's NumPy
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemm", ["simt", "mma"])
def test_epilogue_writes_half_precision_rounded_like_torch(out_dtype, gemm):
    # a = 0 makes out = bias exactly, so chosen float32 values reach the epilogue's rounding:
    # ties to even both ways, overflow, inf, NaN, -0, subnormals, and ordinary values
    f = torch.tensor(
        [
            1.0,
            1 + 2**-8,
            1 + 3 * 2**-8,
            1 + 2**-11,
            1 + 3 * 2**-11,
            3.4e38,
            65519.0,
            65520.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            -0.0,
            1e-40,
            -1e-30,
            0.1,
            -123.456,
        ]
    )
    bias = torch.cat([f, torch.randn(4, generator=torch.Generator().manual_seed(5)) * 100])
    n = bias.numel()
    a = torch.zeros(3, 32, dtype=torch.int8)
    b = torch.ones(n, 32, dtype=torch.int8)
    args = (a.to(DEV), b.to(DEV), torch.ones(3, device=DEV), torch.ones(n, device=DEV), bias.to(DEV))
    got = G.int8_matmul_dequant(*args, out_dtype=out_dtype, gemm=gemm).cpu()
    want = G.int8_matmul_dequant(*args, gemm=gemm).cpu().to(out_dtype)  # float32 out, then torch rounds
    assert got.dtype == out_dtype
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan.any()  # NaN payloads differ between conversions
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), (got, want)


def test_llm_int8_linear_writes_the_asked_dtype():
    x = planted(6, 32, outlier_cols=(3,))
    cb, scb = weight(7, 32)
    ref, _, _ = L.llm_int8_linear(x, cb, scb, None, 6.0)
    for dt in (torch.float16, torch.bfloat16):
        got, _, _ = L.llm_int8_linear(x, cb, scb, None, 6.0, out_dtype=dt)
        assert got.dtype == dt and torch.equal(got, ref.to(dt))
    with pytest.raises(KernelArgumentError, match="out_dtype must be one of"):
        L.llm_int8_linear(x, cb, scb, None, 6.0, out_dtype=torch.float64)


@pytest.mark.parametrize("outliers", [(), (3, 20)], ids=["no-outliers", "two-outlier-cols"])
def test_llm_int8_linear_equals_reference(outliers):
    x = planted(6, 23, outlier_cols=outliers)
    cb, scb = weight(7, 23)
    bias = torch.randn(7, generator=torch.Generator().manual_seed(3))
    out, cols, _ = L.llm_int8_linear(x, cb, scb, bias.to(DEV), 6.0)
    ref, ref_cols = llm_int8_matmul(x.cpu(), cb.cpu(), scb.cpu(), 6.0, bias)
    assert torch.equal(cols.cpu(), ref_cols)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_int8linear_numba_backend_equals_torch_backend():
    torch.manual_seed(0)
    lin = torch.nn.Linear(23, 7)
    x = planted(8, 23, outlier_cols=(4,)).reshape(2, 4, 23)
    a = Int8Linear.from_linear(lin, "llm.int8", backend="torch")(x.cpu())
    q = Int8Linear.from_linear(lin, "llm.int8", backend="numba").to(DEV)
    assert "backend='numba'" in repr(q)
    b = q(x)
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    bad = x.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteInputError):
        q(bad)


def test_launchers_refuse_bad_input(monkeypatch):
    cb, scb = weight(7, 23)
    x = planted(3, 23)
    with pytest.raises(KernelArgumentError, match="a must be torch.int8, got torch.float32"):
        G.int8_matmul(x, cb)
    with pytest.raises(KernelArgumentError, match="inner dimensions differ"):
        G.int8_matmul(cb[:, :20].contiguous(), cb)
    with pytest.raises(KernelArgumentError, match="x is not contiguous"):
        L.quantize_rows(planted(23, 3).t(), 6.0)
    with pytest.raises(KernelArgumentError, match="threshold must be >= 0"):
        L.quantize_rows(x, -1.0)
    with pytest.raises(KernelArgumentError, match="x must be torch.float32 or torch.float16, got torch.int8"):
        L.quantize_rows(cb, 0.0)
    monkeypatch.setattr(D, "simulated", lambda: False)  # read by _check, and by Int8Linear (from device.py)
    with pytest.raises(KernelArgumentError, match="must be a CUDA tensor, got one on cpu"):
        L.quantize_rows(torch.randn(2, 3), 0.0)
    with pytest.raises(InvalidArgumentError, match="backend='numba' needs CUDA tensors"):
        Int8Linear(3, 2, backend="numba")(torch.randn(2, 3))
    with pytest.raises(InvalidArgumentError, match="backend must be one of"):
        Int8Linear(3, 2, backend="triton")


def test_int8linear_names_its_layer_when_a_kernel_refuses_its_arguments(monkeypatch):
    def refuse(*args, **kwargs):
        raise KernelArgumentError("cb must be a CUDA tensor, got one on cpu")

    monkeypatch.setattr(L, "llm_int8_linear", refuse)
    q = Int8Linear.from_linear(torch.nn.Linear(23, 7), "llm.int8", backend="numba", name="model.layers.0.mlp.up_proj")
    with pytest.raises(InvalidArgumentError, match=r"model\.layers\.0\.mlp\.up_proj: cb must be a CUDA tensor"):
        q(planted(4, 23).to(DEV))


def test_launch_reexports_the_gemm_and_device_names():
    # README and benchmarks/gpu_kernels.py reach everything through cuda_kernels.launch
    for name in L.__all__:
        assert hasattr(L, name), name
    assert L.int8_matmul is G.int8_matmul and L.mma_verified is G.mma_verified and L.pick_gemm is G.pick_gemm
    assert L.simulated is D.simulated and L.available is D.available and L.default_tiles is D.default_tiles


# The tensor-core GEMM. Under the simulator, mma runs as an emulation of the PTX fragment
# layout (cuda_kernels/mma.py); on a GPU these same tests run the real instruction.
MMA_SHAPES = [(1, 64, 7), (33, 96, 40), (70, 32, 9)]  # one token; 2 blocks in N and a partial K stage; 2 in M


@pytest.mark.parametrize("m, k, n", MMA_SHAPES, ids=lambda v: str(v))
def test_mma_gemm_accumulators_are_exact(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    b[0] = -127  # the extremes, where a sign or byte-order slip shows most
    a[0, :] = 127
    assert torch.equal(G.int8_matmul(a.to(DEV), b.to(DEV), gemm="mma").cpu(), int8_matmul(a, b))


def test_mma_llm_int8_linear_equals_reference():
    x = planted(17, 64, outlier_cols=(3, 60))
    cb, scb = weight(40, 64)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(3))
    out, cols, _ = L.llm_int8_linear(x, cb, scb, bias.to(DEV), 6.0, gemm="mma")
    ref, ref_cols = llm_int8_matmul(x.cpu(), cb.cpu(), scb.cpu(), 6.0, bias)
    assert torch.equal(cols.cpu(), ref_cols)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_mma_self_check_falls_back_on_wrong_products(monkeypatch):
    real = D.build_kernels  # _kernels (device.py) builds them for gemm.py
    monkeypatch.setattr(G, "_VERIFIED", {})
    assert G.mma_verified()
    monkeypatch.setattr(G, "_VERIFIED", {})

    class Zeros:  # a broken kernel: writes zeros where the products go
        def __getitem__(self, config):
            return lambda *args: (
                args[-1].fill(0) if D.simulated() else args[-1][:].copy_to_device(np.zeros(args[-1].shape, np.int32))
            )

    monkeypatch.setattr(D, "build_kernels", lambda tiles: real(tiles)._replace(int8_gemm_mma_kernel=Zeros()))
    with pytest.warns(RuntimeWarning, match="tensor-core int8 GEMM gave wrong products"):
        assert not G.mma_verified()
    assert not G.mma_verified()  # decided once per device

    class Unbuildable:  # e.g. numba-cuda without NVRTC to compile the linked CUDA C
        def __getitem__(self, config):
            raise RuntimeError("NVRTC not found")

    monkeypatch.setattr(G, "_VERIFIED", {})
    monkeypatch.setattr(D, "build_kernels", lambda tiles: real(tiles)._replace(int8_gemm_mma_kernel=Unbuildable()))
    with pytest.warns(RuntimeWarning, match=r"could not run \(RuntimeError: NVRTC not found\)"):
        assert not G.mma_verified()
    a = torch.ones(20, 32, dtype=torch.int8, device=DEV)
    # as on a GPU: 'auto' consults the self-check (gemm.py), for the default tiles there (device.py)
    monkeypatch.setattr(G, "simulated", lambda: False)
    monkeypatch.setattr(D, "simulated", lambda: False)
    monkeypatch.setattr(G, "mma_supported", lambda device=None: None)
    key = (str(a.device), PRODUCTION_TILES)  # decided per device and tiles; a GPU runs these by default
    G._VERIFIED[key] = False
    assert G.pick_gemm("auto", a, a) == "simt"
    G._VERIFIED[key] = True
    assert G.pick_gemm("auto", a, a) == "mma"
    assert G.pick_gemm("auto", a, a, tiles=SMALL_TILES) == "simt"  # its own check failed above
    assert G.pick_gemm("auto", a[:, :30].contiguous(), a[:, :30].contiguous()) == "simt"  # K % 4 == 2


def test_mma_refuses_what_it_cannot_run():
    a = torch.zeros(3, 10, dtype=torch.int8, device=DEV)
    with pytest.raises(KernelArgumentError, match="words of 4 along K, got K = 10"):
        G.int8_matmul(a, a, gemm="mma")
    assert torch.equal(G.int8_matmul(a, a, gemm="auto").cpu(), torch.zeros(3, 3, dtype=torch.int32))
    shifted = torch.zeros(25, dtype=torch.int8, device=DEV)[1:].view(3, 8)  # contiguous, offset 1 byte
    with pytest.raises(KernelArgumentError, match="starts mid-word"):
        G.int8_matmul(shifted, shifted.clone(), gemm="mma")
    with pytest.raises(KernelArgumentError, match="gemm must be one of"):
        G.int8_matmul(a, a, gemm="wmma")


def test_gpu_benchmark_script_runs_in_the_simulator():
    # a GPU session should spend its minutes measuring, not fixing the script
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu_kernels.py", "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 17 | 32→24 |" in r.stdout and "gemm='auto' (simt here)" in r.stdout
