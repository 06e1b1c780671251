"""Orthonormal bases: CGS2, merging with truncation by rank and energy, the randomized path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsafe.subspace import cgs2, merge_basis, orthogonality_error


def empty_basis(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, n), torch.zeros(0)


def stacked(U: torch.Tensor, sigma: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """[diag(sigma) U; samples] in float64: the matrix a merge summarises."""
    return torch.cat([sigma.double()[:, None] * U.double(), samples.double()])


def captured(M: torch.Tensor, B: torch.Tensor) -> float:
    """Fraction of |M|_F^2 inside span of the rows of B."""
    return float((M @ B.double().T).pow(2).sum() / M.pow(2).sum())


def exact_rank(M: torch.Tensor, rank: int, energy: float) -> tuple[int, torch.Tensor]:
    """What an exact truncated SVD keeps, and all singular values of M."""
    s = torch.linalg.svdvals(M)
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    nonzero = int((s > 1e-6 * s[0]).sum())
    needed = int((frac < energy - 1e-12).sum()) + 1
    return min(rank, nonzero, needed), s


# ---------------------------------------------------------------- orthogonality_error


def test_orthogonality_error():
    assert orthogonality_error(torch.zeros(0, 5)) == 0.0
    assert orthogonality_error(torch.eye(4)[:3]) == 0.0
    U = torch.eye(3, dtype=torch.float64)
    U[0, 1] = 1e-3  # |U U^T - I| has off-diagonal 1e-3 and diagonal 1e-6
    assert orthogonality_error(U) == pytest.approx(1e-3, rel=1e-9)
    assert orthogonality_error(2 * torch.eye(2)) == pytest.approx(3.0)


# ---------------------------------------------------------------- cgs2


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([3, 17, 300]),
    k=st.integers(0, 3),
    m=st.integers(1, 4),
)
def test_cgs2_decomposition(seed, n, k, m):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].T.float()
    k = U.shape[0]
    V = torch.randn(m, n, generator=gen)
    Q, C_U, C_Q = cgs2(U, V)
    assert Q.shape == (m, n) and C_U.shape == (m, k) and C_Q.shape == (m, m)
    # V = C_U U + C_Q Q
    rec = C_U.double() @ U.double() + C_Q.double() @ Q.double()
    assert float((rec - V.double()).norm()) <= 1e-5 * float(V.double().norm())
    assert torch.equal(C_Q, torch.tril(C_Q))
    live = Q.norm(dim=1) > 0
    # new rows orthonormal among themselves and to U
    both = torch.cat([U, Q[live]])
    assert orthogonality_error(both) <= 1e-5
    if n >= k + m:  # generic samples are independent: none dropped
        assert bool(live.all())
    else:
        assert int(live.sum()) == n - k


def test_cgs2_sample_in_span_gives_zero_row():
    gen = torch.Generator().manual_seed(3)
    n = 500
    U = torch.linalg.qr(torch.randn(n, 6, generator=gen, dtype=torch.float64))[0].T.float()
    inside = (torch.randn(1, 6, generator=gen) @ U).float()
    V = torch.cat([torch.randn(1, n, generator=gen), inside, torch.zeros(1, n)])
    V[2] = 2.0 * V[0] - V[1]  # the third is in span(U, V0)
    Q, C_U, C_Q = cgs2(U, V)
    assert float(Q[0].norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(Q[1].abs().max()) == 0.0 and float(C_Q[1, 1]) == 0.0
    assert float(Q[2].abs().max()) == 0.0 and float(C_Q[2, 2]) == 0.0
    rec = C_U.double() @ U.double() + C_Q.double() @ Q.double()
    assert float((rec - V.double()).norm()) <= 1e-5 * float(V.double().norm())


def test_cgs2_nearly_parallel_stays_orthogonal():
    """A sample 1e-4 off span(U): one Gram-Schmidt pass in fp32 would leave ~1e-3 overlap."""
    gen = torch.Generator().manual_seed(4)
    n = 500
    U = torch.linalg.qr(torch.randn(n, 16, generator=gen, dtype=torch.float64))[0].T.float()
    V = torch.randn(3, 16, generator=gen) @ U + 1e-4 * torch.randn(3, n, generator=gen)
    Q, _, _ = cgs2(U, V)
    assert bool((Q.norm(dim=1) > 0.5).all())
    assert orthogonality_error(torch.cat([U, Q])) <= 1e-5


# ---------------------------------------------------------------- merge_basis, exact path


def check_merge(U, sigma, samples, B, s, *, rank, energy):
    """The invariants of one exact merge, against torch.linalg.svd of the same matrix."""
    M = stacked(U, sigma, samples)
    r, s_exact = exact_rank(M, rank, energy)
    total = float((s_exact**2).sum())
    assert B.dtype == torch.float32 and B.shape[1] == M.shape[1]
    assert 1 <= B.shape[0] <= rank
    assert s.shape == (B.shape[0],)
    assert orthogonality_error(B) <= 1e-5
    assert B.shape[0] == r
    # the returned energies are the leading singular values
    torch.testing.assert_close(s.double(), s_exact[:r], rtol=1e-4, atol=1e-6 * float(s_exact[0]))
    got = captured(M, B)
    assert got == pytest.approx(float((s_exact[:r] ** 2).sum()) / total, rel=1e-4)
    if r < rank:
        # enough energy, and one fewer direction would not be
        assert got >= energy - 1e-5
        assert float((s_exact[: r - 1] ** 2).sum()) / total < energy
    return got


@pytest.mark.parametrize("energy", [1.0, 0.97])
def test_many_successive_merges(energy):
    gen = torch.Generator().manual_seed(0)
    n, rank = 500, 16
    # samples from a subspace of dimension 24 with a decaying spectrum, plus a little noise
    basis = torch.linalg.qr(torch.randn(n, 24, generator=gen, dtype=torch.float64))[0].T
    spectrum = 0.8 ** torch.arange(24, dtype=torch.float64)
    U, sigma = empty_basis(n)
    for step in range(30):
        m = int(torch.randint(1, 4, (1,), generator=gen))
        coeff = torch.randn(m, 24, generator=gen, dtype=torch.float64) * spectrum
        noise = 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        samples = (coeff @ basis + noise).float()
        B, s = merge_basis(U, sigma, samples, rank=rank, energy=energy)
        check_merge(U, sigma, samples, B, s, rank=rank, energy=energy)
        U, sigma = B, s
    assert U.shape[0] == rank or energy < 1.0


def test_merge_ill_conditioned_and_in_span():
    gen = torch.Generator().manual_seed(1)
    n, rank = 500, 16
    U, sigma = merge_basis(*empty_basis(n), torch.randn(8, n, generator=gen), rank=rank)
    for step in range(20):
        c = torch.randn(2, U.shape[0], generator=gen)
        if step % 2:
            # exactly inside the span (up to fp32 rounding): no new direction
            samples = c @ U
            B, s = merge_basis(U, sigma, samples, rank=rank)
            assert B.shape[0] == U.shape[0]
        else:
            # nearly parallel to the existing basis
            samples = c @ U + 1e-4 * torch.randn(2, n, generator=gen)
            B, s = merge_basis(U, sigma, samples, rank=rank)
        check_merge(U, sigma, samples, B, s, rank=rank, energy=1.0)
        U, sigma = B, s


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(0, 10),
    m=st.integers(1, 12),
    rank=st.integers(1, 12),
    energy=st.sampled_from([0.5, 0.8, 0.9, 0.99, 1.0]),
)
def test_merge_rank_and_energy(seed, k, m, rank, energy):
    gen = torch.Generator().manual_seed(seed)
    n = 120
    if k:
        U = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].T.float()
        sigma = torch.sort(torch.rand(k, generator=gen) * 5 + 0.1, descending=True).values
    else:
        U, sigma = empty_basis(n)
    decay = 0.7 ** torch.arange(m, dtype=torch.float32)
    samples = torch.randn(m, n, generator=gen) * decay[:, None]
    B, s = merge_basis(U, sigma, samples, rank=rank, energy=energy)
    check_merge(U, sigma, samples, B, s, rank=rank, energy=energy)


def test_merge_known_values():
    U = torch.tensor([[1.0, 0.0, 0.0]])
    sigma = torch.tensor([3.0])
    samples = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    B, s = merge_basis(U, sigma, samples, rank=3)
    torch.testing.assert_close(s, torch.tensor([4.0, 3.0, 1.0]))
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(B.abs(), expected)
    # energy 16/26 < 0.6 < 25/26: two directions; rank 1 caps it to one
    assert merge_basis(U, sigma, samples, rank=3, energy=0.9)[0].shape[0] == 2
    assert merge_basis(U, sigma, samples, rank=3, energy=0.6)[0].shape[0] == 1
    assert merge_basis(U, sigma, samples, rank=1)[0].shape[0] == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"rank": 0},
        {"rank": -2},
        {"rank": 4, "energy": 0.0},
        {"rank": 4, "energy": 1.5},
        {"rank": 4, "energy": -0.1},
        {"rank": 4, "energy": float("nan")},
    ],
)
def test_merge_bad_arguments(kw):
    with pytest.raises(ValueError):
        merge_basis(*empty_basis(10), torch.randn(2, 10), **kw)


# ---------------------------------------------------------------- merge_basis, randomized path


def decaying(gen, m, n, power):
    """m x n with singular values i^-power (i = 1..m) and random singular vectors."""
    L = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0]
    s = torch.arange(1, m + 1, dtype=torch.float64) ** -power
    return (L * s) @ R.T


@pytest.mark.parametrize("k", [0, 6])
def test_randomized_path(k):
    gen = torch.Generator().manual_seed(7)
    n, rank = 500, 10
    if k:
        U, sigma = merge_basis(*empty_basis(n), decaying(gen, k, n, 1.0).float(), rank=k)
    else:
        U, sigma = empty_basis(n)
    samples = decaying(gen, 40, n, 2.0).float()
    B, s = merge_basis(U, sigma, samples, rank=rank, svd_threshold=4)
    M = stacked(U, sigma, samples)
    s_exact = torch.linalg.svdvals(M)
    assert B.shape == (rank, n)
    assert orthogonality_error(B) <= 1e-5
    best = float((s_exact[:rank] ** 2).sum() / (s_exact**2).sum())
    assert captured(M, B) == pytest.approx(best, rel=1e-2)
    torch.testing.assert_close(s.double(), s_exact[:rank], rtol=1e-2, atol=0.0)


def test_randomized_path_energy_threshold_fast_decay():
    """Fast decay: the oversampled sketch holds almost all the energy, so the cut is right."""
    gen = torch.Generator().manual_seed(8)
    n = 400
    samples = decaying(gen, 40, n, 2.0).float()
    B, _ = merge_basis(*empty_basis(n), samples, rank=30, energy=0.99, svd_threshold=4)
    M = samples.double()
    r, _ = exact_rank(M, 30, 0.99)
    assert B.shape[0] == r
    assert captured(M, B) >= 0.99 - 1e-4


def test_randomized_path_energy_threshold_slow_decay():
    gen = torch.Generator().manual_seed(0)
    n = 500
    samples = decaying(gen, 40, n, 0.5).float()  # sigma_i^2 = 1/i: a heavy tail
    B, _ = merge_basis(*empty_basis(n), samples, rank=24, energy=0.8, svd_threshold=4)
    assert captured(samples.double(), B) >= 0.8 - 1e-3
