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

__all__ = ["solve_nonneg_qp", "solve_nonneg_qp_batch"]

# Relative ridge added to H. A reference that lies (up to rounding) inside the hard-projected
# subspace leaves H ~ 1e-16 * |r|^2 and q ~ rounding noise; without the ridge their ratio is
# arbitrary. With it such a multiplier stays ~1e-6 |g|/|r| and moves the result by ~1e-14,
# while a genuine constraint's multiplier changes by ~1e-10 relative: far below fp32.
_RIDGE = 1e-10


def solve_nonneg_qp(
    H: np.ndarray, q: np.ndarray, scale: float | None = None, max_iter: int | None = None
) -> np.ndarray:
    """Return ``argmin_{lam >= 0} 1/2 lam^T H lam + q^T lam`` for a PSD ``H`` (m x m).

    ``scale`` is the size of the references before any projection (the largest diagonal
    entry of their Gram matrix); it sets the ridge. It defaults to the largest diagonal of H.
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
    if scale is None:
        scale = float(np.max(np.abs(np.diag(H))))
    scale = max(scale, 1e-300)
    H = H + _RIDGE * scale * np.eye(m)
    if m == 1:
        return np.maximum(-q, 0.0) / H[0, 0]

    tol = 1e-12 * max(scale, float(np.max(np.abs(q))), 1e-300)
    lam = np.zeros(m)
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
            z[idx] = np.linalg.solve(H[np.ix_(idx, idx)], -q[idx])
            if np.all(z[idx] > 0):
                lam = z
                break
            bad = idx[z[idx] <= 0]
            step = np.min(lam[bad] / np.maximum(lam[bad] - z[bad], 1e-300))
            lam = lam + step * (z - lam)
            free &= lam > tol
            lam[~free] = 0.0
    return np.maximum(lam, 0.0)


def solve_nonneg_qp_batch(H: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Solve a batch: ``H`` (B, m, m), ``q`` (B, m), ``scale`` (B,); closed form for m == 1."""
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or H.shape != q.shape + (q.shape[1],):
        raise ValueError(f"expected H (B, m, m) and q (B, m), got {H.shape} and {q.shape}")
    scale = np.maximum(np.asarray(scale, dtype=np.float64).reshape(-1), 1e-300)
    if q.shape[1] == 1:
        h = H[:, 0, 0] + _RIDGE * scale
        return (np.maximum(-q[:, 0], 0.0) / h)[:, None]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        out[b] = solve_nonneg_qp(H[b], q[b], scale=float(scale[b]))
    return out
