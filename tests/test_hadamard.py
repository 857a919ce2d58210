import math

import pytest
import torch

from lmpress.quant.hadamard import (
    fwht, hadamard_factors, hadamard_matrix, hadamard_transform, has_hadamard, random_hadamard, random_orthogonal,
)

# every order the supported models need (head dims, hidden sizes, FFN sizes) plus small Paley orders
ORDERS = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 60, 64, 96, 128, 576, 1536, 3072, 4096, 14336]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_orthogonal_in_integers(n):
    if n > 4096:  # big orders: check the factors (H = H_m ⊗ H_p is orthogonal iff both are)
        Hm, p = hadamard_factors(n)
        m = Hm.shape[0]
        Hf = Hm.to(torch.float64)
        assert m * p == n and set(Hm.unique().tolist()) <= {-1, 1}
        assert torch.equal(Hf @ Hf.T, m * torch.eye(m, dtype=torch.float64))
        return
    H = hadamard_matrix(n)
    assert H.dtype == torch.int64 and set(H.unique().tolist()) <= {-1, 1}
    if n <= 1536:  # float64 products of ±1 entries are exact integers at these sizes
        Hf = H.to(torch.float64)
        assert torch.equal(Hf @ Hf.T, n * torch.eye(n, dtype=torch.float64))
    else:
        Hf = H.to(torch.float64)
        assert torch.equal(Hf @ Hf.T, n * torch.eye(n, dtype=torch.float64))


def test_no_construction_falls_back_to_random_orthogonal():
    for n in (6, 10, 14, 18, 100):
        assert not has_hadamard(n)
        Q = random_hadamard(n, seed=3)
        assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(Q, random_orthogonal(n, seed=3))
    with pytest.raises(ValueError, match="no Hadamard construction of order 6"):
        hadamard_matrix(6)


@pytest.mark.parametrize("n", [12, 64, 96, 576])
def test_random_hadamard_orthonormal_and_seeded(n):
    Q = random_hadamard(n, seed=0)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_hadamard(n, seed=0)) and not torch.equal(Q, random_hadamard(n, seed=1))


@pytest.mark.parametrize("n", [1, 2, 16, 12, 96, 576, 1536])
def test_fast_transform_equals_dense(n):
    for rows in (3 * 5, 3 * 7):  # up to DENSE_ROWS rows: H_p as one matmul; above: the butterflies
        x = torch.randn(3, rows // 3, n, dtype=torch.float64)
        dense = x @ hadamard_matrix(n).to(torch.float64) / math.sqrt(n)
        assert torch.allclose(hadamard_transform(x), dense, atol=1e-10)
    if n & (n - 1) == 0:
        assert torch.allclose(fwht(x), x @ hadamard_matrix(n).to(torch.float64), atol=1e-10)


@pytest.mark.parametrize("size,seed", [(64, 3), (12, None), (256, 0), (576, 1)])
def test_online_hadamard_forward_is_its_matrix_at_decode_and_prefill_rows(size, seed):
    """A few rows (decode: one dense matmul by Q for a head-sized transform, `SMALL_DENSE`) and many rows (the
    fast transform) both compute x @ Q (float64, tight)."""
    from lmpress.kernels.online import OnlineHadamard

    h = OnlineHadamard(size, seed)
    Q = h.matrix(torch.float64)
    for rows in (3, 40):
        x = torch.randn(rows, size, dtype=torch.float64)
        assert torch.allclose(h(x), x @ Q, atol=1e-12)
