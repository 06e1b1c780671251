"""Interference statistics of a step, from the coefficients and the weights alone.

No statistic here needs another pass over the gradient: every one follows from the numbers
the coefficient pass wrote (each block's ``rows @ h_t`` and ``|h_t|^2``), the weights the
rule chose, and matrices that depend only on the memory (computed once per plan).
Formulas: docs/monitor.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .factored import STAT_BOTH, STAT_DOT, STAT_DOT_AFTER, STAT_LEFT, STAT_RIGHT
from .numerics import PINV_RTOL, LowRankRow, operand_gram
from .sharding import all_reduce_arrays

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

__all__ = ["STATS", "PER_TENSOR_STATS", "ReportConstants", "step_report"]

STATS = ("cosine", "conflict", "energy_in_subspace", "energy_removed", "predicted_change",
         "predicted_change_unprotected", "grad_norm")
PER_TENSOR_STATS = ("cosine", "energy_removed", "predicted_change")


@dataclass
class ReportConstants:
    """Per plan: |r_mean|^2 per block and tensor, constraint Gram inverses, cross Grams."""

    mean_norm2: list[np.ndarray]  # per block: |r_mean restricted to tensor t|^2, (T_b,)
    constraint_pinv: list[np.ndarray | None]  # per block: (1 or T_b, m, m)
    cross: list[list[np.ndarray]]  # per block, per tensor: acting rows on the tensor @ r_mean

    @classmethod
    def of(cls, plan: "Plan") -> "ReportConstants":
        cached = plan.cache.get("report")
        if cached is not None:
            return cached
        rule = plan.rule
        mean_norm2, constraint_grams, cross = [], [], []
        for bi, b in enumerate(plan.blocks):
            means = [b.mean_operand(t) for t in range(b.num_tensors)]
            mean_norm2.append(np.array([float(operand_gram([m])[0, 0]) for m in means]))
            cons = b.constraint_rows()
            if cons:
                grams = []
                for t in range(b.num_tensors):
                    op = b.operand(t)
                    grams.append(operand_gram([op if isinstance(op, LowRankRow) else op[cons]]))
                constraint_grams.append(np.stack([sum(grams)]) if b.scope == "global" else np.stack(grams))
            else:
                constraint_grams.append(None)
            per_tensor = []
            for t, p in enumerate(b.positions):
                acting = [plan.blocks[bj].operand(rule.local_index[(bj, p)]) for bj, _ in plan.touching[p] if bj in rule.local[p]]
                if acting:
                    G = operand_gram(acting + [means[t]])
                    per_tensor.append(G[:-1, -1])
                else:
                    per_tensor.append(np.zeros(0))
            cross.append(per_tensor)
        if plan.shard is not None:  # every entry is a sum over entries: add the ranks' parts
            flat = mean_norm2 + [g for g in constraint_grams if g is not None] + [c for per in cross for c in per]
            flat = all_reduce_arrays(flat, plan.shard)
            nb = len(mean_norm2)
            mean_norm2, rest = flat[:nb], iter(flat[nb:])
            constraint_grams = [None if g is None else next(rest) for g in constraint_grams]
            cross = [[next(rest) for _ in per] for per in cross]
        constraint_pinv = [None if g is None else np.linalg.pinv(g, rcond=PINV_RTOL, hermitian=True) for g in constraint_grams]
        consts = plan.cache["report"] = cls(mean_norm2, constraint_pinv, cross)
        return consts


def _alignment_cross(plan: "Plan") -> list[np.ndarray]:
    """Per block and tensor: ``sum_o rho_o <r_o, r_mean>`` on the tensor over the blocks ``o``
    with a SafeGrad term (``rho > 0``): what those terms add to ``<r_mean, x_t>``."""
    cached = plan.cache.get("report_alignment")
    if cached is not None:
        return cached
    out = []
    for b in plan.blocks:
        per_tensor = np.zeros(b.num_tensors)
        for t, p in enumerate(b.positions):
            mine = b.mean_operand(t)
            for bo, _ in plan.touching[p]:
                other = plan.blocks[bo]
                if other.rho > 0:
                    t_o = other.positions.index(p)
                    per_tensor[t] += other.rho * float(operand_gram([mine, other.mean_operand(t_o)])[0, 1])
        out.append(per_tensor)
    if plan.shard is not None:
        out = all_reduce_arrays(out, plan.shard)
    plan.cache["report_alignment"] = out
    return out


def _tensor_weights(plan: "Plan", weights: np.ndarray, p: int) -> np.ndarray:
    """All weights of the acting rows on tensor ``p``, in the order of the tensor's Gram matrix."""
    rule = plan.rule
    w_p = np.empty(rule.tensor_grams[p].shape[0])
    for bi, off in rule.local[p].items():
        b = plan.blocks[bi]
        t = rule.local_index[(bi, p)]
        start = b.coef_offset + t * b.num_rows
        w_p[off : off + b.num_rows] = weights[start : start + b.num_rows]
    return w_p


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
    w_by_pos: dict[int, np.ndarray] = {}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        for p, gram in enumerate(plan.rule.tensor_grams):
            if gram.shape[0]:
                w_by_pos[p] = _tensor_weights(plan, weights, p)
                removed[p] += float(w_by_pos[p] @ gram @ w_by_pos[p])

    # energy_removed is joint: the surgery solves one problem over every covered tensor, and
    # its change restricted to one objective's tensors can exceed their own gradient energy
    hh_all = float(hh.sum())
    joint_removed = float(removed.sum()) / hh_all if hh_all > 0 else 0.0
    sums: dict[str, _Sums] = {}
    extra: dict[str, dict[str, float]] = {}
    aligned = _alignment_cross(plan) if alignment_after and any(b.rho > 0 for b in plan.blocks) else None
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
        for t, p in enumerate(b.positions):
            if p in w_by_pos:
                along[t] += float(consts.cross[bi][t] @ w_by_pos[p])
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
