"""Hadamard matrices for QuaRot-style rotations: int8 ±1 matrices and seeded orthogonal rotations.

A Hadamard matrix H of order n has entries ±1 and ``H @ H.T = n I``; orders other
than 1 and 2 are multiples of 4. A rotation (QuaRot, Ashkboos et al. 2024,
arXiv 2404.00456; SpinQuant, Liu et al. 2024) multiplies a linear's input by the
orthogonal ``Q = diag(s) H / sqrt(n)`` (random signs s, applied first) and its weight by ``Q.T``:
``(x @ Q) @ (Q.T @ W) = x @ W`` in exact arithmetic, and a one-hot outlier ``c e_i``
becomes ``c Q[i]``, every entry of size ``|c| / sqrt(n)``.

Constructions (built here from the math):

``sylvester(2^k)``  Sylvester 1867, "Thoughts on inverse orthogonal matrices ...",
                    Phil. Mag. 34: ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]`` (Walsh–Hadamard).
``paley1(q)``       Paley 1933, "On orthogonal matrices", J. Math. Phys. 12: order q + 1
                    for a prime q ≡ 3 (mod 4). With the Jacobsthal matrix
                    ``Q[i, j] = χ(j - i)`` (χ the Legendre symbol mod q, skew here),
                    ``S = [[0, 1ᵀ], [-1, Q]]`` is skew with ``S Sᵀ = q I``, and H = I + S.
``paley2(q)``       Paley 1933: order 2(q + 1) for a prime q ≡ 1 (mod 4). Q is symmetric,
                    ``C = [[0, 1ᵀ], [1, Q]]`` is a symmetric conference matrix, and
                    ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.
``A⊗sylvester(2^k)``  the Kronecker product of two Hadamard matrices is one; QuaRot
                    rotates sizes n = m·2^k by ``H_m ⊗ H_{2^k}`` (a stored H_m, the
                    fast Walsh–Hadamard transform for the power of two).

``hadamard_matrix`` writes n = m·2^k and takes the smallest m with a construction
above (the smaller the dense factor, the cheaper a structured application).
Primes are enough for the toolkit's models; Paley over prime powers (GF(25) -> 52,
GF(49) -> 100) and Williamson-type matrices (92, 116, 156, QuaRot's 172) are not built:
those sizes raise, and ``random_hadamard`` falls back to ``block_hadamard``.

======================  ============  ====================================
model                   size          construction
======================  ============  ====================================
SmolLM2-135M            576 hidden    paley2(17)⊗sylvester(16)
                        1536 MLP      paley1(11)⊗sylvester(128)
Gemma-3-270M            640 hidden    paley1(19)⊗sylvester(32)
                        2048 MLP      sylvester(2048)
Qwen2.5-0.5B            896 hidden    paley2(13)⊗sylvester(32)
                        4864 MLP      paley2(37)⊗sylvester(64)
Qwen2.5-1.5B            1536 hidden   paley1(11)⊗sylvester(128)
                        8960 MLP      paley1(139)⊗sylvester(64)
head dims               64, 128, 256  sylvester
tiny test models        32, 64, 128   sylvester
                        48, 96        paley1(11)⊗sylvester(4), (8)
======================  ============  ====================================

Matrices are int8 (an 8960² one is 80 MB; float64 would be 640 MB); rotations are float64.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from outliers.errors import InvalidArgumentError

__all__ = ["hadamard_matrix", "kronecker_factors", "block_hadamard", "random_hadamard"]

_H2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n must be a positive int, got n = {n!r}")


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    d = 2
    while d * d <= q:
        if q % d == 0:
            return False
        d += 1
    return True


def _sylvester(n: int) -> torch.Tensor:
    """(n, n) int8 Sylvester matrix, n a power of two."""
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.kron(_H2, h)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) int8 ``Q[i, j] = χ(j - i)``: +1 for a nonzero square mod q, -1 for a non-square, 0 on the diagonal."""
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[0] = 0
    chi[torch.arange(1, q) ** 2 % q] = 1
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, sign: int) -> torch.Tensor:
    """(q + 1, q + 1) int8 ``[[0, 1ᵀ], [sign·1, Q]]``: skew for sign -1 (q ≡ 3), symmetric for +1 (q ≡ 1)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:] = 1
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley1(q: int) -> torch.Tensor:
    return _conference(q, -1) + torch.eye(q + 1, dtype=torch.int8)


def _paley2(q: int) -> torch.Tensor:
    diag = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(_conference(q, 1), _H2) + torch.kron(torch.eye(q + 1, dtype=torch.int8), diag)


def _paley_base(m: int) -> tuple[str, int] | None:
    """``(construction, q)`` of a Paley matrix of order m (a multiple of 4), or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1", m - 1
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2", m // 2 - 1
    return None


def _plan(n: int) -> tuple[str, int, int] | None:
    """``(construction, q, 2^k)`` for n = m·2^k with the smallest Paley order m; ``("sylvester", 0, n)``; or None."""
    if n & (n - 1) == 0:
        return "sylvester", 0, n
    m = n // (n & -n)  # the odd part; a Paley order is a multiple of 4
    while m < n:
        m *= 2
        if m % 4 == 0 and (base := _paley_base(m)) is not None:
            return base[0], base[1], n // m
    return None


def kronecker_factors(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return ``(H_a, H_b, name)`` with H_a ⊗ H_b a Hadamard matrix of order n (int8), without building it.

    ``x (H_a ⊗ H_b)`` costs n·(a + b) multiply-adds instead of n²: the Paley factor and a Sylvester one, or for
    a power of two two Sylvester halves (Sylvester's H_{2^k} is H_2's k-fold Kronecker power, so
    H_{2^i} ⊗ H_{2^j} = H_{2^(i+j)}). ``name`` is ``hadamard_matrix(n)``'s.

    Raises:
        InvalidArgumentError: as ``hadamard_matrix``.
    """
    plan = _plan(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    if plan is None:
        hadamard_matrix(n)  # raises, naming what is wrong with n
        raise InvalidArgumentError(f"no Hadamard matrix of order n = {n}")
    kind, q, p = plan
    if kind == "sylvester":
        a = 1 << (n.bit_length() - 1) // 2
        return _sylvester(a), _sylvester(n // a), f"sylvester({n})"
    h = _paley1(q) if kind == "paley1" else _paley2(q)
    return h, _sylvester(p), f"{kind}({q})" + (f"⊗sylvester({p})" if p > 1 else "")


@lru_cache(maxsize=16)
def _build(n: int) -> tuple[torch.Tensor, str]:
    plan = _plan(n)
    if plan is None:
        raise InvalidArgumentError(
            f"no Hadamard matrix of order n = {n} from Sylvester, Paley I/II (prime q) and their Kronecker "
            "products; use block_hadamard(n) or random_hadamard(n, seed=..., allow_blocks=True)"
        )
    kind, q, p = plan
    if kind == "sylvester":
        return _sylvester(n), f"sylvester({n})"
    h = _paley1(q) if kind == "paley1" else _paley2(q)
    if p == 1:
        return h, f"{kind}({q})"
    return torch.kron(h, _sylvester(p)), f"{kind}({q})⊗sylvester({p})"


def hadamard_matrix(n: int) -> tuple[torch.Tensor, str]:
    """Return ``(H, name)``: an (n, n) int8 matrix of ±1 with ``H @ H.T = n I``, and its construction.

    Args:
        n: the order; 1, 2, or a multiple of 4 that is ``m·2^k`` for an m with a
            Paley construction (see the module docstring), or a power of two.

    The name reads like ``"paley2(17)⊗sylvester(16)"``. Built matrices are cached
    by n; each call returns a fresh copy, so the caller may modify it.

    Raises:
        InvalidArgumentError: n not a positive int, n > 2 not a multiple of 4, or
            no construction here reaches n (e.g. 92); the message names n.
    """
    _check_n(n)
    if n > 2 and n % 4:
        raise InvalidArgumentError(f"a Hadamard matrix of order n > 2 needs n % 4 == 0, got n = {n}")
    h, name = _build(n)
    return h.clone(), name


def block_hadamard(n: int, block: int | None = None) -> tuple[torch.Tensor, str]:
    """Return ``(B, name)``: an (n, n) int8 block-diagonal matrix of Sylvester blocks, ``B @ B.T = block·I``.

    The fallback for sizes without a full Hadamard matrix. A block-diagonal
    rotation spreads an outlier only within its block: a one-hot input in dim i
    lands on the ``block`` dims of i's block, each ``1 / sqrt(block)`` of it, and
    the other dims stay zero. Entries off the blocks are 0, so normalize by
    ``sqrt(block)``, not ``sqrt(n)``. The name reads ``"block-diagonal 64×9"``
    (block size × number of blocks).

    Args:
        n: the size.
        block: a power of two >= 2 that divides n; default the largest power
            of two dividing n.

    Raises:
        InvalidArgumentError: n not a positive int, n odd (no block but 1, which
            would rotate nothing), or a block that is no power of two >= 2 dividing n.
    """
    _check_n(n)
    if block is None:
        block = n & -n
        if block == 1:
            raise InvalidArgumentError(f"n = {n} is odd: a block-diagonal Walsh–Hadamard would be 1×1 blocks")
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1) or n % block:
        raise InvalidArgumentError(f"block must be a power of two >= 2 dividing n = {n}, got {block!r}")
    h = torch.kron(torch.eye(n // block, dtype=torch.int8), _sylvester(block))
    return h, f"block-diagonal {block}×{n // block}"


def random_hadamard(n: int, *, seed: int, allow_blocks: bool = True) -> tuple[torch.Tensor, str]:
    """Return ``(Q, name)``: the (n, n) float64 orthogonal rotation ``diag(s) H / sqrt(n)`` and H's construction.

    ``s`` are ±1 signs drawn from a ``torch.Generator`` seeded with ``seed``: the
    same seed gives the same Q. The signs come first (QuaRot): ``H diag(s)`` would only
    flip the signs of the rotated columns, which no symmetric quantizer sees. Rotate row
    vectors as ``x @ Q`` (x of shape ``(tokens, n)``) and the weight ``W`` of ``x @ W`` as
    ``Q.T @ W``.

    Args:
        n: the size.
        seed: the sign seed.
        allow_blocks: where ``hadamard_matrix(n)`` has no construction, use
            ``block_hadamard(n)`` (normalized by sqrt(block); see its docstring
            for what that gives up) instead of raising.

    Raises:
        InvalidArgumentError: as ``hadamard_matrix``, when ``allow_blocks`` is
            False or the block fallback fails too (odd n).
    """
    try:
        h, name = hadamard_matrix(n)
        norm = n
    except InvalidArgumentError:
        if not allow_blocks:
            raise
        h, name = block_hadamard(n)
        norm = n & -n
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return (signs[:, None] / math.sqrt(norm)) * h.to(torch.float64), name
