"""The non-negative QP of the conflict dual: against a brute force over every active set, against
quadprog on GEM's primal, its KKT conditions, and its invariance to the scale of each reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsafe import ProtectedOptimizer
from gradsafe.qp import solve_nonneg_qp, solve_nonneg_qp_batch
from gradsafe.surgery import conflict_project, joint_surgery


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


# ---------------------------------------------------------------- non-finite input and options


def test_non_finite_input_gives_nan():
    H = np.array([[2.0, 0.5], [0.5, 1.0]])
    for bad_q, bad_H in (([np.nan, -1.0], H), ([-1.0, -1.0], np.where(np.eye(2) > 0, H, np.inf))):
        assert np.isnan(solve_nonneg_qp(bad_H, np.array(bad_q))).all()
        out = solve_nonneg_qp_batch(np.stack([H, bad_H]), np.array([[-1.0, -1.0], bad_q]), np.ones((2, 2)))
        assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_bad_ref_norms2_and_warm_start_shapes():
    H, q = np.eye(3), -np.ones(3)
    with pytest.raises(ValueError, match="ref_norms2"):
        solve_nonneg_qp(H, q, np.ones(2))
    with pytest.raises(ValueError, match="warm_start"):
        solve_nonneg_qp(H, q, warm_start=np.ones(4, dtype=bool))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 40), kind=st.sampled_from(["full", "rankdef"]))
def test_warm_start_does_not_change_the_projection(seed, m, kind):
    """Any guess of the binding set (right, wrong, empty, everything) gives the same primal."""
    rng = np.random.default_rng(seed)
    n = m + 3 if kind == "full" else max(1, m // 2)
    R = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-4, 4, size=(m, 1))
    g = rng.standard_normal(n)
    H, q = R @ R.T, R @ g
    x = g + R.T @ solve_nonneg_qp(H, q)
    exact_set = solve_nonneg_qp(H, q) > 0
    for guess in (exact_set, ~exact_set, np.zeros(m, bool), np.ones(m, bool), rng.random(m) < 0.5):
        lam = solve_nonneg_qp(H, q, warm_start=guess)
        np.testing.assert_allclose(g + R.T @ lam, x, rtol=0, atol=1e-9 * np.linalg.norm(g))
    batch = solve_nonneg_qp_batch(H[None], q[None], np.diag(H)[None], warm_start=exact_set[None])
    np.testing.assert_allclose(g + R.T @ batch[0], x, rtol=0, atol=1e-9 * np.linalg.norm(g))


# ---------------------------------------------------------------- scale invariance (regressions)


def test_tiny_orthogonal_reference_keeps_its_constraint_reference_operator():
    """A reference 1e-6 the size of another, orthogonal to it, used to be dropped as degenerate."""
    g = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)
    R = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-6, 0.0]], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(conflict_project(g, R), expected, rtol=0, atol=1e-12)
    assert torch.allclose(joint_surgery(g, references=[R]), expected, rtol=0, atol=1e-12)
    # the solver alone, with and without the squared norms
    H, q = (R @ R.T).numpy(), (R @ g).numpy()
    for norms2 in (None, np.diag(H)):
        lam = solve_nonneg_qp(H, q, norms2)
        np.testing.assert_allclose(g.numpy() + R.numpy().T @ lam, expected.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_orthogonal_reference_keeps_its_constraint_through_the_optimizer(dtype):
    param = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    opt = ProtectedOptimizer(torch.optim.SGD([param], lr=1.0))
    opt.protect("big", [torch.tensor([1.0, 0.0, 0.0], dtype=dtype)], mode="conflict")
    opt.protect("small", [torch.tensor([0.0, 1e-6, 0.0], dtype=dtype)], mode="conflict")
    param.grad = torch.tensor([0.0, -1.0, 1.0], dtype=dtype)
    opt.step()
    # SGD with lr 1 from 0: the parameter is minus the projected gradient
    step = -param.detach().double()
    assert torch.allclose(step, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-6)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_rescaling_one_objective_leaves_the_step_unchanged(seed):
    """Through the optimizer (float32 memory, the host rule): one of three conflict objectives'
    reference scaled by 10^k, k = -12..12, gives the same step (to float32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    refs = torch.randn(3, 6, generator=gen)
    grad = torch.randn(6, generator=gen)

    def step(scale: float) -> torch.Tensor:
        param = torch.nn.Parameter(torch.zeros(6))
        opt = ProtectedOptimizer(torch.optim.SGD([param], lr=1.0))
        for name, r, c in zip("abc", refs, (1.0, scale, 1.0)):
            opt.protect(name, [r * c], mode="conflict")
        param.grad = grad.clone()
        opt.step()
        return -param.detach().double()

    base = step(1.0)
    for k in range(-12, 13):
        assert torch.allclose(step(10.0**k), base, rtol=0, atol=1e-5 * float(grad.norm())), k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 8), extra=st.integers(-1, 4))
def test_rescaling_one_reference_leaves_the_projection_unchanged(seed, m, extra):
    """Scaling a reference by 10^k, k = -12..12, changes nothing (solvers and reference operator)."""
    from gradsafe.qp import solve_nonneg_qp_branch_free

    rng = np.random.default_rng(seed)
    n = max(1, m + extra)
    R = rng.standard_normal((m, n))
    g = rng.standard_normal(n)
    gn = np.linalg.norm(g)
    i = int(rng.integers(m))
    x0 = conflict_project(torch.from_numpy(g), torch.from_numpy(R)).numpy()
    for k in range(-12, 13):
        Rk = R.copy()
        Rk[i] *= 10.0**k
        H, q = Rk @ Rk.T, Rk @ g
        xs = {
            "conflict_project": conflict_project(torch.from_numpy(g), torch.from_numpy(Rk)).numpy(),
            "solve_nonneg_qp": g + Rk.T @ solve_nonneg_qp(H, q),
            "batch": g + Rk.T @ solve_nonneg_qp_batch(H[None], q[None], np.diag(H)[None])[0],
            "branch_free": g + Rk.T @ solve_nonneg_qp_branch_free(H[None], q[None], np.diag(H)[None])[0],
        }
        for name, x in xs.items():
            assert np.linalg.norm(x - x0) <= 1e-9 * gn, (name, k, np.linalg.norm(x - x0) / gn)


# ---------------------------------------------------------------- against quadprog


def external_projection(R: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, str]:
    """``argmin 1/2 |x - g|^2 s.t. R x >= 0`` by quadprog (Goldfarb-Idnani) on the primal.

    The constraints are handed over as unit rows (a positive row scaling changes no
    constraint), so quadprog sees the problem at a sane scale whatever the references' norms.
    quadprog gives up ("constraints are inconsistent") on some degenerate problems: dependent
    references binding at once, typically when the answer is x = 0. Those go to scipy's NNLS
    (Lawson-Hanson in compiled code) on the same unit rows: ``x = g + U^T lam`` with
    ``lam = argmin_{lam >= 0} |U^T lam + g|``. Returns the projection and which solver gave it.
    """
    quadprog = pytest.importorskip("quadprog")
    units = R / np.linalg.norm(R, axis=1, keepdims=True)
    try:
        return quadprog.solve_qp(np.eye(R.shape[1]), g, units.T, np.zeros(R.shape[0]))[0], "quadprog"
    except ValueError:
        nnls = pytest.importorskip("scipy.optimize").nnls
        return g + units.T @ nnls(units.T, -g)[0], "nnls"


def check_projection(R: np.ndarray, g: np.ndarray, lam: np.ndarray, reference: np.ndarray) -> None:
    """The primal ``x = g + R^T lam`` against the external solver's, and the KKT conditions of
    the dual: lam >= 0, R x >= 0 (to rounding, per unit reference) and complementary
    slackness, i.e. the duality gap ``sum_j lam_j <r_j, x>`` at rounding level (relative to
    the sizes of ``g`` and of the terms ``lam_j |r_j|``)."""
    gn = np.linalg.norm(g)
    x = g + R.T @ lam
    norms = np.linalg.norm(R, axis=1)
    assert np.all(lam >= 0)
    slack = R @ x / norms
    assert slack.min() >= -1e-10 * gn, slack.min() / gn
    gap = float(lam @ (R @ x))
    assert abs(gap) <= 1e-13 * gn * (gn + float(lam @ norms)), gap / gn**2
    assert np.linalg.norm(x - reference) <= 1e-7 * gn, np.linalg.norm(x - reference) / gn


def random_references(rng: np.random.Generator, m: int, n: int, layout: str) -> np.ndarray:
    R = rng.standard_normal((m, n))
    if layout == "spread":  # norms over 1e-10 .. 1e10
        R *= 10.0 ** rng.uniform(-10, 10, size=(m, 1))
    elif layout == "duplicate" and m > 1:  # positive multiples of other references
        for i in rng.choice(m, size=max(1, m // 4), replace=False):
            R[i] = R[int(rng.integers(m))] * 10.0 ** rng.uniform(-3, 3)
    elif layout == "dependent" and m > 2:  # exact combinations of two others
        for i in rng.choice(m, size=max(1, m // 4), replace=False):
            a, b = rng.choice(m, size=2, replace=False)
            R[i] = rng.standard_normal() * R[a] + rng.standard_normal() * R[b]
    return R


QUADPROG_CASES = [
    (m, n, layout, seed)
    for m in (1, 2, 5, 16, 64, 128)
    for n in sorted({m // 2 + 1, m, min(4 * m, 300)})
    for layout in ("random", "spread", "duplicate", "dependent")
    for seed in (0, 1)
]


@pytest.mark.parametrize("m,n,layout,seed", QUADPROG_CASES)
def test_against_quadprog(m, n, layout, seed):
    rng = np.random.default_rng([m, n, seed, len(layout)])
    R = random_references(rng, m, n, layout)
    g = rng.standard_normal(n)
    reference, solver = external_projection(R, g)
    if layout in ("random", "spread") and n >= m:
        assert solver == "quadprog"  # independent references: quadprog must solve it
    H, q = R @ R.T, R @ g
    check_projection(R, g, solve_nonneg_qp(H, q), reference)
    check_projection(R, g, solve_nonneg_qp(H, q, np.diag(H)), reference)
    x = conflict_project(torch.from_numpy(g), torch.from_numpy(R)).numpy()
    assert np.linalg.norm(x - reference) <= 1e-7 * np.linalg.norm(g)
    assert (R @ x / np.linalg.norm(R, axis=1)).min() >= -1e-10 * np.linalg.norm(g)


def test_quadprog_is_the_reference_for_most_cases():
    """The fallback to NNLS is for quadprog's degenerate failures, not the common case."""
    solvers = []
    for m, n, layout, seed in QUADPROG_CASES:
        rng = np.random.default_rng([m, n, seed, len(layout)])
        R = random_references(rng, m, n, layout)
        solvers.append(external_projection(R, rng.standard_normal(n))[1])
    assert solvers.count("quadprog") >= 0.75 * len(solvers)


@pytest.mark.parametrize("m,n", [(2, 2), (5, 3), (16, 16), (64, 33), (128, 128), (128, 65)])
def test_batch_against_quadprog(m, n):
    rng = np.random.default_rng([m, n])
    problems = []
    for b in range(3):
        R = random_references(rng, m, n, ["random", "spread", "duplicate"][b])
        problems.append((R, rng.standard_normal(n)))
    H = np.stack([R @ R.T for R, _ in problems])
    q = np.stack([R @ g for R, g in problems])
    lam = solve_nonneg_qp_batch(H, q, np.diagonal(H, axis1=1, axis2=2))
    for b, (R, g) in enumerate(problems):
        check_projection(R, g, lam[b], external_projection(R, g)[0])
