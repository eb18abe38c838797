"""The kernels' tiling is a parameter (``cuda_kernels.TileConfig``), and the production one is tested without a GPU.

The launchers default to ``SMALL_TILES`` under the simulator (quick: it runs every thread of a
block as a Python thread) and to ``PRODUCTION_TILES`` on a GPU. Here the production tiling runs
in the simulator on shapes with partial tiles in M, N and K, bit-exact against the CPU
reference. Its cost grows with blocks x K stages, not with the rows and columns inside a
block, so each shape is one partial block (the SIMT GEMM's tiles are small: two per
dimension) filled far enough that every warp of the tensor-core GEMM holds data.
"""

import pytest
import torch

from cuda_kernels import PRODUCTION_TILES, SMALL_TILES, KernelArgumentError, TileConfig
from cuda_kernels import device as D
from cuda_kernels import gemm as G
from cuda_kernels import launch as L
from outliers.quant.int8 import int8_vectorwise_quant
from outliers.quant.quantizers import int8_matmul

DEV = "cuda" if D.available() else "cpu"
if DEV == "cpu" and not D.simulated():
    pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

P = PRODUCTION_TILES


def test_default_tiles_and_one_build_per_configuration():
    assert D.default_tiles() == (SMALL_TILES if D.simulated() else PRODUCTION_TILES)
    assert P != SMALL_TILES  # else the simulator would test the production tiling everywhere anyway
    from cuda_kernels.kernels import build

    assert build(TileConfig()) is build(P)  # equal configurations share their compiled kernels
    assert build(P).int8_gemm_mma_kernel is not build(SMALL_TILES).int8_gemm_mma_kernel


def test_invalid_tiles_are_refused():
    for bad, match in [
        ({"simt_tile": 0}, "simt_tile must be a positive int"),
        ({"quant_threads": 96}, "power of two"),
        ({"mma_k_words": 12}, "multiple of 8"),
        ({"mma_warps_m": 8, "mma_warps_n": 8}, "threads per block"),
        ({"mma_mt": 8, "mma_nt": 8}, "shared memory"),
    ]:
        with pytest.raises(KernelArgumentError, match=match):
            TileConfig(**bad)
    a = torch.zeros(2, 4, dtype=torch.int8, device=DEV)
    with pytest.raises(KernelArgumentError, match="tiles must be a TileConfig, got dict"):
        G.int8_matmul(a, a, tiles={"simt_tile": 8})
    assert issubclass(KernelArgumentError, ValueError)


def _ints(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    a[0, :] = 127  # the extremes, where a sign or byte-order slip shows most
    b[0] = -127
    return a, b


def test_production_simt_gemm_is_exact_on_partial_tiles():
    t = P.simt_tile
    m, k, n = t + 1, t + 4, t + 2  # 2 x 2 blocks and 2 K steps, each second one partial
    a, b = _ints(m, k, n, seed=1)
    assert torch.equal(G.int8_matmul(a.to(DEV), b.to(DEV), gemm="simt", tiles=P).cpu(), int8_matmul(a, b))


def test_production_mma_gemm_is_exact_on_partial_tiles():
    # one block: the last warp row's last m16 tile holds 5 of its rows, the last warp column's
    # last n8 tile 3 of its columns; one K stage of 12 of its 16 words (the second k32 step half full)
    m, k, n = P.mma_bm - 11, 4 * (P.mma_k_words - 4), P.mma_bn - 5
    assert m > P.mma_bm - 16 * P.mma_mt and n > P.mma_bn - 8 * P.mma_nt  # data reaches every warp
    a, b = _ints(m, k, n, seed=2)
    assert torch.equal(G.int8_matmul(a.to(DEV), b.to(DEV), gemm="mma", tiles=P).cpu(), int8_matmul(a, b))


def test_production_quantize_rows_is_bit_exact_on_a_partial_block():
    rows, cols = 3, P.quant_threads + 5  # each thread's second column exists for 5 threads only
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(rows, cols, generator=g) * 2).clamp_(-5.5, 5.5)
    x[::2, [7, cols - 2]] = 7.5  # outlier columns on both sides of quant_threads
    x[1, cols - 1] = -5.5  # the row's absmax sits in the partial part
    got = L.quantize_rows(x.to(DEV), 6.0, tiles=P)
    ref = int8_vectorwise_quant(x, 6.0)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    assert got[2].tolist() == ref[2].tolist() == [7, cols - 2]
