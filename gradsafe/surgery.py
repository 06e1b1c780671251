"""The surgery operators as plain, pure torch functions: the reference.

Every fast path (the packed torch backend, the Triton kernels) is tested against these.
All functions take flattened vectors; bases and references are stored *row-major*, one
direction per row: ``U`` has shape ``(k, n)``, ``R`` has shape ``(m, n)``. Arithmetic is
done in float64 and the result is returned in the dtype of ``g``.

See docs/math.md for the derivations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .numerics import equilibrated_pinv
from .qp import solve_nonneg_qp

__all__ = [
    "normalize_fisher",
    "damp",
    "project_out",
    "conflict_project",
    "joint_surgery",
    "penalty_of_strength",
    "side_operator",
    "factored_project",
    "factored_component",
]

_EPS = 1e-30


def normalize_fisher(fisher: torch.Tensor) -> torch.Tensor:
    """Scale a Fisher diagonal to mean 1 over its entries.

    The damping ``1 / (1 + lam * F)`` then means the same thing whatever the scale of the
    protected loss: ``lam = 1`` halves the step of a coordinate of average importance.
    An all-zero Fisher stays zero (no damping).
    """
    f = fisher.double()
    return (f / f.mean().clamp_min(_EPS)).to(fisher.dtype)


def damp(g: torch.Tensor, fisher: torch.Tensor, lam: float) -> torch.Tensor:
    """EWC-style Fisher-weighted damping ``g / (1 + lam * F_hat)``, F_hat = normalize_fisher(F)."""
    if lam < 0:
        raise ValueError(f"damping lam must be >= 0, got {lam}")
    f = normalize_fisher(fisher).double()
    return (g.double() / (1.0 + lam * f)).to(g.dtype)


def project_out(g: torch.Tensor, U: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Remove the part of ``g`` inside span(U): ``g - s * U^T (U g)``, U with orthonormal rows.

    ``strength`` s in [0, 1]: 1 is the full projection (OGD / GPM), below 1 the soft
    projection of SGP.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    U64 = U.double()
    g64 = g.double()
    return (g64 - strength * (U64.T @ (U64 @ g64))).to(g.dtype)


def conflict_project(g: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The closest ``g'`` to ``g`` with ``<g', r_j> >= 0`` for every row r_j of ``R``.

    GEM's quadratic program, solved through its dual on the m x m Gram matrix. With one
    reference this is A-GEM / SafeGrad: ``g - min(<g, r>, 0) / <r, r> * r``. Rescaling a
    reference does not change the result, however small it is against the others.
    """
    R64 = R.double().reshape(-1, g.numel())
    g64 = g.double()
    gram = R64 @ R64.T
    gram_np = gram.cpu().numpy()
    # each reference's squared norm is its own diagonal entry of the Gram matrix
    lam = solve_nonneg_qp(gram_np, (R64 @ g64).cpu().numpy(), gram_np.diagonal().copy())
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=g.device)
    return (g64 + R64.T @ lam_t).to(g.dtype)


def penalty_of_strength(strength: float) -> float:
    """The inverse penalty ``(1 - s) / s`` that turns a soft projection into a quadratic penalty.

    Minimising ``|x - g|^2 + c |U x|^2`` with ``c = s / (1 - s)`` gives ``g - s U^T U g``:
    the joint rule adds ``1/c`` to the diagonal of the basis Gram matrix (0 for s = 1).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return (1.0 - strength) / strength


def joint_surgery(
    g: torch.Tensor,
    *,
    bases: Sequence[tuple[torch.Tensor, float]] = (),
    references: Sequence[torch.Tensor] = (),
    fisher: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """The joint rule of several protected objectives.

    First damping ``h = g / (1 + lam F_hat)`` (skipped when ``fisher`` is None or lam = 0);
    then the exact solution of

        min_x  1/2 |x - h|^2 + 1/2 sum_o c_o |U_o x|^2
        s.t.   U_o x = 0         for every basis with strength 1 (c_o = infinity)
               <x, r_j> >= 0     for every row r_j of every reference matrix,

    with ``c_o = s_o / (1 - s_o)``. ``bases`` is a sequence of (U, strength) with U of
    orthonormal rows; bases of different objectives may overlap. With no references this is
    the projection off the union of the bases; with no bases it is ``conflict_project``.
    """
    for _, s in bases:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {s}")
    h = g.double()
    if fisher is not None and lam != 0.0:
        h = damp(h, fisher, lam).double()
    n = h.numel()
    A_rows = [U.double().reshape(-1, n) for U, s in bases if s > 0]
    E_diag = [
        torch.full((U.shape[0],), penalty_of_strength(s), dtype=torch.float64)
        for U, s in bases
        if s > 0
    ]
    R_rows = [R.double().reshape(-1, n) for R in references]
    A = torch.cat(A_rows) if A_rows else h.new_zeros(0, n)
    R = torch.cat(R_rows) if R_rows else h.new_zeros(0, n)
    E = torch.cat(E_diag).to(h.device) if E_diag else h.new_zeros(0)

    # Stationarity: x = h - A^T mu + R^T lam with (A A^T + E) mu = A h + A R^T lam.
    # the rule's dependence cut: bases rounded to float32 that span one subspace must not
    # leave their rounding differences as extra directions
    K = (A @ A.T + torch.diag(E)).cpu().numpy()
    K_pinv = torch.as_tensor(equilibrated_pinv(K), dtype=torch.float64, device=h.device)
    a = A @ h
    b = R @ h
    G_AR = A @ R.T
    G_RR = R @ R.T
    P2 = K_pinv @ G_AR
    H = G_RR - G_AR.T @ P2
    q = b - P2.T @ a
    lam_r = torch.as_tensor(
        solve_nonneg_qp(H.cpu().numpy(), q.cpu().numpy(), G_RR.diagonal().cpu().numpy()),
        dtype=torch.float64,
        device=h.device,
    )
    mu = K_pinv @ a + P2 @ lam_r
    x = h - A.T @ mu + R.T @ lam_r
    return x.to(g.dtype)


def side_operator(bases: Sequence[tuple[torch.Tensor, float]], dim: int) -> torch.Tensor:
    """``B^T (B B^T + E)^+ B`` (float64, ``dim x dim``) for the stacked rows ``B`` of several bases.

    ``bases``: (rows, strength) pairs, each with orthonormal rows over the same ``dim``; E has
    ``(1 - s) / s`` for a row of strength s. One basis of strength s gives ``s B^T B``; hard
    bases give the orthogonal projector onto the union of their spans.
    """
    bases = [(U.double(), s) for U, s in bases if s > 0 and U.shape[0]]
    if not bases:
        return torch.zeros(dim, dim, dtype=torch.float64)
    B = torch.cat([U for U, _ in bases])
    E = torch.cat([torch.full((U.shape[0],), penalty_of_strength(s), dtype=torch.float64) for U, s in bases])
    return B.T @ torch.linalg.pinv(B @ B.T + torch.diag(E.to(B.device)), hermitian=True) @ B


def factored_project(
    G: torch.Tensor,
    left: Sequence[tuple[torch.Tensor, float]] = (),
    right: Sequence[tuple[torch.Tensor, float]] = (),
) -> torch.Tensor:
    """The factored scope's operator on a matrix ``G`` (m, n): ``(I - L) G (I - R)``.

    ``L = side_operator(left, m)``, ``R = side_operator(right, n)``. With one hard objective
    (P, Q) this removes the whole factored subspace ``{P^T A + B Q}``: the result is
    ``G - factored_component(G, P, Q)``.
    """
    m, n = G.shape
    L = side_operator(left, m).to(G.device)
    R = side_operator(right, n).to(G.device)
    G64 = G.double()
    return ((torch.eye(m, dtype=torch.float64, device=G.device) - L) @ G64 @ (torch.eye(n, dtype=torch.float64, device=G.device) - R)).to(G.dtype)


def factored_component(G: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection of ``G`` onto the factored subspace of bases ``P`` (r_L, m), ``Q`` (r_R, n).

    ``Pi(G) = P^T P G + G Q^T Q - P^T P G Q^T Q``: the reference of a factored conflict
    objective is ``Pi`` of its mean protected gradient.
    """
    G64, P64, Q64 = G.double(), P.double(), Q.double()
    L, R = P64.T @ P64, Q64.T @ Q64
    return (L @ G64 + G64 @ R - L @ G64 @ R).to(G.dtype)
