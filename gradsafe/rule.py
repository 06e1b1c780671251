"""The joint rule, solved on the host in float64 from one small vector of coefficients.

Given the coefficients a backend measured (each block's ``rows @ h_t`` per covered tensor,
and ``||h_t||^2``), the rule returns the weights ``w`` such that the surgery's result is
``x_t = h_t + rows_t^T w_t`` (see docs/math.md):

    basis columns A (project mode, penalty E = (1 - s) / s, 0 for a hard constraint),
    reference columns R (conflict mode, constraints <x, r> >= 0);
    mu  = K^+ (a + G_AR lam),            K = G_AA + E
    lam = argmin_{lam >= 0} 1/2 lam^T H lam + q^T lam,
          H = G_RR - G_RA K^+ G_AR,      q = b - G_RA K^+ a
    x   = h - A^T mu + R^T lam.

Columns are grouped into independent components (columns whose supports share no tensor
never interact); components of the same shape are solved as one batch. Everything that
does not depend on the gradient (Grams, pseudo-inverses, Schur complements) is computed
once, when the plan is built.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .numerics import PINV_RTOL, operand_gram, single_threaded_blas
from .qp import solve_nonneg_qp_batch

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Block

__all__ = ["HostRule", "equilibrated_pinv"]


@dataclass
class _Segment:
    """A contiguous run of rule columns: one block's basis or constraint rows."""

    block: int
    rows: list[int]
    kind: str  # "A" (basis) or "R" (constraint)
    z_offset: int
    per_tensor: bool  # scope "tensor": one instance per covered tensor

    def size(self, num_tensors: int) -> int:
        return len(self.rows) * (num_tensors if self.per_tensor else 1)


def equilibrated_pinv(K: np.ndarray) -> np.ndarray:
    """A pseudo-inverse of the PSD ``K`` whose rank cut does not depend on the columns' scales.

    ``K = G + diag(E)``: a soft column's penalty ``E`` can exceed a hard column's Gram
    diagonal by many orders (strength 1e-6 gives ``E = 1e6``), and a cut relative to the
    largest eigenvalue of ``K`` would then drop the hard columns. With ``D = diag(K)^(-1/2)``
    (1 on zero columns), ``D K D`` has a unit diagonal and the cut sees only dependence
    between columns; ``D (D K D)^+ D`` solves ``K mu = a`` for every ``a`` in ``K``'s
    range, which is all the rule needs (its ``a`` and ``G_AR`` columns lie there).
    """
    d = np.diag(K).copy()
    scale = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0)
    inner = np.linalg.pinv(K * scale[:, None] * scale[None, :], rcond=PINV_RTOL, hermitian=True)
    return inner * scale[:, None] * scale[None, :]


class HostRule:
    """Precomputed structure of the joint rule for one plan."""

    def __init__(self, blocks: list["Block"], touching: list[list[tuple[int, slice]]], reduce=None) -> None:
        """``reduce``: sums a list of host arrays across ranks (sharded memory: the Grams of
        each rank's rows are partial sums)."""
        with single_threaded_blas():
            self._build(blocks, touching, reduce)

    def _build(self, blocks: list["Block"], touching: list[list[tuple[int, slice]]], reduce=None) -> None:
        self.blocks = blocks
        num_pos = len(touching)

        # ---- per-tensor Gram matrices of the rows of acting blocks (for the rule and the report)
        self.local: list[dict[int, int]] = []  # per position: block index -> row offset in M_p
        self.tensor_grams: list[np.ndarray] = []
        self.local_index: dict[tuple[int, int], int] = {}  # (block, position) -> tensor's index in block
        for bi, b in enumerate(blocks):
            for t, p in enumerate(b.positions):
                self.local_index[(bi, p)] = t
        for p in range(num_pos):
            parts, offsets, off = [], {}, 0
            for bi, _ in touching[p]:
                b = blocks[bi]
                if not b.acts:
                    continue
                offsets[bi] = off
                off += b.num_rows
                parts.append(b.operand(self.local_index[(bi, p)]))
            self.local.append(offsets)
            self.tensor_grams.append(operand_gram(parts) if parts else np.zeros((0, 0)))
        if reduce is not None:
            self.tensor_grams = reduce(self.tensor_grams)

        # ---- rule columns
        self.segments: list[_Segment] = []
        z = 0
        for bi, b in enumerate(blocks):
            if not b.acts:
                continue
            per_tensor = b.scope == "tensor"
            for kind, rows in (("A", b.basis_rows()), ("R", b.constraint_rows())):
                if rows:
                    seg = _Segment(bi, rows, kind, z, per_tensor)
                    self.segments.append(seg)
                    z += seg.size(b.num_tensors)
        self.num_columns = z

        # column -> (kind, penalty, positions with their row offset in M_p)
        col_kind = np.empty(z, dtype="<U1")
        col_pen = np.zeros(z)
        col_touch: list[list[tuple[int, int]]] = [[] for _ in range(z)]
        for seg in self.segments:
            b = blocks[seg.block]
            # a penalty per block, per basis row (k,), or per tensor and basis row (T, k)
            pen = np.asarray(b.penalty if seg.kind == "A" else 0.0, dtype=np.float64)
            instances = [[t] for t in range(b.num_tensors)] if seg.per_tensor else [list(range(b.num_tensors))]
            c = seg.z_offset
            for tensors in instances:
                for r in seg.rows:
                    col_kind[c] = seg.kind
                    col_pen[c] = pen if pen.ndim == 0 else pen[r] if pen.ndim == 1 else pen[tensors[0], r]
                    col_touch[c] = [(b.positions[t], self.local[b.positions[t]][seg.block] + r) for t in tensors]
                    c += 1

        # ---- independent components: union-find over tensor positions
        parent = list(range(num_pos))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for touches in col_touch:
            for p, _ in touches[1:]:
                parent[find(p)] = find(touches[0][0])
        comp_cols: dict[int, list[int]] = defaultdict(list)
        for c, touches in enumerate(col_touch):
            comp_cols[find(touches[0][0])].append(c)

        # ---- per component: Gram, pseudo-inverse, Schur complement; batched by shape
        batches: dict[tuple[int, int], list[tuple]] = defaultdict(list)
        for cols in comp_cols.values():
            A = [c for c in cols if col_kind[c] == "A"]
            R = [c for c in cols if col_kind[c] == "R"]
            order = A + R
            idx = {c: i for i, c in enumerate(order)}
            G = np.zeros((len(order), len(order)))
            by_pos: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for c in order:
                for p, loc in col_touch[c]:
                    by_pos[p].append((idx[c], loc))
            for p, entries in by_pos.items():
                ii = [i for i, _ in entries]
                ll = [loc for _, loc in entries]
                G[np.ix_(ii, ii)] += self.tensor_grams[p][np.ix_(ll, ll)]
            nA = len(A)
            K = G[:nA, :nA] + np.diag(col_pen[A])
            K_pinv = equilibrated_pinv(K) if nA else np.zeros((0, 0))
            G_AR = G[:nA, nA:]
            P2 = K_pinv @ G_AR
            H = G[nA:, nA:] - G_AR.T @ P2
            ref_norms2 = np.diag(G[nA:, nA:]).copy()
            batches[(nA, len(R))].append((A, R, K_pinv, P2, H, ref_norms2))
        # one entry per shape: (idxA (B, nA), idxR (B, nR), K^+, P2, H, ref_norms2 (B, nR))
        self.batches = [
            tuple(np.asarray([item[j] for item in items], dtype=np.int64 if j < 2 else np.float64) for j in range(6)) for items in batches.values()
        ]
        self.weight_numel = blocks[-1].coef_offset + blocks[-1].coef_numel if blocks else 0

    # ------------------------------------------------------------------ per step
    def block_coefs(self, coefs: np.ndarray, bi: int) -> np.ndarray:
        """Block ``bi``'s ``(T_b, r_b)`` matrix inside a flat coefficient (or weight) vector."""
        b = self.blocks[bi]
        return coefs[b.coef_offset : b.coef_offset + b.coef_numel].reshape(b.num_tensors, b.num_rows)

    def solve(self, coefs: np.ndarray) -> np.ndarray:
        """Weights (flat, the blocks' (T_b, r_b) layout) from the measured coefficients."""
        coefs = np.asarray(coefs, dtype=np.float64)
        z = np.empty(self.num_columns)
        for seg in self.segments:
            C = self.block_coefs(coefs, seg.block)[:, seg.rows]
            part = C.reshape(-1) if seg.per_tensor else C.sum(axis=0)
            z[seg.z_offset : seg.z_offset + part.size] = part
        w = np.zeros(self.num_columns)
        for idxA, idxR, K_pinv, P2, H, ref_norms2 in self.batches:
            a = z[idxA]  # (B, nA)
            b = z[idxR]  # (B, nR)
            mu = np.einsum("bij,bj->bi", K_pinv, a)
            if idxR.shape[1]:
                q = b - np.einsum("bji,bj->bi", P2, a)
                lam = solve_nonneg_qp_batch(H, q, ref_norms2)
                mu = mu + np.einsum("bij,bj->bi", P2, lam)
                w[idxR] = lam
            w[idxA] = -mu
        weights = np.zeros(self.weight_numel)
        for seg in self.segments:
            b = self.blocks[seg.block]
            W = weights[b.coef_offset : b.coef_offset + b.coef_numel].reshape(b.num_tensors, b.num_rows)
            part = w[seg.z_offset : seg.z_offset + seg.size(b.num_tensors)]
            W[:, seg.rows] = part.reshape(b.num_tensors, len(seg.rows)) if seg.per_tensor else part[None, :]
        return weights
