"""The small dual problems of the conflict rule, solved exactly on the host.

Every conflict constraint set reduces to the non-negative quadratic program

    min_{lam >= 0}  1/2 lam^T H lam + q^T lam,        H symmetric positive semi-definite,

whose size is the number of references (1 to a few hundred), not the number of parameters.
With ``H = R R^T`` and ``q = R h`` it is GEM's dual (Lopez-Paz and Ranzato 2017): the
projected gradient is ``x = h + R^T lam``.

It is solved in float64 numpy on the problem rescaled to unit references (``lam >= 0`` is
kept by any positive diagonal change of variables, so the answer does not depend on how
large each reference is), in two stages:

1. the primal-dual active-set method (Hintermueller, Ito and Kunisch 2002; block principal
   pivoting for non-negative least squares, Kim and Park 2011): solve on a guessed free set,
   move every wrong sign at once, a handful of dense solves; its fixed point is the exact
   KKT point. It is a guess: it stops when a free block is singular or after a few rounds;
2. Lawson and Hanson's active-set method ("Solving Least Squares Problems", 1974, ch. 23,
   written for a PSD ``H``), from the first stage's last feasible set. It keeps a square
   factor ``F`` with ``F^T F = H_SS^{-1}`` of the free block, grown by a bordered row per
   constraint added and shrunk by one Householder reflection per constraint dropped, so each
   exchange costs O(m^2); a constraint whose reference is dependent on the free ones (a
   singular ``H``) is never added. It terminates at the exact KKT point.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .numerics import DEGENERATE, NULL_RTOL, single_threaded_blas

__all__ = ["solve_nonneg_qp", "solve_nonneg_qp_batch", "solve_nonneg_qp_branch_free", "DEGENERATE"]

# A constraint counts as violated when its multiplier's gradient exceeds this fraction of
# max |q| (on unit references: of the largest |<r_j, h>| / |r_j|), i.e. far below the float32
# rounding of the measured coefficients and far above float64 rounding of the solve.
KKT_RTOL = 1e-12

# Rounds of the primal-dual active-set stage before handing over to Lawson-Hanson, and how
# many rounds in a row may fail to reduce the number of wrong signs (Kim and Park's rule).
_PDAS_ROUNDS = 10
_PDAS_PATIENCE = 2

_min = np.minimum.reduce


def _as_problem(H: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    m = q.shape[0]
    if H.shape != (m, m):
        raise ValueError(f"H must be {m} x {m}, got {H.shape}")
    return H, q


def _unit_scale(diag: np.ndarray, ref_norms2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which references are live, and ``1 / |r_j|`` for each (the rescaling to unit references).

    ``max(ref_norms2, diag)``: for valid input ``ref_norms2 >= diag`` (a projection only
    shortens a reference); the maximum only keeps a nonsensical ``ref_norms2 = 0`` finite.
    """
    live = diag > DEGENERATE * np.maximum(ref_norms2, 1e-300)
    scale = 1.0 / np.sqrt(np.maximum(np.maximum(ref_norms2, diag), 1e-300))
    return live, scale


def solve_nonneg_qp(
    H: np.ndarray,
    q: np.ndarray,
    ref_norms2: np.ndarray | None = None,
    max_iter: int | None = None,
    warm_start: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``argmin_{lam >= 0} 1/2 lam^T H lam + q^T lam`` for a PSD ``H`` (m x m).

    ``ref_norms2``: each reference's squared norm before any projection (the diagonal of its
    Gram matrix); it defaults to the diagonal of ``H`` (``H`` is then the references' Gram
    matrix itself). A reference whose diagonal of H is below ``DEGENERATE`` times it gets a
    zero multiplier. The result does not change when a reference is rescaled (its row and
    column of ``H``, its ``q`` and ``ref_norms2`` alike). ``max_iter`` bounds the exchanges
    of the Lawson-Hanson stage (default ``3 m + 10``). ``warm_start``: an optional boolean
    mask of the references expected to bind (e.g. the previous step's ``lam > 0``); it only
    changes how fast the answer is found. A non-finite input gives all-nan.
    """
    H, q = _as_problem(H, q)
    m = q.shape[0]
    if m == 0:
        return np.zeros(0)
    if not (np.isfinite(q).all() and np.isfinite(H).all()):
        return np.full(m, np.nan)  # a non-finite gradient passes through as non-finite
    diag = np.diag(H).copy()
    ref_norms2 = diag if ref_norms2 is None else np.asarray(ref_norms2, dtype=np.float64).reshape(-1)
    if ref_norms2.shape != (m,):
        raise ValueError(f"ref_norms2 must have {m} entries, got {ref_norms2.shape}")
    if warm_start is not None:
        warm_start = np.asarray(warm_start, dtype=bool).reshape(-1)
        if warm_start.shape != (m,):
            raise ValueError(f"warm_start must have {m} entries, got {warm_start.shape}")
    live, scale = _unit_scale(diag, ref_norms2)
    lam = np.zeros(m)
    if live.all():
        Hs = H * scale[:, None] * scale[None, :]
        lam = _solve_unit(Hs, q * scale, warm_start, max_iter) * scale
    elif live.any():
        idx = np.flatnonzero(live)
        s = scale[idx]
        Hs = H[np.ix_(idx, idx)] * s[:, None] * s[None, :]
        start = None if warm_start is None else warm_start[idx]
        lam[idx] = _solve_unit(Hs, q[idx] * s, start, max_iter) * s
    return lam


def _solve_unit(H: np.ndarray, q: np.ndarray, start: np.ndarray | None, max_iter: int | None) -> np.ndarray:
    """The QP on unit references (diagonal of ``H`` at most about 1, every one live)."""
    m = q.shape[0]
    q_max = float(np.max(np.abs(q)))
    tol = KKT_RTOL * q_max
    if m == 1:
        return np.maximum(-q, 0.0) / H[0, 0]
    violated = q < -tol
    if not violated.any():
        return np.zeros(m)  # lam = 0 satisfies KKT: no constraint is violated
    guess = violated if start is None or not start.any() else start.copy()
    done, free, lam_free = _primal_dual_active_set(H, q, guess, tol)
    lam = np.zeros(m)
    if done:
        lam[free] = lam_free
        return lam
    return _lawson_hanson(H, q, tol, free, lam_free, 3 * m + 10 if max_iter is None else max_iter)


def _factor_ok(H_SS: np.ndarray) -> np.ndarray | None:
    """The Cholesky factor of a free block, or None when the block is singular.

    Singular: a pivot (the squared part of a unit reference independent of the ones before
    it) at or below ``NULL_RTOL``, the same test the Lawson-Hanson stage applies per row.
    """
    try:
        C = np.linalg.cholesky(H_SS)
    except np.linalg.LinAlgError:
        return None
    return C if float(_min(np.diagonal(C))) ** 2 > NULL_RTOL else None


def _primal_dual_active_set(
    H: np.ndarray, q: np.ndarray, guess: np.ndarray, tol: float
) -> tuple[bool, np.ndarray, np.ndarray]:
    """Stage 1. Return (converged, free indices, multipliers on them).

    Converged: the multipliers are the exact KKT point. Otherwise the free set returned is
    feasible (its least-squares multipliers are positive, possibly empty): the start of
    Lawson-Hanson.
    """
    m = q.shape[0]
    free = guess
    last_ok: tuple[np.ndarray, np.ndarray] | None = None  # (indices, positive multipliers)
    first_positive: np.ndarray | None = None  # the fallback when no round is feasible
    fewest_wrong, patience = m + 1, _PDAS_PATIENCE
    for _ in range(_PDAS_ROUNDS):
        idx = np.flatnonzero(free)
        if idx.size == 0:
            break
        H_SS = H[np.ix_(idx, idx)]
        if _factor_ok(H_SS) is None:
            break
        z = np.linalg.solve(H_SS, -q[idx])
        lam = np.zeros(m)
        lam[idx] = z
        if _min(z) > 0:
            last_ok = (idx, z)
        elif first_positive is None:
            first_positive = idx[z > 0]
        w = -(H @ lam + q)
        new_free = (lam > 0) | (~free & (w > tol))
        wrong = int(np.count_nonzero(new_free != free))
        if wrong == 0:
            return True, idx, z
        if wrong < fewest_wrong:
            fewest_wrong, patience = wrong, _PDAS_PATIENCE
        else:
            patience -= 1
            if patience == 0:
                break
        free = new_free
    if last_ok is None:
        if first_positive is None:
            return False, np.zeros(0, dtype=np.intp), np.zeros(0)
        last_ok = _drop_nonpositive(H, q, first_positive)
    return False, last_ok[0], last_ok[1]


def _drop_nonpositive(H: np.ndarray, q: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a free set until its least-squares multipliers are all positive."""
    while idx.size:
        H_SS = H[np.ix_(idx, idx)]
        if _factor_ok(H_SS) is None:
            return np.zeros(0, dtype=np.intp), np.zeros(0)
        z = np.linalg.solve(H_SS, -q[idx])
        if _min(z) > 0:
            return idx, z
        idx = idx[z > 0]
    return idx, np.zeros(0)


def _lawson_hanson(
    H: np.ndarray, q: np.ndarray, tol: float, start: np.ndarray, lam_start: np.ndarray, max_iter: int
) -> np.ndarray:
    """Stage 2: Lawson-Hanson from a feasible free set ``start`` with multipliers ``lam_start``.

    Each exchange adds the most violated constraint; when that would turn a multiplier
    negative, it steps back from the new least-squares solution until a multiplier reaches
    zero and drops it, until all are positive (``_FreeSet.exchange``).
    """
    m = q.shape[0]
    fs = _FreeSet(H, q)
    if start.size:
        fs.load(start, lam_start)
    F, rows, order, diag = fs.F, fs.rows, fs.order, fs.diag
    free = np.zeros(m, dtype=bool)
    free[order[: fs.k]] = True
    blocked = np.zeros(m, dtype=bool)  # dependent on the free set: not added until it shrinks
    w = fs.gradient()  # -(H lam + q), -inf where a constraint is free or blocked
    w[free] = -np.inf
    z_S = np.empty(m)
    step_buf = np.empty(m)
    exact = True
    for _ in range(max_iter):
        k = fs.k
        j = int(w.argmax())
        w_j = float(w[j])
        if w_j <= tol:
            if exact:
                break
            # w was updated incrementally: confirm on an exact one
            w = fs.gradient()
            w[free | blocked] = -np.inf
            exact = True
            continue
        w[j] = -np.inf
        Fk = F[:k, :k]
        ell = Fk @ rows[:k, j]
        d = float(diag[j] - ell @ ell)  # the part of reference j independent of the free ones
        if d <= NULL_RTOL:
            # in exact arithmetic w_j = 0 then; what is left is rounding of q outside the
            # range of H, along which the dual would fall without bound
            blocked[j] = True
            continue
        u = ell @ Fk  # H_SS^{-1} H[S, j]
        z_j = w_j / d
        step = np.multiply(u, z_j, out=step_buf[:k])
        z = np.subtract(fs.lam[:k], step, out=z_S[:k])
        if k and _min(z) <= 0:
            if fs.exchange(j, u, d, np.append(z, z_j), free, blocked):
                blocked[:] = False  # dependent on the old free set, maybe not on the new one
            w = fs.gradient()
            w[free | blocked] = -np.inf
            exact = True
            continue
        fs.append(j, u, d)
        # w_new = w - z_j (H[:, j] - H[:, S] u): zero on S and at j, up to rounding
        step_buf[k] = -z_j
        w += step_buf[: k + 1] @ rows[: k + 1]
        z_S[k] = z_j
        fs.lam, z_S = z_S, fs.lam  # the new multipliers; the old buffer is scratch
        free[j] = True
        exact = False
    return fs.solution()


class _FreeSet:
    """The free set of the Lawson-Hanson stage, its multipliers and the factor of its block.

    Positions ``0..k-1`` hold the free references (``order``), their multipliers (``lam``,
    the positive least-squares solution on the set), their rows of H (``rows``) and the
    factor ``F`` (leading ``k x k`` block, ``F^T F = H_SS^{-1}``), all in ``m``-sized buffers.
    """

    __slots__ = ("H", "q", "diag", "order", "lam", "rows", "F", "k")

    def __init__(self, H: np.ndarray, q: np.ndarray) -> None:
        m = q.shape[0]
        self.H, self.q, self.diag = H, q, np.diagonal(H)
        self.order = np.empty(m, dtype=np.intp)
        self.lam = np.empty(m)
        self.rows = np.empty((m, m))
        self.F = np.zeros((m, m))
        self.k = 0

    def load(self, idx: np.ndarray, lam: np.ndarray) -> None:
        """Start from the free set ``idx`` (independent, positive multipliers ``lam``)."""
        C = _factor_ok(self.H[np.ix_(idx, idx)])
        if C is None:  # the caller checked it; rounding could still flip the pivot test
            return
        k = idx.size
        self.order[:k] = idx
        self.lam[:k] = lam
        self.rows[:k] = self.H[idx]
        self.F[:k, :k] = np.linalg.inv(C)  # C C^T = H_SS, so F = C^{-1}
        self.k = k

    def append(self, j: int, u: np.ndarray, d: float) -> None:
        """Border the factor with reference ``j`` (``u = H_SS^{-1} H[S, j]``, ``d`` its pivot).

        ``F' = [[F, 0], [u^T / sqrt(d), -1 / sqrt(d)]]`` gives ``F'^T F'`` the bordered inverse.
        """
        k = self.k
        root = math.sqrt(d)
        np.multiply(u, 1.0 / root, out=self.F[k, :k])
        self.F[k, k] = -1.0 / root
        self.order[k] = j
        self.rows[k] = self.H[j]
        self.k = k + 1

    def drop(self, p: int, lam: np.ndarray) -> None:
        """Remove position ``p`` (``lam``: the multipliers being stepped, kept in step).

        Without reference p the inverse is ``F_-^T (I - c c^T / |c|^2) F_-`` (``c`` = column p
        of F, ``F_-`` the others). A Householder reflection mapping c onto the last axis turns
        it into the reflected ``F_-`` without its last row.
        """
        k = self.k
        last = k - 1
        F = self.F
        c = F[:k, p].copy()
        if p != last:
            F[:k, p] = F[:k, last]
            self.order[p] = self.order[last]
            self.rows[p] = self.rows[last]
            lam[p] = lam[last]
        c_last = float(c[last])
        c[last] = c_last + math.copysign(math.sqrt(float(c @ c)), c_last)
        cc = float(c @ c)
        if cc > 0 and last:
            F_rest = F[:k, :last]
            F_rest -= (c * (2.0 / cc))[:, None] * (c @ F_rest)
        F[last, :k] = 0.0
        F[:k, last] = 0.0
        self.k = last

    def least_squares(self) -> np.ndarray:
        """The multipliers that minimise the objective on the free set: ``-F^T F q_S``."""
        Fk = self.F[: self.k, : self.k]
        return -((Fk @ self.q[self.order[: self.k]]) @ Fk)

    def gradient(self) -> np.ndarray:
        """``w = -(H lam + q)`` (a new array); positive entries are violated constraints."""
        k = self.k
        return -(self.lam[:k] @ self.rows[:k] + self.q) if k else -self.q

    def exchange(
        self, j: int, u: np.ndarray, d: float, z: np.ndarray, free: np.ndarray, blocked: np.ndarray
    ) -> bool:
        """Lawson-Hanson's step for constraint ``j`` (``u``, ``d`` as for ``append``; ``z`` the
        least-squares multipliers on the set with j, j last): add it, step back from z until a
        multiplier reaches zero, drop it, re-solve, until all are positive. Updates ``free``;
        returns whether a reference left the set."""
        self.append(j, u, d)
        lam = np.zeros(self.k)
        lam[:-1] = self.lam[: self.k - 1]
        shrunk = False
        while _min(z) <= 0:
            shrunk = True
            bad = (z <= 0).nonzero()[0]
            ratios = lam[bad] / (lam[bad] - z[bad])
            first = int(ratios.argmin())
            lam += float(ratios[first]) * (z - lam)
            lam[bad[first]] = 0.0
            for p in (lam <= 0).nonzero()[0][::-1]:
                free[self.order[p]] = False
                self.drop(int(p), lam)
            lam = lam[: self.k]
            if self.k == 0:
                break
            z = self.least_squares()
        self.lam[: self.k] = z if self.k else z[:0]
        free[j] = j in self.order[: self.k]
        return shrunk

    def solution(self) -> np.ndarray:
        """The multipliers over all references, after one step of iterative refinement."""
        lam = np.zeros(self.q.shape[0])
        k = self.k
        if k:
            Fk = self.F[:k, :k]
            residual = self.gradient()[self.order[:k]]  # of H_SS lam_S = -q_S
            refined = self.lam[:k] + (Fk @ residual) @ Fk
            lam[self.order[:k]] = refined if _min(refined) > 0 else self.lam[:k]
        return lam


def solve_nonneg_qp_branch_free(H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray) -> np.ndarray:
    """The batched problem without a data-dependent Python branch (for ``torch.compile``).

    Lawson-Hanson's method written with a fixed number of iterations (``3 m + 10``, its
    usual bound) and ``np.where``, on unit references like ``solve_nonneg_qp``: each
    iteration either adds the most violated constraint (when the solution on the active set
    is feasible) or steps back towards it (when it is not); at the solution it stays put.
    The free blocks go through ``pinv``; rounding of q in the null space of H (dependent
    references) is removed first by an eigendecomposition.
    """
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    B, m = q.shape
    eye = np.eye(m)
    diag = np.diagonal(H, axis1=1, axis2=2)
    live, scale = _unit_scale(diag, np.asarray(ref_norms2, dtype=np.float64).reshape(B, m))
    H = H * scale[:, :, None] * scale[:, None, :]
    q = q * scale
    H = np.where(live[:, :, None] & live[:, None, :], H, eye)
    q = np.where(live, q, 0.0)
    evals, evecs = np.linalg.eigh(H)
    null = evals <= NULL_RTOL
    q = q - np.einsum("bij,bj->bi", evecs, np.einsum("bji,bj->bi", evecs, q) * null)
    tol = KKT_RTOL * np.max(np.abs(q), axis=1)[:, None]
    lam = np.zeros_like(q)
    active = np.zeros(q.shape, dtype=bool)
    rows = np.arange(m)[None, :]
    for _ in range(3 * m + 10):
        A = np.where(active[:, :, None] & active[:, None, :], H, eye)
        z = np.where(active, np.einsum("bij,bj->bi", np.linalg.pinv(A, hermitian=True), np.where(active, -q, 0.0)), 0.0)
        feasible = np.all(~active | (z > 0), axis=1, keepdims=True)
        # feasible: take z, add the most violated inactive constraint (if any)
        w = -(np.einsum("bij,bj->bi", H, z) + q)
        cand = np.where(active, -np.inf, w)
        best = np.argmax(cand, axis=1)[:, None]
        add = (rows == best) & (np.take_along_axis(cand, best, axis=1) > tol)
        # infeasible: step from lam towards z until the first active multiplier hits 0
        ratio = np.where(active & (z <= 0), lam / np.maximum(lam - z, 1e-300), np.inf)
        alpha = np.clip(np.min(ratio, axis=1, keepdims=True), 0.0, 1.0)
        back = lam + alpha * (z - lam)
        lam = np.where(feasible, z, back)
        active = np.where(feasible, active | add, active & (back > 0))
        lam = np.where(active, lam, 0.0)
    lam = np.where(live, np.maximum(lam, 0.0), 0.0) * scale
    finite = np.all(np.isfinite(q), axis=1) & np.all(np.all(np.isfinite(H), axis=2), axis=1)
    return np.where(finite[:, None], lam, np.nan)


def solve_nonneg_qp_batch(
    H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray, warm_start: np.ndarray | None = None
) -> np.ndarray:
    """Solve a batch: ``H`` (B, m, m), ``q`` (B, m), ``ref_norms2`` (B, m); closed form for m == 1.

    ``warm_start``: optional (B, m) boolean masks, as in ``solve_nonneg_qp``. Under
    ``torch.compile`` (Dynamo traces numpy as torch), several references go through the
    branch-free solver, so the rule adds no graph break.
    """
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or H.shape != q.shape + (q.shape[1],):
        raise ValueError(f"expected H (B, m, m) and q (B, m), got {H.shape} and {q.shape}")
    ref_norms2 = np.asarray(ref_norms2, dtype=np.float64).reshape(q.shape)
    if q.shape[1] == 1:
        h = H[:, 0, 0]
        live = h > DEGENERATE * np.maximum(ref_norms2[:, 0], 1e-300)
        lam = np.where(live, np.maximum(-q[:, 0], 0.0) / np.where(live, h, 1.0), 0.0)
        lam = np.where(np.isfinite(q[:, 0]) & np.isfinite(h), lam, np.nan)
        return lam[:, None]
    if torch.compiler.is_compiling():
        return solve_nonneg_qp_branch_free(H, q, ref_norms2)
    if warm_start is not None:
        warm_start = np.asarray(warm_start, dtype=bool).reshape(q.shape)
    out = np.zeros_like(q)
    with single_threaded_blas():
        for b in range(q.shape[0]):
            out[b] = solve_nonneg_qp(H[b], q[b], ref_norms2[b], warm_start=None if warm_start is None else warm_start[b])
    return out
