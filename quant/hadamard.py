"""Hadamard matrices by construction, their randomized orthonormal form, and the fast transform.

Constructions (integer ±1 matrices, H Hᵀ = n I):
- Sylvester: H_2n = [[H, H], [H, -H]], orders 2^k;
- Paley I: q prime, q ≡ 3 (mod 4): order q + 1 (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...);
- Paley II: q prime, q ≡ 1 (mod 4): order 2(q + 1) (12, 28, 36, 60, 76, 84, 108, ...);
- Kronecker products of the above, so n = m · 2^k whenever an order m · 2^j (j ≤ k) is
  constructible (576 = 36 · 16, 1536 = 12 · 128, 14336 = 28 · 512). LLaMA-2's 11008 = 43 · 256
  finds no small factor here (172 needs a Williamson construction) and gets 5504 · 2.
Orders with no construction here (not a multiple of 4, or no prime fits) get a seeded random
orthogonal matrix instead (`random_orthogonal`), and `has_hadamard(n)` says which applies.
Source of the constructions: R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) over GF(q), q prime (χ = the quadratic character, χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # (q, q): j - i mod q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for prime q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(n, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for prime q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] symmetric conference
    matrix; H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(C, A) + torch.kron(torch.eye(n, dtype=torch.int64), B)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _base_order(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Sylvester or one Paley construction, else None."""
    if m & (m - 1) == 0:
        return _sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@lru_cache(maxsize=None)
def _factorization(n: int) -> tuple[int, int] | None:
    """(m, p): n = m · p, p a power of two, with a base construction of order m (smallest m)."""
    if n < 1:
        return None
    p = n & -n  # the largest power of two dividing n
    odd = n // p
    j = 0
    while (1 << j) <= p:
        m = odd << j
        if _base_order(m) is not None:
            return m, n // m
        j += 1
    return None


def has_hadamard(n: int) -> bool:
    return _factorization(n) is not None


@lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> torch.Tensor:
    fac = _factorization(n)
    if fac is None:
        raise ValueError(f"no Hadamard construction of order {n} is known here; use random_orthogonal({n}, seed) instead")
    m, p = fac
    return torch.kron(_base_order(m), _sylvester(p))


def hadamard_matrix(n: int) -> torch.Tensor:
    """An integer (int64) Hadamard matrix of order n: entries ±1, H Hᵀ = n I."""
    return _hadamard_cached(n).clone()


def hadamard_factors(n: int) -> tuple[torch.Tensor, int]:
    """(H_m as int64 (m, m), p): H_n = H_m ⊗ H_p with p a power of two (Sylvester), so the
    transform is a small dense matmul times a fast Walsh–Hadamard transform of size p."""
    fac = _factorization(n)
    if fac is None:
        raise ValueError(f"no Hadamard construction of order {n} is known here")
    m, p = fac
    return _base_order(m), p


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded Haar-random orthogonal (n, n) matrix (QR of a Gaussian with the sign fix)."""
    g = torch.Generator().manual_seed(int(seed))
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal diag(s) · H / sqrt(n) with seeded random signs s (QuaRot's randomized
    Hadamard); the seeded random orthogonal matrix when no Hadamard of order n is known."""
    if not has_hadamard(n):
        return random_orthogonal(n, seed, dtype)
    H = hadamard_matrix(n).to(torch.float64) / math.sqrt(n)
    return (random_signs(n, seed)[:, None] * H).to(dtype)


def random_block_hadamard(n: int, seed: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal diag(s) · (I_{n/b} ⊗ H_b) / sqrt(b): a randomized Hadamard inside each block of
    `block` consecutive channels (the block rotations MXFP4/NVFP4 need: a rotation mixing no two
    scale groups keeps each group's power-of-two / E4M3 scale fitted; BRQ, arXiv 2511.04214).
    The signs are `random_signs(n, seed)`, as the full rotation's."""
    check_block(n, block)
    H = hadamard_matrix(block).to(torch.float64) / math.sqrt(block)
    Q = torch.kron(torch.eye(n // block, dtype=torch.float64), H)
    return (random_signs(n, seed)[:, None] * Q).to(dtype)


def check_block(n: int, block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or n % block or not has_hadamard(block):
        raise ValueError(f"a block rotation of {block!r} channels needs a Hadamard order that divides {n} "
                         "(e.g. 16, 32, 64 or 128)")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dim (a power of two):
    x @ H_p for the Sylvester H_p, in O(p log p)."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {p}")
    shape = x.shape
    y = x.reshape(-1, p)  # (rows, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)  # (rows, blocks, 2, h): pairs (a, b) at distance h
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(shape)


DENSE_ROWS = 16  # up to this many rows, X H_p is one matmul with the cached ±1 matrix instead of log2(p) butterflies


@lru_cache(maxsize=16)
def _sylvester_on(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(p).to(device=device, dtype=dtype)  # (p, p) ±1, Sylvester order: fwht(x) == x @ it


def hadamard_transform(x: torch.Tensor, Hm: torch.Tensor | None = None, p: int | None = None) -> torch.Tensor:
    """x @ (H_m ⊗ H_p) / sqrt(m p) over the last dim, without building the full matrix.

    With x viewed as X (m, p) (row-major index a·p + b): x (A ⊗ B) = Aᵀ X B, B = H_p via fwht, or, for up
    to `DENSE_ROWS` rows of x (decode), via one matmul with the ±1 matrix H_p: the butterflies' 3 log2(p)
    small ops cost ~0.1 ms a call in eager torch (QuaRot W4A4 decode on SmolLM2: 3 transforms a layer,
    ~9 ms of a token) against ~10 us. The two sum in different orders (fp32 rounding apart); a given
    shape always takes the same one, so the simulated and the packed model agree.
    """
    n = x.shape[-1]
    if Hm is None:
        Hm, p = hadamard_factors(n)
    m = Hm.shape[0]
    X = x.reshape(*x.shape[:-1], m, p)  # (..., m, p)
    if p > 1 and x.numel() <= DENSE_ROWS * n:
        X = torch.matmul(X, _sylvester_on(p, X.dtype, X.device))  # X B
    else:
        X = fwht(X)  # X B
    if m > 1:
        X = torch.matmul(Hm.to(x.dtype).t(), X)  # Aᵀ (X B)
    return X.reshape(x.shape) / math.sqrt(n)
