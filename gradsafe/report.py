"""Interference statistics of a step, from the coefficients and the weights alone.

No statistic here needs another pass over the gradient: every one follows from the numbers
the coefficient pass wrote (each block's ``rows @ h_t`` and ``|h_t|^2``), the weights the
rule chose, and matrices that depend only on the memory (computed once per plan).
Formulas: docs/monitor.md.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .factored import STAT_BOTH, STAT_DOT, STAT_DOT_AFTER, STAT_LEFT, STAT_RIGHT
from .numerics import LowRankRow, equilibrated_pinv, operand_gram, operand_inner
from .sharding import all_reduce_arrays

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

__all__ = ["STATS", "PER_TENSOR_STATS", "ReportConstants", "step_report"]

STATS = ("cosine", "conflict", "energy_in_subspace", "energy_removed", "predicted_change",
         "predicted_change_unprotected", "grad_norm")
PER_TENSOR_STATS = ("cosine", "energy_removed", "predicted_change")


@dataclass
class ReportConstants:
    """Per plan: |r_mean|^2 per block and tensor, constraint Gram inverses, cross Grams.

    An acting block's rows are in the rule's tensor Grams, so its numbers are read from
    them; only blocks that do not act (observe, factored statistics) take a pass over their
    rows. ``update`` redoes what involves blocks whose rows were rewritten in place
    (``Plan.update_rows``).
    """

    mean_norm2: list[np.ndarray]  # per block: |r_mean restricted to tensor t|^2, (T_b,)
    constraint_pinv: list[np.ndarray | None]  # per block: (1 or T_b, m, m)
    # per block that does not act, per tensor: acting rows on the tensor @ r_mean (an acting
    # block's are a column of the rule's tensor Grams, read from them each step: _WeightIndex)
    cross: list[list[np.ndarray]]
    index: "_WeightIndex | None" = None  # where the per-step sums read the rule's Grams and the weights

    @classmethod
    def of(cls, plan: "Plan") -> "ReportConstants":
        cached = plan.cache.get("report")
        if cached is not None:
            return cached
        n = len(plan.blocks)
        consts = cls([np.zeros(0)] * n, [None] * n, [[] for _ in range(n)])
        parts = [_Parts.of(plan, bi) for bi in range(n)]
        if plan.shard is not None:
            # the rule's tensor Grams are already summed across ranks; what a pass over this
            # rank's rows gave is summed here, once
            local = [a for part in parts for a in part.local()]
            if local:
                summed = iter(all_reduce_arrays(local, plan.shard))
                for part in parts:
                    part.replace_local(summed)
        for bi, part in enumerate(parts):
            consts._put(bi, part, plan.blocks[bi].scope)
        consts.index = _WeightIndex.of(plan)
        plan.cache["report"] = consts
        return consts

    def update(self, plan: "Plan", changed: Collection[int]) -> None:
        """Blocks ``changed`` have new rows (same shape) and the rule's Grams are updated: redo
        their numbers, and the cross Grams of the blocks that do not act with their rows.

        Unsharded plans only (a sharded plan is rebuilt instead).
        """
        assert plan.shard is None, "a sharded plan is rebuilt, not updated"
        changed = set(changed)
        rule = plan.rule
        for bi in sorted(changed):
            self._put(bi, _Parts.of(plan, bi), plan.blocks[bi].scope)
        acting = {bi for bi in changed if plan.blocks[bi].acts}
        positions = {p for bi in acting for p in plan.blocks[bi].positions}
        for bj, b in enumerate(plan.blocks):
            if bj in changed:
                continue
            for t, p in enumerate(b.positions):
                if p not in positions:
                    continue
                if b.acts:  # its inner products with the new rows are in the rule's Grams
                    continue
                mean = b.mean_operand(t)
                for bi in acting & set(rule.local[p]):
                    off = rule.local[p][bi]
                    op = plan.blocks[bi].operand(rule.local_index[(bi, p)])
                    self.cross[bj][t][off : off + plan.blocks[bi].num_rows] = operand_inner(op, mean)[:, 0]

    def _put(self, bi: int, part: "_Parts", scope: str) -> None:
        self.mean_norm2[bi] = part.mean_norm2
        self.cross[bi] = part.cross
        if not part.cons:
            self.constraint_pinv[bi] = None
            return
        grams = np.stack([sum(part.cons)]) if scope == "global" else np.stack(part.cons)
        if grams.shape[-1] == 1:  # one constraint (A-GEM): 1 / |r|^2, or 0 for a zero reference
            self.constraint_pinv[bi] = np.divide(1.0, grams, out=np.zeros_like(grams), where=grams > 0)
        else:
            self.constraint_pinv[bi] = equilibrated_pinv(grams)


@dataclass
class _Parts:
    """One block's report numbers: |r_mean|^2 per tensor, its constraint Grams per tensor, its
    cross Grams per tensor; ``from_rows``: computed by a pass over this rank's rows (a block
    that does not act), not read from the rule's Grams."""

    mean_norm2: np.ndarray
    cons: list[np.ndarray]
    cross: list[np.ndarray]
    from_rows: bool

    @classmethod
    def of(cls, plan: "Plan", bi: int) -> "_Parts":
        rule = plan.rule
        b = plan.blocks[bi]
        cons = b.constraint_rows()
        if b.acts:
            mean = 0 if b.operands is not None else b.mean_row()
            norms, grams = np.empty(b.num_tensors), []
            contiguous = bool(cons) and list(cons) == list(range(cons[0], cons[-1] + 1))
            for t, p in enumerate(b.positions):
                off = rule.local[p][bi]
                G = rule.tensor_grams[p]
                norms[t] = G[off + mean, off + mean]
                if cons:
                    grams.append(G[off + cons[0] : off + cons[-1] + 1, off + cons[0] : off + cons[-1] + 1]
                                 if contiguous else G[np.ix_([off + c for c in cons], [off + c for c in cons])])
            return cls(norms, grams, [], False)  # its cross Grams: a column of the rule's (_WeightIndex)
        means = [b.mean_operand(t) for t in range(b.num_tensors)]
        norms = np.array([float(operand_inner(m, m)[0, 0]) for m in means])
        grams = []
        for t in range(b.num_tensors) if cons else ():
            op = b.operand(t)
            grams.append(operand_gram([op if isinstance(op, LowRankRow) else op[cons]]))
        cross = []
        for t, p in enumerate(b.positions):
            acting = [plan.blocks[bj].operand(rule.local_index[(bj, p)]) for bj in rule.local[p]]
            cross.append(np.concatenate([operand_inner(op, means[t])[:, 0] for op in acting]) if acting else np.zeros(0))
        return cls(norms, grams, cross, True)

    def local(self) -> list[np.ndarray]:
        return [self.mean_norm2, *self.cons, *self.cross] if self.from_rows else []

    def replace_local(self, summed) -> None:
        if self.from_rows:
            self.mean_norm2 = next(summed)
            self.cons = [next(summed) for _ in self.cons]
            self.cross = [next(summed) for _ in self.cross]


def _alignment_cross(plan: "Plan", consts: ReportConstants) -> list[np.ndarray]:
    """Per block and tensor: ``sum_o rho_o <r_o, r_mean>`` on the tensor over the blocks ``o``
    with a SafeGrad term (``rho > 0``): what those terms add to ``<r_mean, x_t>``.

    A block's own term is its ``|r_mean|^2`` (known); only pairs of different blocks on a
    tensor need an inner product (cached with the plan, dropped when its rows change)."""
    cross = plan.cache.get("report_alignment")
    if cross is None:
        cross = []
        for bi, b in enumerate(plan.blocks):
            per_tensor = np.zeros(b.num_tensors)
            for t, p in enumerate(b.positions):
                for bo, _ in plan.touching[p]:
                    other = plan.blocks[bo]
                    if other.rho > 0 and bo != bi:
                        mine, theirs = b.mean_operand(t), other.mean_operand(other.positions.index(p))
                        per_tensor[t] += other.rho * float(operand_gram([mine, theirs])[0, 1])
            cross.append(per_tensor)
        if plan.shard is not None:
            cross = all_reduce_arrays(cross, plan.shard)
        plan.cache["report_alignment"] = cross
    return [c + b.rho * consts.mean_norm2[bi] for bi, (b, c) in enumerate(zip(plan.blocks, cross))]


@dataclass
class _WeightIndex:
    """Flat indices for the per-step sums over the rule's tensor Grams (``HostRule.gram_store``,
    updated in place when rows are rewritten), so that they take a few numpy calls per step
    instead of a loop over tensors.

    ``rows``: per position ``p``, the flat weight index of each row of ``M_p`` (the weights of
    the acting rows on ``p``, in ``M_p``'s order, are ``weights[rows[p]]``).
    ``removed``: every entry ``(i, j)`` of every tensor's Gram ``M_p``: its index in the store,
    the weights of its row and of its column, and ``p``; then ``sum_ij w_i M_p[i, j] w_j`` per
    tensor is one ``bincount``. ``along``, per acting block: for each tensor ``t`` of the block
    and acting row ``i`` on it, the store index of ``M_p[i, mean row]``, the weight of row
    ``i`` and ``t``: ``(acting rows on t @ r_mean) . w_t`` per tensor.
    """

    rows: list[np.ndarray]
    removed: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    along: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, plan: "Plan") -> "_WeightIndex":
        rule = plan.rule
        rows_weights = []  # per position: the flat weight index of each row of M_p
        for p, offsets in enumerate(rule.local):
            w = np.empty(rule.tensor_grams[p].shape[0], dtype=np.int64)
            for bi, off in offsets.items():
                b = plan.blocks[bi]
                start = b.coef_offset + rule.local_index[(bi, p)] * b.num_rows
                w[off : off + b.num_rows] = np.arange(start, start + b.num_rows)
            rows_weights.append(w)
        store, wi, wj, pos = [], [], [], []
        for p, w in enumerate(rows_weights):
            m = w.size
            if m:
                store.append(rule.gram_offsets[p] + np.arange(m * m))
                wi.append(np.repeat(w, m))
                wj.append(np.tile(w, m))
                pos.append(np.full(m * m, p))
        empty = np.zeros(0, dtype=np.int64)
        removed = tuple(np.concatenate(x) if x else empty for x in (store, wi, wj, pos))
        along = {}
        for bi, b in enumerate(plan.blocks):
            if not b.acts:
                continue
            mean = 0 if b.operands is not None else b.mean_row()
            store, wts, ts = [], [], []
            for t, p in enumerate(b.positions):
                m = rule.tensor_grams[p].shape[0]
                col = rule.local[p][bi] + mean
                store.append(rule.gram_offsets[p] + np.arange(m) * m + col)
                wts.append(rows_weights[p])
                ts.append(np.full(m, t))
            along[bi] = tuple(np.concatenate(x) if x else empty for x in (store, wts, ts))
        return cls(rows_weights, removed, along)


@dataclass
class _Sums:
    """An objective's raw sums over its blocks, from which its ratios follow."""

    dot: float = 0.0
    hh: float = 0.0
    mean_norm2: float = 0.0
    inside: float = 0.0
    change: float = 0.0
    unprotected: float = 0.0


def step_report(
    plan: "Plan",
    coefs: np.ndarray,
    weights: np.ndarray | None,
    step_scale: np.ndarray,
    per_tensor: bool = False,
    alignment_after: bool = True,
) -> dict[str, dict[str, float]]:
    """Per objective (and with ``per_tensor``, per covered parameter) statistics of one step.

    ``step_scale`` (one per plan position): the factor from the vector handed on, x, to the
    parameter change, ``delta theta = -step_scale * x`` (the learning rate in space "grad",
    1 in space "update"). An objective with several blocks (a factored objective's matrices
    and its 1-D tensors) sums their parts before taking ratios. ``alignment_after``: the
    SafeGrad terms ``rho r`` joined the step after the surgery (space "grad"; in space
    "update" they are part of the measured update already).
    """
    consts = ReportConstants.of(plan)
    coefs = np.asarray(coefs, dtype=np.float64)
    hh = coefs[plan.norms_offset : plan.norms_offset + plan.num_tensors]
    removed = np.zeros(len(hh))
    for op in plan.factor_ops:
        removed[op.position] += coefs[op.removed_offset]
    store = plan.rule.gram_store
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        at, wi, wj, pos = consts.index.removed
        removed += np.bincount(pos, weights=store[at] * weights[wi] * weights[wj], minlength=len(hh))

    # energy_removed is joint: the surgery solves one problem over every covered tensor, and
    # its change restricted to one objective's tensors can exceed their own gradient energy
    hh_all = float(hh.sum())
    joint_removed = float(removed.sum()) / hh_all if hh_all > 0 else 0.0
    sums: dict[str, _Sums] = {}
    extra: dict[str, dict[str, float]] = {}
    aligned = _alignment_cross(plan, consts) if alignment_after and any(b.rho > 0 for b in plan.blocks) else None
    for bi, b in enumerate(plan.blocks):
        C = plan.rule.block_coefs(coefs, bi)
        hh_t = hh[b.positions]
        mean_norm2 = consts.mean_norm2[bi]
        if b.stats_block:
            dots = C[:, STAT_DOT]
            inside = float((C[:, STAT_LEFT] + C[:, STAT_RIGHT] - C[:, STAT_BOTH]).sum())
            along = C[:, STAT_DOT_AFTER].copy()
        else:
            dots = C[:, b.mean_row()]
            if b.n_basis:
                basis = C[:, : b.n_basis]
                inside = float((basis**2).sum()) if b.scope == "tensor" else float((basis.sum(axis=0) ** 2).sum())
            else:
                cons = C[:, b.constraint_rows()]
                pinv = consts.constraint_pinv[bi]
                if b.scope == "global":
                    v = cons.sum(axis=0)
                    inside = float(v @ pinv[0] @ v)
                else:
                    inside = float(np.einsum("ti,tij,tj->", cons, pinv, cons))
            along = dots.copy()
        # <r_mean, x_t> = <r_mean, h_t> (after the factored stage) + (acting rows on t @ r_mean) . w_t
        if weights is not None:
            if b.acts:  # those inner products are a column of the rule's Grams
                at, wi, ts = consts.index.along[bi]
                along += np.bincount(ts, weights=store[at] * weights[wi], minlength=b.num_tensors)
            else:
                for t, p in enumerate(b.positions):
                    rows = consts.index.rows[p]
                    if rows.size:
                        along[t] += float(consts.cross[bi][t] @ weights[rows])
        if aligned is not None:
            along += aligned[bi]
        change_t = -step_scale[b.positions] * along
        acc = sums.setdefault(b.name, _Sums())
        acc.dot += float(dots.sum())
        acc.hh += float(hh_t.sum())
        acc.mean_norm2 += float(mean_norm2.sum())
        acc.inside += inside
        acc.change += float(change_t.sum())
        # the step the base optimizer would have taken from the gradient the surgery received
        acc.unprotected += float((-step_scale[b.positions] * dots).sum())
        if per_tensor:
            index = plan.param_indices
            mine = extra.setdefault(b.name, {})
            for t, p in enumerate(b.positions):
                i = index[p]
                mine[f"cosine/{i}"] = float(dots[t] / max(np.sqrt(hh_t[t] * mean_norm2[t]), 1e-300))
                mine[f"energy_removed/{i}"] = float(removed[p]) / hh_all if hh_all > 0 else 0.0
                mine[f"predicted_change/{i}"] = float(change_t[t])

    out: dict[str, dict[str, float]] = {}
    for name, acc in sums.items():
        denom = max(acc.hh, 1e-300)
        stats = {
            "cosine": float(acc.dot / max(np.sqrt(acc.hh * acc.mean_norm2), 1e-300)),
            "conflict": float(acc.dot < 0.0),
            "energy_in_subspace": min(acc.inside / denom, 1.0) if acc.hh > 0 else 0.0,
            "energy_removed": joint_removed,
            "predicted_change": acc.change,
            "predicted_change_unprotected": acc.unprotected,
            "grad_norm": float(np.sqrt(acc.hh)),
        }
        stats.update(extra.get(name, {}))
        out[name] = stats
    return out
