"""Property tests of the reference surgery operators against brute-force linear algebra."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from gradsafe.surgery import (
    conflict_project,
    damp,
    joint_surgery,
    normalize_fisher,
    penalty_of_strength,
    project_out,
)

SIZES = [1, 2, 3, 7, 16, 64, 4097]
DTYPES = [torch.float32, torch.float64]
# Relative (to |g|) tolerance of a result: the operators compute in float64 and round once.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-9}

# ---------------------------------------------------------------- helpers


def orthonormal_rows(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """(k, n) float64 with orthonormal rows."""
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return Q.T.contiguous()


def complement_projection(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """g minus its orthogonal projection onto span(rows), in float64 (rank-revealing SVD)."""
    g = g.double()
    if rows.shape[0] == 0:
        return g.clone()
    _, s, Vt = torch.linalg.svd(rows.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return g.clone()
    Q = Vt[s > 1e-9 * s[0]]
    return g - Q.T @ (Q @ g)


def brute_force_closest(g, eq_rows, R, tol):
    """argmin |x - g| s.t. eq_rows x = 0, R x >= 0, by enumerating the active sets of R.

    The minimiser lies in the relative interior of a face {eq x = 0, R_S x = 0, rest > 0}, so
    it is the projection of g onto that face's span: one of the feasible candidates, and the
    closest of them.
    """
    g = g.double()
    n = g.numel()
    eq_rows = eq_rows.double().reshape(-1, n)
    R = R.double().reshape(-1, n)
    m = R.shape[0]
    best, best_d = None, math.inf
    for size in range(m + 1):
        for S in itertools.combinations(range(m), size):
            rows = torch.cat([eq_rows, R[list(S)]])
            x = complement_projection(g, rows)
            if m and float((R @ x).min()) < -tol:
                continue
            d = float((x - g).norm())
            if d < best_d:
                best, best_d = x, d
    assert best is not None  # x = 0 is always feasible
    return best


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm()) / max(float(scale.double().norm()), 1e-300)


@st.composite
def shapes(draw, max_k=8):
    n = draw(st.sampled_from(SIZES))
    k = draw(st.integers(1, min(max_k, n)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, k, dtype, seed


# ---------------------------------------------------------------- project_out


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes(),
    s=st.floats(0.0, 1.0),
    c=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3) | st.just(0.0),
)
def test_project_out_properties(shape, s, c):
    n, k, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    U64 = orthonormal_rows(gen, n, k)
    U = U64.to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    tol = RTOL[dtype]

    x = project_out(g, U)
    assert x.dtype == dtype and x.shape == g.shape
    # orthogonal to U (U itself rounded to dtype: its rows are orthonormal to ~eps)
    assert float((U64 @ x.double()).norm()) <= 10 * tol * float(g.double().norm()) + 1e-300
    # idempotent
    assert rel_err(project_out(x, U), x, g) <= 10 * tol
    # full projection = complement of span(U)
    assert rel_err(x, complement_projection(g, U), g) <= 10 * tol
    # strength 0 is the identity (exactly, after the round trip through float64)
    assert torch.equal(project_out(g, U, 0.0), g)
    # strength s: g - s P g
    expected = g.double() - s * (U.double().T @ (U.double() @ g.double()))
    assert rel_err(project_out(g, U, s), expected, g) <= tol
    # linear: f(c g) = c f(g)
    cg = (c * g.double()).to(dtype)
    fc = c * project_out(g, U, s).double()
    assert rel_err(project_out(cg, U, s), fc, c * g.double()) <= 4 * tol


@pytest.mark.parametrize("s", [-0.1, 1.0 + 1e-9, 2.0, float("nan")])
def test_project_out_bad_strength(s):
    with pytest.raises(ValueError):
        project_out(torch.ones(4), torch.eye(4)[:1], s)


def test_project_out_known_values():
    U = torch.tensor([[1.0, 0.0, 0.0]])
    g = torch.tensor([3.0, -2.0, 5.0])
    assert torch.equal(project_out(g, U), torch.tensor([0.0, -2.0, 5.0]))
    assert torch.allclose(project_out(g, U, 0.25), torch.tensor([2.25, -2.0, 5.0]))


# ---------------------------------------------------------------- conflict_project


@st.composite
def conflict_cases(draw):
    n = draw(st.sampled_from(SIZES))
    m = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    # how references relate: independent, one duplicated, one exactly opposite another
    layout = draw(st.sampled_from(["random", "duplicate", "opposite"]))
    return n, m, dtype, seed, layout


def make_references(gen, n, m, layout):
    R = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # norms within a factor 4 of each other: far larger ratios hit the solver's ridge (see
    # test_conflict_project_references_of_different_norms)
    R *= 2.0 ** (2 * torch.rand(m, 1, generator=gen, dtype=torch.float64) - 1)
    if m > 1 and layout == "duplicate":
        R[1] = 2.5 * R[0]
    elif m > 1 and layout == "opposite":
        R[1] = -0.5 * R[0]
    return R


def well_conditioned(R: torch.Tensor) -> bool:
    """No two references nearly (but not exactly) parallel or anti-parallel.

    Nearly dependent active references make the dual ill-conditioned; the solver's ridge then
    perturbs the result by far more than 1e-9 (see test_conflict_project_nearly_opposite).
    Exactly dependent ones (duplicates, opposites) are kept: they are exercised on purpose.
    """
    if R.shape[0] < 2 or R.shape[1] < 2:
        return True
    Rn = R / R.norm(dim=1, keepdim=True)
    cos = (Rn @ Rn.T).abs()
    off = cos[~torch.eye(R.shape[0], dtype=torch.bool)]
    if R.shape[0] > R.shape[1]:
        return False  # more references than dimensions: dependencies are generic
    return bool(((off < 0.9) | (off > 1 - 1e-12)).all())


@settings(max_examples=80, deadline=None)
@given(case=conflict_cases())
def test_conflict_project_is_closest_feasible(case):
    n, m, dtype, seed, layout = case
    gen = torch.Generator().manual_seed(seed)
    R64 = make_references(gen, n, m, layout)
    assume(well_conditioned(R64))
    R = R64.to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    tol = RTOL[dtype]
    gn = float(g.double().norm())

    x = conflict_project(g, R)
    assert x.dtype == dtype and x.shape == g.shape
    Rd = R.double()
    # feasible: <x, r_j> >= -tol |x| |r_j|
    slack = Rd @ x.double()
    assert bool((slack >= -10 * tol * gn * Rd.norm(dim=1)).all()), slack
    # and the closest feasible vector
    # brute force on the float64 data (float32 rounding must not create near-dependencies)
    feas_tol = 1e-12 * gn * float(Rd.norm(dim=1).max())
    ref = brute_force_closest(g, torch.zeros(0, n), R64, tol=feas_tol)
    assert rel_err(x, ref, g) <= 10 * tol

    # positive-scale equivariance in g, invariance to positive scaling of each reference
    c = float(torch.exp(torch.randn((), generator=gen, dtype=torch.float64) * 3))
    cg = (c * g.double()).to(dtype)
    assert rel_err(conflict_project(cg, R), c * x.double(), c * g.double()) <= 20 * tol
    d = (2.0 ** (2 * torch.rand(m, 1, generator=gen, dtype=torch.float64) - 1)).to(dtype)
    assert rel_err(conflict_project(g, d * R), x, g) <= 20 * tol


@settings(max_examples=40, deadline=None)
@given(shape=shapes(max_k=4))
def test_conflict_project_keeps_feasible_g(shape):
    n, m, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # g with <g, r_j> = b_j > 0 for every j, plus a component orthogonal to all of them
    b = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    a = torch.linalg.lstsq(R @ R.T, b[:, None]).solution[:, 0]
    w = complement_projection(torch.randn(n, generator=gen, dtype=torch.float64), R)
    g = (R.T @ a + w).to(dtype)
    Rt = R.to(dtype)
    assume(bool(((Rt.double() @ g.double()) > 0).all()))
    assert torch.equal(conflict_project(g, Rt), g)


@settings(max_examples=60, deadline=None)
@given(shape=shapes(max_k=1))
def test_conflict_project_single_reference_is_agem(shape):
    n, _, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    g64, r64 = g.double(), r.double()
    expected = g64 - min(float(g64 @ r64), 0.0) / float(r64 @ r64) * r64
    for R in (r, r[None, :]):  # a single vector or a (1, n) matrix
        x = conflict_project(g, R)
        assert x.shape == g.shape
        assert rel_err(x, expected, g) <= RTOL[dtype]


def test_conflict_project_known_values():
    g = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    R = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(conflict_project(g, R), torch.tensor([0.0, 2.0], dtype=torch.float64))
    # both constraints bind: the closest point of the positive quadrant is 0
    g = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    assert torch.allclose(conflict_project(g, R), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    # opposite references pin <x, r> = 0
    R = torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=torch.float64)
    g = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert torch.allclose(conflict_project(g, R), torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_conflict_project_nearly_opposite():
    # the feasible set is the thin wedge 0 <= x1 <= eps * x2; g = (0, -1, 1) projects to (0, 0, 1)
    eps = 1e-3
    R = torch.tensor([[1.0, 0.0, 0.0], [-1.0, eps, 0.0]], dtype=torch.float64)
    g = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)
    x = conflict_project(g, R)
    assert torch.allclose(x, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-7)


def test_conflict_project_references_of_different_norms():
    # orthogonal references: the exact answer clips only the second coordinate
    R = torch.tensor([[1000.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x = conflict_project(g, R)
    assert torch.allclose(x, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-8)


# ---------------------------------------------------------------- damp


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), lam=st.floats(0.0, 100.0), c=st.floats(1e-6, 1e6))
def test_damp_properties(shape, lam, c):
    n, _, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    F = (torch.randn(n, generator=gen, dtype=torch.float64) ** 2).to(dtype)
    tol = RTOL[dtype]

    assert torch.equal(damp(g, F, 0.0), g)
    F64 = F.double()
    expected = g.double() / (1.0 + lam * F64 / F64.mean())
    x = damp(g, F, lam)
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), expected, rtol=4 * tol, atol=0.0)
    # normalisation: the scale of F does not matter
    x_c = damp(g, (c * F64).to(dtype), lam)
    torch.testing.assert_close(x_c.double(), x.double(), rtol=8 * tol, atol=0.0)
    # normalize_fisher has mean 1
    assert float(normalize_fisher(F).double().mean()) == pytest.approx(1.0, rel=4 * tol)


def test_damp_zero_fisher_and_bad_lam():
    g = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(damp(g, torch.zeros(3), 5.0), g)
    with pytest.raises(ValueError):
        damp(g, torch.ones(3), -1e-3)


def test_damp_known_values():
    g = torch.tensor([2.0, 2.0], dtype=torch.float64)
    F = torch.tensor([3.0, 1.0], dtype=torch.float64)  # mean 2 -> F_hat = (1.5, 0.5)
    assert torch.allclose(damp(g, F, 2.0), torch.tensor([0.5, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------- joint_surgery


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), overlap=st.sampled_from(["disjoint", "partial", "identical", "same-span"]))
@example(shape=(4097, 2, torch.float32, 0), overlap="same-span")  # float32 rounding of one span: not extra directions
def test_joint_bases_only_is_union_projection(shape, overlap):
    n, k, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    k2 = min(k, max(1, n - k)) if overlap == "disjoint" else k
    V = orthonormal_rows(gen, n, min(n, k + k2))
    U1 = V[:k]
    if overlap == "disjoint":
        U2 = V[k : k + k2] if n > k else V[:k2]  # n == k: nothing outside, so U2 = U1
        union = V[: min(n, k + k2)]
    elif overlap == "partial":
        # shares its first half with U1, the rest drawn from outside
        shared = U1[: (k + 1) // 2]
        rest = V[k : k + k - shared.shape[0]]
        U2 = torch.linalg.qr(torch.cat([shared, rest]).T)[0].T
        union = torch.cat([U1, rest])
    elif overlap == "identical":
        U2 = U1.clone()
        union = U1
    else:  # the same span in another orthonormal basis
        W, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
        U2 = W @ U1
        union = U1
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    bases = [(U1.to(dtype), 1.0), (U2.to(dtype), 1.0)]
    x = joint_surgery(g, bases=bases)
    assert x.dtype == dtype and x.shape == g.shape
    # reference: complement of the union, from a QR of linearly independent generators of it
    Q, _ = torch.linalg.qr(union.T)
    expected = g.double() - Q @ (Q.T @ g.double())
    A = torch.cat([U1, U2])
    # and the same from a rank-revealing SVD of all the stacked rows
    assert rel_err(expected, complement_projection(g, A), g) <= 1e-12
    assert rel_err(x, expected, g) <= 20 * RTOL[dtype]
    assert float((A @ x.double()).norm()) <= 20 * RTOL[dtype] * float(g.double().norm()) + 1e-300
    # the order of the bases does not matter
    assert rel_err(joint_surgery(g, bases=bases[::-1]), x, g) <= 20 * RTOL[dtype]


@settings(max_examples=40, deadline=None)
@given(case=conflict_cases())
def test_joint_references_only_is_conflict_project(case):
    n, m, dtype, seed, layout = case
    gen = torch.Generator().manual_seed(seed)
    R64 = make_references(gen, n, m, layout)
    assume(well_conditioned(R64))
    R = R64.to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    expected = conflict_project(g, R)
    # one matrix, or split into several objectives' references (including 1-D rows)
    for refs in ([R], [R[i] for i in range(m)]):
        x = joint_surgery(g, references=refs)
        assert x.dtype == dtype
        assert rel_err(x, expected, g) <= 10 * RTOL[dtype]


@settings(max_examples=50, deadline=None)
@given(shape=shapes(max_k=4), m=st.integers(1, 3), inside=st.booleans())
def test_joint_hard_basis_and_references_is_closest_feasible(shape, m, inside):
    n, k, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    U64 = orthonormal_rows(gen, n, k)
    R64 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if inside:  # one reference lies in span(U): after projection it constrains nothing
        R64[0] = U64.T @ torch.randn(k, generator=gen, dtype=torch.float64)
    # the references as seen after the projection must not be nearly dependent (see
    # test_conflict_project_nearly_opposite); exactly zero ones are fine
    Rp = torch.stack([complement_projection(r, U64) for r in R64])
    live = Rp.norm(dim=1) > 1e-6 * R64.norm(dim=1)
    assume(well_conditioned(Rp[live]) if int(live.sum()) else True)
    U, R = U64.to(dtype), R64.to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    tol = RTOL[dtype]
    gn = float(g.double().norm())

    x = joint_surgery(g, bases=[(U, 1.0)], references=[R])
    assert x.dtype == dtype
    x64 = x.double()
    assert float((U.double() @ x64).norm()) <= 20 * tol * gn + 1e-300
    Rd = R.double()
    assert bool((Rd @ x64 >= -20 * tol * gn * Rd.norm(dim=1)).all())
    ref = brute_force_closest(g, U64, R64, tol=1e-11 * gn * float(Rd.norm(dim=1).max()))
    assert rel_err(x, ref, g) <= 20 * tol


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), s=st.floats(0.0, 1.0))
def test_joint_soft_basis_is_sgp(shape, s):
    n, k, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    U = orthonormal_rows(gen, n, k).to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    x = joint_surgery(g, bases=[(U, s)])
    assert rel_err(x, project_out(g, U, s), g) <= 10 * RTOL[dtype]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s1=st.floats(0.01, 1.0), s2=st.floats(0.01, 1.0))
def test_joint_two_orthogonal_soft_bases(seed, s1, s2):
    """Orthogonal bases decouple: each removes its own fraction s_o of its part of g."""
    gen = torch.Generator().manual_seed(seed)
    n = 37
    V = orthonormal_rows(gen, n, 6)
    U1, U2 = V[:2], V[2:6]
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    x = joint_surgery(g, bases=[(U1, s1), (U2, s2)])
    expected = g - s1 * U1.T @ (U1 @ g) - s2 * U2.T @ (U2 @ g)
    assert rel_err(x, expected, g) <= 1e-9


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.floats(0.05, 0.95), m=st.integers(1, 2))
def test_joint_soft_hard_and_references_minimise_the_penalised_problem(seed, s, m):
    """min 1/2|x-h|^2 + 1/2 c|V x|^2 s.t. U x = 0, R x >= 0, c = s/(1-s), by active sets."""
    gen = torch.Generator().manual_seed(seed)
    n = 12
    B = orthonormal_rows(gen, n, 5)
    U, V = B[:2], B[2:5]
    R = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    c = s / (1.0 - s)
    M = torch.eye(n, dtype=torch.float64) + c * V.T @ V

    def value(x):
        return float(0.5 * (x - g) @ (x - g) + 0.5 * c * (V @ x) @ (V @ x))

    best, best_v = None, math.inf
    for size in range(m + 1):
        for S in itertools.combinations(range(m), size):
            C = torch.cat([U, R[list(S)]])
            _, sv, Vt = torch.linalg.svd(C)
            Z = Vt[int((sv > 1e-10 * sv[0]).sum()) :].T  # null space of C
            x = Z @ torch.linalg.solve(Z.T @ M @ Z, Z.T @ g)
            if float((R @ x).min()) < -1e-10:
                continue
            if value(x) < best_v:
                best, best_v = x, value(x)
    x = joint_surgery(g, bases=[(U, 1.0), (V, s)], references=[R])
    assert rel_err(x, best, g) <= 1e-8


@settings(max_examples=30, deadline=None)
@given(shape=shapes(max_k=3), lam=st.floats(0.1, 50.0), m=st.integers(0, 2))
def test_joint_damps_before_projecting(shape, lam, m):
    n, k, dtype, seed = shape
    gen = torch.Generator().manual_seed(seed)
    U = orthonormal_rows(gen, n, k).to(dtype)
    R64 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if m > 1:  # see test_conflict_project_nearly_opposite
        assume(n > k + 1)
        assume(well_conditioned(torch.stack([complement_projection(r, U) for r in R64])))
    R = R64.to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    F = (torch.randn(n, generator=gen, dtype=torch.float64) ** 2).to(dtype)
    x = joint_surgery(g, bases=[(U, 1.0)], references=[R] if m else [], fisher=F, lam=lam)
    h = damp(g.double(), F, lam)
    expected = joint_surgery(h, bases=[(U, 1.0)], references=[R] if m else [])
    assert rel_err(x, expected, g) <= 10 * RTOL[dtype]
    if m == 0:
        assert rel_err(x, project_out(h, U), g) <= 10 * RTOL[dtype]
    # lam = 0 (or no Fisher) skips damping
    assert torch.equal(
        joint_surgery(g, bases=[(U, 1.0)], fisher=F, lam=0.0), joint_surgery(g, bases=[(U, 1.0)])
    )


def test_joint_nothing_is_identity():
    g = torch.randn(11, dtype=torch.float64)
    assert torch.equal(joint_surgery(g), g)


def test_penalty_of_strength():
    assert penalty_of_strength(1.0) == 0.0
    assert penalty_of_strength(0.25) == pytest.approx(3.0)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            penalty_of_strength(bad)


def test_joint_strength_above_one_raises():
    with pytest.raises(ValueError):
        joint_surgery(torch.ones(3), bases=[(torch.eye(3)[:1], 1.5)])


def test_joint_negative_strength_raises():
    with pytest.raises(ValueError):
        joint_surgery(torch.ones(3), bases=[(torch.eye(3)[:1], -0.5)])
