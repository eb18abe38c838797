import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers.errors import InvalidArgumentError
from outliers.quant import hadamard
from outliers.quant.hadamard import block_hadamard, hadamard_matrix, random_hadamard

# every hidden / MLP / head size the toolkit's models and tiny test models use, and the construction each gets
MODEL_SIZES = {
    32: "sylvester(32)",
    48: "paley1(11)⊗sylvester(4)",
    64: "sylvester(64)",
    96: "paley1(11)⊗sylvester(8)",
    128: "sylvester(128)",
    256: "sylvester(256)",
    576: "paley2(17)⊗sylvester(16)",
    640: "paley1(19)⊗sylvester(32)",
    896: "paley2(13)⊗sylvester(32)",
    1536: "paley1(11)⊗sylvester(128)",
    2048: "sylvester(2048)",
    4864: "paley2(37)⊗sylvester(64)",
    8960: "paley1(139)⊗sylvester(64)",
}
PALEY_SIZES = {
    12: "paley1(11)",
    20: "paley1(19)",
    28: "paley2(13)",
    36: "paley2(17)",
    60: "paley1(59)",
    76: "paley2(37)",
    140: "paley1(139)",
}
NO_CONSTRUCTION = [52, 92, 100, 116, 156]  # multiples of 4 up to 160 that need prime-power Paley or Williamson


def assert_hadamard(h: torch.Tensor, n: int) -> None:
    """H H^T = n I exactly: float32 sums of ±1 products are exact while every partial sum stays below 2^24."""
    assert h.dtype == torch.int8 and h.shape == (n, n)
    assert (h.abs() == 1).all()
    if n <= 2048:
        hf = h.to(torch.float32)
        assert torch.equal(hf @ hf.T, n * torch.eye(n))
        return
    # Freivalds in one pass over row chunks: H^T H r = sum_c H[c]^T (H[c] r) = n r for 32 random ±1 columns
    # (H^T H = n I iff H H^T = n I for square H); a wrong Gram passes each column with probability <= 1/2.
    # A chunk's sums stay below rows * n <= 2^24, so float32 is exact; chunks add up in float64.
    gen = torch.Generator().manual_seed(n)
    r = torch.randint(0, 2, (n, 32), generator=gen).to(torch.float32) * 2 - 1
    z = torch.zeros(n, 32, dtype=torch.float64)
    rows = (1 << 24) // n
    for i in range(0, n, rows):
        hc = h[i : i + rows].to(torch.float32)
        z += (hc.T @ (hc @ r)).to(torch.float64)
    assert torch.equal(z, n * r.to(torch.float64))


@pytest.mark.parametrize("n", list(MODEL_SIZES) + list(PALEY_SIZES), ids=lambda n: f"n={n}")
def test_hadamard_matrix_is_exact_and_named(n):
    h, name = hadamard_matrix(n)
    assert name == {**MODEL_SIZES, **PALEY_SIZES}[n]
    assert_hadamard(h, n)


def test_hadamard_matrix_returns_a_copy_of_the_cached_matrix():
    h, _ = hadamard_matrix(576)
    h.zero_()
    assert_hadamard(hadamard_matrix(576)[0], 576)


def test_8960_builds_and_its_rows_are_orthogonal():
    """Qwen2.5-Coder-1.5B's MLP width; its build time is benchmarks/hadamard_build.py's, not a test's."""
    hadamard._build.cache_clear()
    h, name = hadamard_matrix(8960)
    assert h.shape == (8960, 8960) and (h.abs() == 1).all() and name
    rows = h[torch.randperm(8960, generator=torch.Generator().manual_seed(0))[:64]].float()
    assert torch.equal(rows @ rows.T, 8960 * torch.eye(64))  # exact: integer sums below 2^24


def test_sizes_without_a_construction_are_exactly_the_known_gaps():
    missing = []
    for n in range(4, 161, 4):
        try:
            hadamard_matrix(n)
        except InvalidArgumentError:
            missing.append(n)
    assert missing == NO_CONSTRUCTION


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 170))
def test_any_n_builds_a_hadamard_or_raises(n):
    try:
        h, _ = hadamard_matrix(n)
    except InvalidArgumentError as err:
        assert f"n = {n}" in str(err)
        assert (n > 2 and n % 4) or n in NO_CONSTRUCTION
        return
    assert_hadamard(h, n)


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 9, 52, 92, 100], ids=lambda n: f"n={n}")
def test_bad_sizes_raise_naming_n(n):
    with pytest.raises(InvalidArgumentError, match=rf"n = {n}\b"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [4.0, True, "64"], ids=repr)
def test_non_int_n_raises(n):
    with pytest.raises(InvalidArgumentError, match="positive int"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [48, 140, 576, 640, 184], ids=lambda n: f"n={n}")
def test_random_hadamard_is_orthogonal(n):
    q, _ = random_hadamard(n, seed=0)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("n", [96, 576, 184], ids=lambda n: f"n={n}")
def test_rotation_leaves_the_product_unchanged(n, dtype, atol):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, n, generator=gen, dtype=dtype)
    x[:, 3] *= 100  # an outlier feature
    w = torch.randn(n, 11, generator=gen, dtype=dtype)
    q = random_hadamard(n, seed=2)[0].to(dtype)
    ref = x @ w
    torch.testing.assert_close((x @ q) @ (q.T @ w), ref, rtol=0, atol=atol * ref.abs().max().item())


def test_full_rotation_spreads_a_one_hot_over_all_dims():
    n, c = 576, 1000.0
    q, name = random_hadamard(n, seed=3)
    assert "block" not in name
    x = torch.zeros(n, dtype=torch.float64)
    x[217] = c
    torch.testing.assert_close((x @ q).abs(), torch.full((n,), c / math.sqrt(n), dtype=torch.float64))


def test_block_fallback_spreads_only_within_the_block():
    n, c, i = 184, 1000.0, 45  # 184 = 8·23 has no full construction here
    q, name = random_hadamard(n, seed=3)
    assert name == "block-diagonal 8×23"
    x = torch.zeros(n, dtype=torch.float64)
    x[i] = c
    y = (x @ q).abs()
    inside = torch.zeros(n, dtype=torch.bool)
    inside[40:48] = True
    torch.testing.assert_close(y[inside], torch.full((8,), c / math.sqrt(8), dtype=torch.float64))
    assert (y[~inside] == 0).all()


def test_block_hadamard_blocks():
    b, name = block_hadamard(576, 64)
    assert name == "block-diagonal 64×9" and b.dtype == torch.int8
    assert torch.equal(b.to(torch.float64) @ b.T.to(torch.float64), 64 * torch.eye(576, dtype=torch.float64))
    assert torch.equal(b[64:128, 64:128], hadamard_matrix(64)[0]) and (b[:64, 64:] == 0).all()
    assert block_hadamard(576)[1] == "block-diagonal 64×9"


@pytest.mark.parametrize("n,block", [(576, 3), (576, 12), (576, 128), (576, 1), (9, None)], ids=str)
def test_block_hadamard_rejects_bad_blocks(n, block):
    with pytest.raises(InvalidArgumentError, match=re.escape(f"n = {n}")):
        block_hadamard(n, block)


def test_allow_blocks_false_raises_instead_of_falling_back():
    with pytest.raises(InvalidArgumentError, match=r"n = 92\b"):
        random_hadamard(92, seed=0, allow_blocks=False)
    assert random_hadamard(92, seed=0)[1] == "block-diagonal 4×23"
    with pytest.raises(InvalidArgumentError, match=r"n = 9\b"):
        random_hadamard(9, seed=0)


def test_seed_determines_the_signs():
    q0, _ = random_hadamard(640, seed=0)
    assert torch.equal(q0, random_hadamard(640, seed=0)[0])
    q1, _ = random_hadamard(640, seed=1)
    assert not torch.equal(q0, q1)
    ratio = q0 / q1  # the same H with other row signs (signs first): each row's ratio is one constant ±1
    assert torch.equal(ratio, ratio[:, :1].expand_as(ratio)) and (ratio.abs() == 1).all()


@pytest.mark.parametrize("n", [2, 64, 576, 640, 1536, 2048])
def test_kronecker_factors_are_the_matrix_without_building_it(n):
    from outliers.quant.hadamard import kronecker_factors

    a, b, name = kronecker_factors(n)
    full, full_name = hadamard_matrix(n)
    assert name == full_name and torch.equal(torch.kron(a, b), full)
    assert a.shape[0] + b.shape[0] <= max(n // 4, 2) + 4  # n (a + b) multiply-adds, far below n^2
