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
once, when the plan is built; when an objective's rows are rewritten in place (a live
reference refreshed), ``HostRule.update_rows`` recomputes only what depends on them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .numerics import equilibrated_pinv, operand_gram, operand_inner, single_threaded_blas
from .qp import solve_nonneg_qp_batch

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Block

__all__ = ["HostRule"]


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


@dataclass
class _Component:
    """One independent part of the rule: its columns (basis first), where its Gram's entries
    come from, and where its matrices sit in ``HostRule.batches``."""

    A: list[int]
    R: list[int]
    gather: tuple[np.ndarray, np.ndarray]  # flat indices into G, and into the tensor Grams' store
    blocks: frozenset[int]  # blocks with a column here
    a_blocks: frozenset[int]  # blocks with a basis column here
    batch: int = 0  # its entry of HostRule.batches
    slot: int = 0  # and its index there


def _flat_index(ii: list[int], ll: list[int], n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries ``G[ii, ii]`` and ``M[ll, ll]`` (``G`` n x n, ``M`` m x m) as flat indices."""
    i, l = np.asarray(ii), np.asarray(ll)
    return (i[:, None] * n + i[None, :]).reshape(-1), (l[:, None] * m + l[None, :]).reshape(-1)


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
        # per position the Gram M_p of the acting rows on it: views of gram_store (flat, each
        # M_p's entries from gram_offsets[p] on, row-major)
        self.tensor_grams: list[np.ndarray] = []
        self.local_index: dict[tuple[int, int], int] = {}  # (block, position) -> tensor's index in block
        for bi, b in enumerate(blocks):
            for t, p in enumerate(b.positions):
                self.local_index[(bi, p)] = t
        grams = []
        for p in range(num_pos):
            offsets, off = {}, 0
            for bi, _ in touching[p]:
                if blocks[bi].acts:
                    offsets[bi] = off
                    off += blocks[bi].num_rows
            self.local.append(offsets)
            parts = [blocks[bi].operand(self.local_index[(bi, p)]) for bi in offsets]
            grams.append(operand_gram(parts) if parts else np.zeros((0, 0)))
        if reduce is not None:
            grams = reduce(grams)
        # the tensor Grams are views of one flat store, so that a component's Gram is one
        # gather from it and a block's own entries one scatter into it
        sizes = [g.size for g in grams]
        self.gram_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.gram_store = np.concatenate([g.reshape(-1) for g in grams]) if grams else np.zeros(0)
        self.tensor_grams = [
            self.gram_store[o : o + g.size].reshape(g.shape) for o, g in zip(self.gram_offsets, grams)
        ]
        self._own_entries: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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

        # column -> (kind, penalty, block, positions with their row offset in M_p)
        col_kind = np.empty(z, dtype="<U1")
        col_pen = np.zeros(z)
        col_block = np.zeros(z, dtype=np.int64)
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
                    col_block[c] = seg.block
                    col_touch[c] = [(b.positions[t], self.local[b.positions[t]][seg.block] + r) for t in tensors]
                    c += 1
        self._col_pen = col_pen

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
        self._components: list[_Component] = []
        by_shape: dict[tuple[int, int], list[tuple]] = defaultdict(list)
        for cols in comp_cols.values():
            A = [c for c in cols if col_kind[c] == "A"]
            R = [c for c in cols if col_kind[c] == "R"]
            entries: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for i, c in enumerate(A + R):
                for p, loc in col_touch[c]:
                    entries[p].append((i, loc))
            dst, src = [], []
            for p, e in entries.items():
                d, s_p = _flat_index([i for i, _ in e], [loc for _, loc in e], len(cols), self.tensor_grams[p].shape[0])
                dst.append(d)
                src.append(s_p + self.gram_offsets[p])
            comp = _Component(
                A, R,
                gather=(np.concatenate(dst), np.concatenate(src)),
                blocks=frozenset(int(col_block[c]) for c in cols),
                a_blocks=frozenset(int(col_block[c]) for c in A),
            )
            group = by_shape[(len(A), len(R))]
            comp.slot = len(group)
            group.append((A, R, *self._matrices(comp)))
            self._components.append(comp)
        # one entry per shape: (idxA (B, nA), idxR (B, nR), K^+, P2, H, ref_norms2 (B, nR))
        self._binding: dict[int, np.ndarray] = {}  # per batch: the last solve's binding constraints
        self.batches = []
        for key, items in by_shape.items():
            for comp in self._components:
                if (len(comp.A), len(comp.R)) == key:
                    comp.batch = len(self.batches)
            self.batches.append(
                tuple(np.asarray([item[j] for item in items], dtype=np.int64 if j < 2 else np.float64) for j in range(6))
            )
        self.weight_numel = blocks[-1].coef_offset + blocks[-1].coef_numel if blocks else 0

    def _matrices(self, comp: _Component, K_pinv: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """A component's ``(K^+, P2, H, ref_norms2)`` from the tensor Grams (``K_pinv``: reuse it,
        when the basis columns' Gram did not change)."""
        A = comp.A
        nA = len(A)
        n = nA + len(comp.R)
        dst, src = comp.gather  # an entry of G gets one term per tensor that both its columns touch
        G = np.bincount(dst, weights=self.gram_store[src], minlength=n * n).reshape(n, n)
        if K_pinv is None:
            K = G[:nA, :nA] + np.diag(self._col_pen[A])
            if nA:
                with single_threaded_blas():  # the one call here that would start BLAS threads
                    K_pinv = equilibrated_pinv(K)
            else:
                K_pinv = np.zeros((0, 0))
        G_AR = G[:nA, nA:]
        P2 = K_pinv @ G_AR
        H = G[nA:, nA:] - G_AR.T @ P2
        ref_norms2 = np.diag(G[nA:, nA:]).copy()
        return K_pinv, P2, H, ref_norms2

    # ------------------------------------------------------------------ rows rewritten in place
    def update_rows(self, changed: Collection[int], copies: Mapping[int, np.ndarray] | None = None) -> None:
        """Blocks ``changed`` have new values in the same rows (same shape).

        Only what depends on their rows is recomputed: their entries of the tensor Grams (their
        inner products with every acting row on the same tensors) and the matrices of the
        components they have columns in (host algebra, ``K^+`` kept when their basis columns did
        not change). The other blocks' Grams among themselves are not touched. ``copies``: per
        block, when every row it reads is a copy of one vector, that vector's squared norm on each
        of its tensors ``(T_b,)`` (a live reference's refresh knows them): its own entries are
        then written from them at once, and only tensors it shares with another acting block take
        inner products.
        """
        changed = sorted({bi for bi in changed if self.blocks[bi].acts})
        if not changed:
            return
        copies = copies or {}
        # position by position: the rows of one tensor stay in cache for all their pairs
        by_pos: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for bi in changed:
            b = self.blocks[bi]
            norms = copies.get(bi)
            if norms is not None:
                idx, tensor_of = self._own_entries_of(bi)
                self.gram_store[idx] = np.asarray(norms, dtype=np.float64)[tensor_of]
            for t, p in enumerate(b.positions):
                if norms is None or len(self.local[p]) > 1:
                    by_pos[p].append((bi, t))
        for p, mine in sorted(by_pos.items()):
            G = self.tensor_grams[p]
            done: set[int] = set()
            for bi, t in mine:
                b = self.blocks[bi]
                off_i = self.local[p][bi]
                rows_i = slice(off_i, off_i + b.num_rows)
                for bj, off_j in self.local[p].items():
                    if bj in done or (bj == bi and bi in copies):  # written already
                        continue
                    bb = self.blocks[bj]
                    rows_j = slice(off_j, off_j + bb.num_rows)
                    if bj == bi:
                        op_i = b.operand(t)
                        block = operand_inner(op_i, op_i)
                        block = 0.5 * (block + block.T)
                    else:
                        block = operand_inner(b.operand(t), bb.operand(self.local_index[(bj, p)]))
                    G[rows_i, rows_j] = block
                    G[rows_j, rows_i] = block.T
                done.add(bi)
        touched = set(changed)
        for comp in self._components:
            if comp.blocks & touched:
                keep = None if comp.a_blocks & touched else self.batches[comp.batch][2][comp.slot]
                for j, m in enumerate(self._matrices(comp, keep)):
                    self.batches[comp.batch][2 + j][comp.slot] = m

    def _own_entries_of(self, bi: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``bi``'s entries of its own rows' Grams in the store, and each one's tensor index."""
        cached = self._own_entries.get(bi)
        if cached is None:
            b = self.blocks[bi]
            r = np.arange(b.num_rows)
            idx, tensor_of = [], []
            for t, p in enumerate(b.positions):
                m = self.tensor_grams[p].shape[0]
                rows = self.local[p][bi] + r
                idx.append(self.gram_offsets[p] + (rows[:, None] * m + rows[None, :]).reshape(-1))
                tensor_of.append(np.full(r.size * r.size, t))
            cached = self._own_entries[bi] = (np.concatenate(idx), np.concatenate(tensor_of))
        return cached

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
        compiling = torch.compiler.is_compiling()
        for k, (idxA, idxR, K_pinv, P2, H, ref_norms2) in enumerate(self.batches):
            a = z[idxA]  # (B, nA)
            b = z[idxR]  # (B, nR)
            mu = np.einsum("bij,bj->bi", K_pinv, a)
            if idxR.shape[1]:
                q = b - np.einsum("bji,bj->bi", P2, a)
                # the last step's binding constraints start the active set: between steps
                # the gradient moves a little and the binding set rarely changes
                warm = None if compiling or idxR.shape[1] == 1 else self._binding.get(k)
                lam = solve_nonneg_qp_batch(H, q, ref_norms2, warm_start=warm)
                if not compiling and idxR.shape[1] > 1:
                    self._binding[k] = lam > 0
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
