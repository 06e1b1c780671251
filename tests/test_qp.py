"""The non-negative QP of the conflict dual against a brute force over every active set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsafe.qp import solve_nonneg_qp, solve_nonneg_qp_batch


def objective(H: np.ndarray, q: np.ndarray, lam: np.ndarray) -> float:
    return float(0.5 * lam @ H @ lam + q @ lam)


def brute_force(H: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum of 1/2 l^T H l + q^T l over l >= 0 by trying every free set.

    For each free set S solve H_SS l_S = -q_S (least squares, so singular blocks are fine) and
    keep the non-negative solutions. The optimum has a minimal-support representative whose
    block is non-singular, so it is among the candidates.
    """
    m = q.shape[0]
    best_lam, best_val = np.zeros(m), 0.0
    for size in range(1, m + 1):
        for S in itertools.combinations(range(m), size):
            idx = list(S)
            sol, *_ = np.linalg.lstsq(H[np.ix_(idx, idx)], -q[idx], rcond=None)
            if np.any(sol < -1e-12 * max(1.0, np.abs(sol).max())):
                continue
            lam = np.zeros(m)
            lam[idx] = np.maximum(sol, 0.0)
            val = objective(H, q, lam)
            if val < best_val:
                best_lam, best_val = lam, val
    return best_lam, best_val


def make_problem(rng: np.random.Generator, m: int, kind: str, n: int = 6):
    """H = B^T B and q = B^T y: bounded below even when B is rank deficient."""
    if kind == "full":
        B = rng.standard_normal((max(n, m), m))
    elif kind == "lowrank":
        r = int(rng.integers(1, m)) if m > 1 else 1
        B = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    elif kind == "duplicate":
        B = rng.standard_normal((n, m))
        if m > 1:
            i, j = rng.choice(m, size=2, replace=False)
            B[:, j] = B[:, i] * rng.uniform(0.5, 2.0)
    else:
        raise AssertionError(kind)
    B *= 10.0 ** rng.uniform(-3, 3)
    y = rng.standard_normal(B.shape[0])
    return B.T @ B, B.T @ y, B


def check_kkt(H, q, lam, scale):
    grad = H @ lam + q
    tol = 1e-7 * scale * max(1.0, np.abs(lam).max()) + 1e-9 * np.abs(q).max()
    assert np.all(lam >= 0.0)
    assert np.all(grad >= -tol), grad
    assert abs(float(lam @ grad)) <= tol * max(1.0, np.abs(lam).sum())


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 5),
    kind=st.sampled_from(["full", "lowrank", "duplicate"]),
)
def test_matches_brute_force_and_kkt(seed, m, kind):
    rng = np.random.default_rng(seed)
    H, q, _ = make_problem(rng, m, kind)
    scale = float(np.max(np.diag(H)))
    lam = solve_nonneg_qp(H, q)
    assert lam.shape == (m,)
    check_kkt(H, q, lam, scale)
    _, best = brute_force(H, q)
    val = objective(H, q, lam)
    # the solver's ridge (1e-10 relative) moves the optimum by far less than this
    assert val == pytest.approx(best, rel=1e-7, abs=1e-9 * scale)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 5))
def test_full_rank_arbitrary_q_solution_unique(seed, m):
    """With H positive definite the minimiser is unique: compare the multipliers themselves."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((m + 3, m))
    H = B.T @ B
    q = rng.standard_normal(m) * 3.0
    lam = solve_nonneg_qp(H, q)
    ref, _ = brute_force(H, q)
    np.testing.assert_allclose(lam, ref, rtol=1e-6, atol=1e-8)


def test_known_solution():
    H = np.array([[2.0, 0.0], [0.0, 1.0]])
    q = np.array([-4.0, 3.0])  # unconstrained minimiser (2, -3): second clipped to zero
    lam = solve_nonneg_qp(H, q)
    np.testing.assert_allclose(lam, [2.0, 0.0], rtol=1e-8, atol=1e-12)


def test_zero_when_q_nonnegative():
    rng = np.random.default_rng(1)
    B = rng.standard_normal((6, 4))
    lam = solve_nonneg_qp(B.T @ B, np.abs(rng.standard_normal(4)))
    np.testing.assert_array_equal(lam, np.zeros(4))


def test_empty():
    assert solve_nonneg_qp(np.zeros((0, 0)), np.zeros(0)).shape == (0,)


@pytest.mark.parametrize("q0", [-3.0, -1e-6, 0.0, 2.5])
def test_m1_closed_form(q0):
    h = 4.0
    lam = solve_nonneg_qp(np.array([[h]]), np.array([q0]))
    np.testing.assert_allclose(lam, [max(-q0, 0.0) / h], rtol=1e-9)
    lam_b = solve_nonneg_qp_batch(np.array([[[h]]]), np.array([[q0]]), np.array([h]))
    np.testing.assert_allclose(lam_b, [[max(-q0, 0.0) / h]], rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 5), batch=st.integers(1, 6))
def test_batch_equals_single(seed, m, batch):
    rng = np.random.default_rng(seed)
    Hs, qs, scales = [], [], []
    for _ in range(batch):
        kind = ["full", "lowrank", "duplicate"][int(rng.integers(3))]
        H, q, _ = make_problem(rng, m, kind)
        Hs.append(H)
        qs.append(q)
        # squared norms of the references before projection: at least the diagonal of H
        scales.append(np.diag(H) * rng.uniform(1.0, 3.0, size=m))
    H, q, norms2 = np.stack(Hs), np.stack(qs), np.stack(scales)
    out = solve_nonneg_qp_batch(H, q, norms2)
    assert out.shape == (batch, m)
    for b in range(batch):
        single = solve_nonneg_qp(H[b], q[b], norms2[b])
        np.testing.assert_allclose(out[b], single, rtol=1e-12, atol=1e-300)
        check_kkt(H[b], q[b], out[b], float(np.max(np.diag(H[b]))))


@pytest.mark.parametrize(
    "H_shape,q_shape",
    [((3, 2), (3,)), ((2, 2), (3,)), ((3, 3, 1), (3,))],
)
def test_bad_shapes_single(H_shape, q_shape):
    with pytest.raises(ValueError):
        solve_nonneg_qp(np.zeros(H_shape), np.zeros(q_shape))


@pytest.mark.parametrize(
    "H_shape,q_shape",
    [((2, 3, 3), (2, 2)), ((2, 3, 3), (3,)), ((3, 3, 3), (2, 3)), ((2, 3, 2), (2, 3))],
)
def test_bad_shapes_batch(H_shape, q_shape):
    with pytest.raises(ValueError):
        solve_nonneg_qp_batch(np.zeros(H_shape), np.zeros(q_shape), np.ones(H_shape[0]))


def test_dependent_references_with_float32_noise_stay_feasible():
    """More references than dimensions (a small tensor in tensor scope) and q measured in fp32.

    H = R R^T is singular; q carries rounding outside its range. The solver must still
    return the closest feasible point, not run along the null space.
    """
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, m = 3, 4 + trial % 3
        R = rng.standard_normal((m, n))
        h = rng.standard_normal(n)
        H = R @ R.T
        q_exact = R @ h
        q_noisy = (R.astype(np.float32) @ h.astype(np.float32)).astype(np.float64)
        lam = solve_nonneg_qp(H, q_noisy, np.diag(H))
        x = h + R.T @ lam
        x_exact = h + R.T @ solve_nonneg_qp(H, q_exact, np.diag(H))
        assert np.all(R @ x >= -1e-5 * np.linalg.norm(h) * np.linalg.norm(R, axis=1))
        np.testing.assert_allclose(x, x_exact, atol=1e-5 * np.linalg.norm(h))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 12), n=st.integers(1, 16), batch=st.integers(1, 4))
def test_branch_free_solver_matches_the_exact_one(seed, m, n, batch):
    """The solver used under torch.compile gives the exact solver's projected vector."""
    from gradsafe.qp import solve_nonneg_qp_branch_free

    rng = np.random.default_rng(seed)
    R = rng.standard_normal((batch, m, n)) * rng.uniform(0.1, 10.0, size=(batch, m, 1))
    if m > 1:
        R[:, 1] = R[:, 0]  # a duplicated reference: singular H
    h = rng.standard_normal((batch, n))
    H = np.einsum("bij,bkj->bik", R, R)
    q = np.einsum("bij,bj->bi", R, h)
    norms2 = np.diagonal(H, axis1=1, axis2=2).copy()
    free = solve_nonneg_qp_branch_free(H, q, norms2)
    for b in range(batch):
        exact = solve_nonneg_qp(H[b], q[b], norms2[b])
        x_exact, x_free = h[b] + R[b].T @ exact, h[b] + R[b].T @ free[b]
        np.testing.assert_allclose(x_free, x_exact, atol=1e-7 * max(1.0, np.linalg.norm(h[b])))
        assert np.all(free[b] >= 0)
