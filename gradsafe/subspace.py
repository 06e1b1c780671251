"""Orthonormal low-rank bases, stored row-major: ``U`` is ``(k, n)``, one direction per row.

A basis carries the energies ``sigma`` (singular values) of what it summarises, so that new
samples can be merged with it and the union truncated by rank and by captured energy, as
GPM does. Appending uses classical Gram-Schmidt done twice (CGS2): one pass loses
orthogonality in fp32, two keep it at ~1e-6.
"""

from __future__ import annotations

import torch

__all__ = ["cgs2", "merge_basis", "orthogonality_error", "DEFAULT_SVD_THRESHOLD"]

# Merges with more new samples than this go through torch.svd_lowrank.
DEFAULT_SVD_THRESHOLD = 64
# Directions whose energy is below this fraction of the largest are numerically dependent.
_REL_ZERO = 1e-6
_OVERSAMPLE = 8


def orthogonality_error(U: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``max |U U^T - I|`` (0 for an empty basis).

    The Gram matrix is summed in float64 over column chunks of ``chunk`` entries, so that a
    large basis is never copied whole to float64.
    """
    k = U.shape[0]
    if k == 0:
        return 0.0
    gram = torch.zeros(k, k, dtype=torch.float64, device=U.device)
    for start in range(0, U.shape[1], chunk):
        part = U[:, start : start + chunk].double()
        gram += part @ part.T
    return float((gram - torch.eye(k, dtype=torch.float64, device=U.device)).abs().max())


def cgs2(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormalise the rows of ``V`` against the orthonormal rows of ``U`` and each other.

    Returns ``(Q, C_U, C_Q)`` with ``V = C_U @ U + C_Q @ Q``: ``Q`` holds the new orthonormal
    rows (one per row of V; a row of V already inside the span gives a zero row of Q),
    ``C_U`` (m, k) and ``C_Q`` (m, m, lower triangular) are the coefficients.
    """
    m = V.shape[0]
    W = V.clone()
    C_U = V.new_zeros(m, U.shape[0])
    C_Q = V.new_zeros(m, m)
    Q = V.new_zeros(m, V.shape[1])
    norms0 = V.norm(dim=1)
    for i in range(m):
        w = W[i]
        for _ in range(2):  # the second pass restores orthogonality lost to rounding
            if U.shape[0]:
                c = U @ w
                w = w - U.T @ c
                C_U[i] += c
            if i:
                c = Q[:i] @ w
                w = w - Q[:i].T @ c
                C_Q[i, :i] += c
        nrm = w.norm()
        keep = nrm > _REL_ZERO * norms0[i].clamp_min(1e-30)
        Q[i] = torch.where(keep, w / nrm.clamp_min(1e-30), torch.zeros_like(w))
        C_Q[i, i] = torch.where(keep, nrm, torch.zeros_like(nrm))
    return Q, C_U, C_Q


def _truncate(sigma: torch.Tensor, rank: int, energy: float, total: float | None = None) -> int:
    """How many leading directions to keep: at most ``rank``, the fewest that capture ``energy``.

    ``total``: the squared Frobenius norm the energy is a share of (default: the sum of
    ``sigma^2``, exact when ``sigma`` holds every singular value).
    """
    if sigma.numel() == 0:
        return 0
    s2 = sigma.double() ** 2
    total = float(s2.sum()) if total is None else total
    if total <= 0.0:
        return 0
    nonzero = int((sigma > _REL_ZERO * sigma[0]).sum())
    captured = torch.cumsum(s2, 0) / total
    needed = int((captured < energy - 1e-12).sum()) + 1
    return max(0, min(rank, nonzero, needed))


def merge_basis(
    U: torch.Tensor,
    sigma: torch.Tensor,
    samples: torch.Tensor,
    *,
    rank: int,
    energy: float = 1.0,
    svd_threshold: int = DEFAULT_SVD_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge new sample rows into a basis and truncate.

    ``U`` (k, n) orthonormal rows with energies ``sigma`` (k,), ``samples`` (m, n). Returns
    the leading right singular directions of ``[diag(sigma) U; samples]``: at most ``rank``
    of them, the fewest that capture ``energy`` of its squared Frobenius norm. Up to
    ``svd_threshold`` new samples this is exact (CGS2, then an SVD of a small matrix); past
    it, ``torch.svd_lowrank`` with oversampling.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    samples = samples.to(torch.float32)
    k = U.shape[0]
    if samples.shape[0] > svd_threshold:
        M = torch.cat([sigma[:, None].to(U.dtype) * U, samples]) if k else samples
        q = min(rank + _OVERSAMPLE, min(M.shape))
        left, s, right = torch.svd_lowrank(M.T, q=q, niter=4)
        # the sketch holds only the leading singular values: measure energy against |M|_F^2
        r = _truncate(s, rank, energy, total=float(M.double().pow(2).sum()))
        # re-orthonormalise: svd_lowrank's columns are orthonormal only to its QR's accuracy
        basis, _, _ = cgs2(U.new_zeros(0, U.shape[1]), left[:, :r].T.contiguous())
        return basis, s[:r].to(torch.float32)
    Q, C_U, C_Q = cgs2(U, samples)
    # [diag(sigma) U; S] = C [U; Q] with C = [[diag(sigma), 0], [C_U, C_Q]]
    C = torch.zeros(k + samples.shape[0], k + samples.shape[0], dtype=torch.float64, device=U.device)
    C[:k, :k] = torch.diag(sigma.double())
    C[k:, :k] = C_U.double()
    C[k:, k:] = C_Q.double()
    _, s, Zt = torch.linalg.svd(C, full_matrices=False)
    r = _truncate(s, rank, energy)
    basis = (Zt[:r] @ torch.cat([U, Q]).double()).to(torch.float32)
    return basis, s[:r].to(torch.float32)
