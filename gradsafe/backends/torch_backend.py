"""The pure-torch backend: per-tensor BLAS matrix-vector products on k-major bases.

Factored operators first (``gradsafe.factored.run_factor_ops``: matmuls and one ``addmm_``
per matrix). Then per covered tensor and objective, one ``mv`` (coefficients) and one
in-place ``addmv_`` (combine), or a matmul and an ``addmm_`` for a factored reference; damping is one ``_foreach_mul_``; each tensor's squared norm is a ``dot`` right
after its first ``mv``, while the tensor is still in cache. The
coefficients of all tensors land in one flat buffer that crosses to the host once per step;
the weights come back in one transfer. Tensors that are not contiguous float32 are worked on
in a float32 copy that is written back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..factored import factor_finish, factor_partials, partials_finite, run_factor_ops, sum_across_ranks
from ..numerics import LowRankRow
from ..plan import Plan
from .base import StepRecord

__all__ = ["TorchBackend"]


@dataclass
class _Views:
    """Per-plan views, built once: (tensor position, operand, where its numbers go) per pass.

    An operand is a dense ``(r, n)`` row view or a ``LowRankRow`` (factored references).
    """

    coef: list[tuple[int, "torch.Tensor | LowRankRow", int, bool]]  # ..., whether it is the tensor's first read
    apply: list[tuple[int, "torch.Tensor | LowRankRow", slice]]
    # whether a row's coefficient reads a tensor after its factored operator (then the
    # operator must act before the coefficient pass)
    rows_after_factored: bool = False


def _views(plan: Plan) -> _Views:
    cached = plan.cache.get("torch")
    if cached is None:
        coef, apply = [], []
        # the factored stage writes the squared norms of the tensors it reads
        seen: set[int] = {op.position for op in plan.factor_ops}
        for b in plan.blocks:
            if b.stats_block:
                continue  # its numbers come from the factored stage
            live = b.apply_rows()
            for t, pos in enumerate(b.positions):
                op = b.operand(t)
                coef.append((pos, op, b.coef_offset + t * b.num_rows, pos not in seen))
                seen.add(pos)
                if b.acts and live.stop > live.start:
                    offset = b.coef_offset + t * b.num_rows
                    applied = op if isinstance(op, LowRankRow) else op[live].T
                    apply.append((pos, applied, slice(offset + live.start, offset + live.stop)))
        # The apply pass runs in reverse: the rows read last by the coefficient pass are the
        # likeliest still to be in cache.
        factored = {op.position for op in plan.factor_ops}
        cached = plan.cache["torch"] = _Views(coef, apply[::-1], any(pos in factored for pos, *_ in coef))
    return cached


class TorchBackend:
    name = "torch"

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
        views = _views(plan)
        work: list[torch.Tensor] = []
        writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in tensors:
            if t.dtype == torch.float32 and t.is_contiguous():
                work.append(t.view(-1))
            else:
                w = t.detach().reshape(-1).to(torch.float32, copy=True)
                work.append(w)
                writeback.append((t, w))

        damped = [i for i, f in enumerate(plan.damp_factors) if f is not None]
        if damped:
            torch._foreach_mul_([work[i] for i in damped], [plan.damp_factors[i] for i in damped])

        coefs = torch.empty(plan.coef_numel, dtype=torch.float32, device=plan.device)
        norms = coefs[plan.norms_offset :]
        # the factored operators act first (docs/math.md section 7); when no row reads a
        # tensor they change, their sums across ranks (FSDP2) ride on the coefficients' all-reduce
        staged = partials = None
        finite = True
        if plan.factor_ops:
            if views.rows_after_factored:
                finite = run_factor_ops(plan.factor_ops, work, coefs, plan.shard)
            else:
                staged, partials = factor_partials(plan.factor_ops, work, coefs)
        for pos, rows, offset, first in views.coef:
            h = work[pos]
            if isinstance(rows, LowRankRow):
                coefs[offset] = rows.dot(h.view(rows.shape))
            else:
                torch.mv(rows, h, out=coefs[offset : offset + rows.shape[0]])
            if first:  # |h|^2 right after the first read of h, while it is still in cache
                torch.dot(h, h, out=norms[pos])
        if plan.shard is not None:  # FSDP2: each rank summed its own rows; one all-reduce
            sum_across_ranks(partials or [], plan.shard, extra=coefs)
        if staged is not None:
            if partials_finite(partials):
                factor_finish(staged, coefs)
            else:
                finite = False
        host = coefs.cpu().numpy()  # the step's one device-to-host transfer (factored plans: two)
        compiling = torch.compiler.is_compiling()
        if compiling:  # branch-free: zero weights below (damping, elementwise, stays)
            finite = np.isfinite(host).all() & finite
        elif not (finite and np.isfinite(host).all()):
            # a non-finite gradient entry (or a sum that overflowed): the rule would spread it
            # to every entry its rows touch. The tensors are handed back as they came (damping
            # undone, to rounding; copies are not written back).
            views_damped = [i for i in damped if work[i].data_ptr() == tensors[i].data_ptr()]
            if views_damped:
                torch._foreach_div_([work[i] for i in views_damped], [plan.damp_factors[i] for i in views_damped])
            return StepRecord(coefs=host, weights=None, finite=False)

        weights = None
        if views.apply:
            weights = plan.rule.solve(host)
            if compiling:
                weights = np.where(finite, weights, 0.0)
            W = torch.from_numpy(weights.astype(np.float32)).to(plan.device)
            for pos, rows_t, live in views.apply:
                if not compiling and not weights[live].any():
                    continue  # adding zero (a conflict constraint that holds): skip the pass
                if isinstance(rows_t, LowRankRow):
                    rows_t.add_to(work[pos].view(rows_t.shape), W[live])
                else:
                    work[pos].addmv_(rows_t, W[live])

        for t, w in writeback:
            t.copy_(w.view_as(t))
        return StepRecord(coefs=host, weights=weights, finite=finite)
