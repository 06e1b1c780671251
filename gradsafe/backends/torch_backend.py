"""The pure-torch backend: per-tensor BLAS matrix-vector products on k-major bases.

Per covered tensor and objective, one ``mv`` (coefficients) and one in-place ``addmv_``
(combine); damping is one ``_foreach_mul_``; the squared norms one ``_foreach_norm``. The
coefficients of all tensors land in one flat buffer that crosses to the host once per step;
the weights come back in one transfer. Tensors that are not contiguous float32 are worked on
in a float32 copy that is written back.
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import Plan
from .base import StepRecord

__all__ = ["TorchBackend"]


class TorchBackend:
    name = "torch"

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
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
        for b in plan.blocks:
            C = coefs[b.coef_offset : b.coef_offset + b.coef_numel].view(b.num_tensors, b.num_rows)
            for t, (pos, sl) in enumerate(zip(b.positions, b.slices)):
                torch.mv(b.rows[:, sl], work[pos], out=C[t])
        norms = torch._foreach_norm(work)
        torch.stack(norms, out=coefs[plan.norms_offset :]).square_()
        host = coefs.cpu().numpy()  # the step's one device-to-host transfer

        weights = None
        if any(b.acts for b in plan.blocks):
            weights = plan.rule.solve(host)
            W = torch.from_numpy(weights.astype(np.float32)).to(plan.device)
            for b in plan.blocks:
                if not b.acts:
                    continue
                Wb = W[b.coef_offset : b.coef_offset + b.coef_numel].view(b.num_tensors, b.num_rows)
                live = b.apply_rows()
                for t, (pos, sl) in enumerate(zip(b.positions, b.slices)):
                    work[pos].addmv_(b.rows[live, sl].T, Wb[t, live])

        for t, w in writeback:
            t.copy_(w.view_as(t))
        return StepRecord(coefs=host, weights=weights)
