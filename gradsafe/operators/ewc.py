"""Elastic weight consolidation: the gradient of a quadratic penalty around an anchor.

EWC (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural networks")
keeps the parameters near ``theta*``, where the protected task was learnt, in proportion
to each parameter's Fisher information ``F``:

    L_ewc(theta) = lam / 2 * sum_i F_i (theta_i - theta*_i)^2,
    grad L_ewc   = lam * F * (theta - theta*),

a restoring force that the step adds to the new task's gradient (before any surgery, so
that projections and conflict constraints see the whole gradient). ``F`` is the diagonal
Fisher of the protected task; from gradient samples ``g_1..g_n`` it is ``mean_j g_j^2``
(for per-batch gradients exactly Avalanche's batched empirical Fisher; per-example
estimators: ``gradsafe.fisher_diagonal``). Each objective is one task with its own anchor
and Fisher ("separate" EWC: the penalties of several objectives add up).

- Online EWC (Schwarz et al., 2018, "Progress & Compress"): one objective for all tasks;
  consolidating a new task makes the Fisher ``gamma F_old + F_new`` and moves the anchor
  to the current parameters (``ProtectedOptimizer.consolidate``).
- L2-SP (Li et al., 2018, "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks") is the same penalty with ``F = 1`` (``fisher="identity"``)
  around the pretrained parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["add_ewc_gradient_", "online_fisher"]


def add_ewc_gradient_(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor] | None,
    lam: float,
) -> torch.Tensor:
    """Add ``lam F (theta - theta*)`` to each gradient in place (``fishers=None``: ``F = 1``).

    Returns the penalty ``lam / 2 * sum F (theta - theta*)^2`` at these parameters, a 0-d
    float64 tensor on the parameters' device (no host synchronisation).
    """
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    diff = torch._foreach_sub([p.detach() for p in params], list(anchors))
    weighted = diff if fishers is None else torch._foreach_mul(diff, list(fishers))
    torch._foreach_add_(list(grads), weighted, alpha=lam)
    sums = [torch.dot(w.reshape(-1), d.reshape(-1).to(w.dtype)).double() for w, d in zip(weighted, diff)]
    return torch.stack(sums).sum() * (0.5 * lam)


def online_fisher(previous: torch.Tensor, new: torch.Tensor, gamma: float) -> torch.Tensor:
    """Online EWC's Fisher after consolidating a task: ``gamma F_old + F_new``."""
    return previous * gamma + new
