"""The step's additive terms, outside the joint rule: EWC's penalty gradient before the
surgery, SafeGrad's ``rho r`` after it (formulas: ``gradsafe.operators.ewc`` and
``gradsafe.operators.safegrad``; docs/math.md section 8)."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch

from .objective import ProtectedObjective
from .operators.ewc import add_ewc_gradient_
from .operators.safegrad import add_alignment_term_
from .sharding import local

__all__ = ["add_penalty_gradients", "add_alignment_terms", "has_penalties", "has_alignment_terms"]


def has_penalties(objectives: Iterable[ProtectedObjective]) -> bool:
    return any(o.config.ewc > 0 for o in objectives)


def has_alignment_terms(objectives: Iterable[ProtectedObjective]) -> bool:
    return any(o.config.rho > 0 and o.memory.storage is not None for o in objectives)


def add_penalty_gradients(
    objectives: Iterable[ProtectedObjective], params: list[torch.Tensor], active: Collection[int]
) -> dict[str, torch.Tensor]:
    """Add every EWC objective's ``ewc F (theta - theta*)`` to the gradients of its active
    parameters; returns each one's penalty ``ewc/2 sum F (theta - theta*)^2`` (0-d tensors)."""
    penalties = {}
    for obj in objectives:
        cfg = obj.config
        if cfg.ewc <= 0:
            continue
        taken = [t for t, i in enumerate(obj.coverage) if i in active]
        if not taken:
            continue
        ps = [local(params[obj.coverage[t]]) for t in taken]
        grads = [local(params[obj.coverage[t]].grad) for t in taken]
        anchors = [obj.anchor[t] for t in taken]
        fishers = None
        if cfg.fisher == "samples":
            cols = obj.memory_slices()
            fishers = [obj.fisher[cols[t]].view(a.shape) for t, a in zip(taken, anchors)]
        penalties[obj.name] = add_ewc_gradient_(grads, ps, anchors, fishers, float(cfg.ewc))
    return penalties


def add_alignment_terms(
    objectives: Iterable[ProtectedObjective], params: list[torch.Tensor], active: Collection[int]
) -> None:
    """Add every objective's ``rho r`` (r: its mean reference) to the gradients of its
    active parameters."""
    for obj in objectives:
        rho = float(obj.config.rho)
        if rho <= 0 or obj.memory.storage is None:
            continue
        mean = obj.mean_ref
        grads, refs = [], []
        for t, sl in zip(obj.flat_index, obj.flat_slices()):
            i = obj.coverage[t]
            if i in active:
                g = local(params[i].grad)
                grads.append(g)
                refs.append(mean[sl].view(g.shape))
        add_alignment_term_(grads, refs, rho)
        for t, factor in obj.factors.items():
            i = obj.coverage[t]
            if i in active:
                row = factor.reference_row()
                g = local(params[i].grad)
                if g.dtype == torch.float32:
                    row.add_to(g.view(row.shape), torch.tensor([rho], device=g.device))
                else:
                    g.view(row.shape).add_((row.X @ row.Y).to(g.dtype), alpha=rho)
