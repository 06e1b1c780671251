"""The small dual problems of the conflict rule, solved exactly on the host.

Every conflict constraint set reduces to the non-negative quadratic program

    min_{lam >= 0}  1/2 lam^T H lam + q^T lam,        H symmetric positive semi-definite,

whose size is the number of references (a handful), not the number of parameters.
It is solved here in float64 numpy by an active-set method (Lawson-Hanson's scheme for
non-negative least squares, written for a general PSD ``H``), which terminates in a
finite number of exchanges with the exact KKT point.
"""

from __future__ import annotations

import numpy as np
import torch

from .numerics import DEGENERATE, NULL_RTOL, single_threaded_blas

__all__ = ["solve_nonneg_qp", "solve_nonneg_qp_batch", "solve_nonneg_qp_branch_free", "DEGENERATE"]


def solve_nonneg_qp(
    H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray | None = None, max_iter: int | None = None
) -> np.ndarray:
    """Return ``argmin_{lam >= 0} 1/2 lam^T H lam + q^T lam`` for a PSD ``H`` (m x m).

    ``ref_norms2``: each reference's squared norm before any projection (the diagonal of its
    Gram matrix); a reference whose diagonal of H is below ``DEGENERATE`` times it gets a
    zero multiplier. Defaults to the largest diagonal of H for every reference.
    """
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    m = q.shape[0]
    if H.shape != (m, m):
        raise ValueError(f"H must be {m} x {m}, got {H.shape}")
    if m == 0:
        return np.zeros(0)
    if not (np.isfinite(q).all() and np.isfinite(H).all()):
        return np.full(m, np.nan)  # a non-finite gradient passes through as non-finite
    diag = np.diag(H)
    if ref_norms2 is None:
        ref_norms2 = np.full(m, float(np.max(np.abs(diag))))
    ref_norms2 = np.asarray(ref_norms2, dtype=np.float64).reshape(-1)
    live = diag > DEGENERATE * np.maximum(ref_norms2, 1e-300)
    lam = np.zeros(m)
    if not live.any():
        return lam
    if not live.all():
        idx = np.flatnonzero(live)
        lam[idx] = solve_nonneg_qp(H[np.ix_(idx, idx)], q[idx], ref_norms2[idx], max_iter)
        return lam
    if m == 1:
        return np.maximum(-q, 0.0) / H[0, 0]

    # In exact arithmetic q = R h lies in the range of H = R R^T, so the problem is bounded.
    # Coefficients measured in float32 leave a little of q in the null space of a singular H
    # (dependent references), along which the objective would fall without bound: remove it.
    evals, evecs = np.linalg.eigh(H)
    null = evecs[:, evals <= NULL_RTOL * max(float(evals[-1]), 1e-300)]
    if null.shape[1]:
        q = q - null @ (null.T @ q)

    tol = 1e-13 * max(float(np.max(np.diag(H))), float(np.max(np.abs(q))), 1e-300)
    free = np.zeros(m, dtype=bool)
    max_iter = max_iter if max_iter is not None else 3 * m + 10
    for _ in range(max_iter):
        w = -(H @ lam + q)  # negative gradient: positive means increasing lam_j helps
        candidates = np.where(~free, w, -np.inf)
        j = int(np.argmax(candidates))
        if candidates[j] <= tol:
            break
        free[j] = True
        for _ in range(max_iter):
            z = np.zeros(m)
            idx = np.flatnonzero(free)
            # lstsq, not solve: dependent references make the free block singular
            z[idx] = np.linalg.lstsq(H[np.ix_(idx, idx)], -q[idx], rcond=None)[0]
            if np.all(z[idx] > 0):
                lam = z
                break
            bad = idx[z[idx] <= 0]
            step = np.min(lam[bad] / np.maximum(lam[bad] - z[bad], 1e-300))
            lam = lam + step * (z - lam)
            free &= lam > 0
            lam[~free] = 0.0
    return np.maximum(lam, 0.0)


def solve_nonneg_qp_branch_free(H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray) -> np.ndarray:
    """The batched problem without a data-dependent Python branch (for ``torch.compile``).

    The same active-set method as ``solve_nonneg_qp`` (Lawson-Hanson), written with a fixed
    number of iterations (``3 m + 10``, its usual bound) and ``np.where``: each iteration
    either adds the most violated constraint (when the solution on the active set is
    feasible) or steps back towards it (when it is not); at the solution it stays put.
    """
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    B, m = q.shape
    eye = np.eye(m)
    diag = np.diagonal(H, axis1=1, axis2=2)
    live = diag > DEGENERATE * np.maximum(ref_norms2, 1e-300)  # (B, m)
    H = np.where(live[:, :, None] & live[:, None, :], H, eye)
    q = np.where(live, q, 0.0)
    evals, evecs = np.linalg.eigh(H)
    null = evals <= NULL_RTOL * np.maximum(evals[:, -1:], 1e-300)
    q = q - np.einsum("bij,bj->bi", evecs, np.einsum("bji,bj->bi", evecs, q) * null)
    tol = 1e-13 * np.maximum(np.max(np.abs(diag), axis=1), np.max(np.abs(q), axis=1))[:, None]
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
    lam = np.where(live, np.maximum(lam, 0.0), 0.0)
    finite = np.all(np.isfinite(q), axis=1) & np.all(np.all(np.isfinite(H), axis=2), axis=1)
    return np.where(finite[:, None], lam, np.nan)


def solve_nonneg_qp_batch(H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray) -> np.ndarray:
    """Solve a batch: ``H`` (B, m, m), ``q`` (B, m), ``ref_norms2`` (B, m); closed form for m == 1.

    Under ``torch.compile`` (Dynamo traces numpy as torch), several references go through
    the branch-free solver, so the rule adds no graph break.
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
    out = np.zeros_like(q)
    with single_threaded_blas():
        for b in range(q.shape[0]):
            out[b] = solve_nonneg_qp(H[b], q[b], ref_norms2[b])
    return out
