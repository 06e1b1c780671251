"""Fisher damping: a preconditioner ``g / (1 + lam F_hat)`` from the protected Fisher diagonal.

The Fisher diagonal ``F`` is the mean of the squared protected gradient samples (the
empirical Fisher, as EWC estimates it from per-batch gradients; Kirkpatrick et al., 2017,
"Overcoming catastrophic forgetting in neural networks"), averaged online across merges
(``F <- decay F + (1 - decay) F_new``). ``F_hat`` is ``F`` scaled to mean 1 over the
objective's entries, so that ``lam = 1`` halves the step of a coordinate of average
importance whatever the scale of the protected loss; several objectives add their
``lam F_hat``.

This is *not* EWC: EWC adds the gradient of the penalty ``lam/2 sum F (theta - theta*)^2``
around the parameters ``theta*`` where the protected objective was learnt (a restoring
force); damping only slows the step at the current point. It applies with every mode,
before the projections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["merge_fisher", "mean_squared", "normalized", "keeps_fisher", "damping_factors"]

_EPS = 1e-30


def keeps_fisher(scope: str, damping: float, ewc: float = 0.0) -> bool:
    """Whether an objective keeps a Fisher diagonal: flat scopes always (the report's
    ``fisher_step``), factored ones only to damp or for the EWC penalty."""
    return scope != "factored" or damping > 0 or ewc > 0


def merge_fisher(previous: torch.Tensor | None, S: torch.Tensor, decay: float) -> torch.Tensor:
    """The online average of the previous Fisher and the mean of squared rows of ``S`` (m, N)."""
    new = mean_squared(None, 0, S)
    if previous is None:
        return new
    return previous * decay + new * (1.0 - decay)


def mean_squared(previous: torch.Tensor | None, count: int, S: torch.Tensor) -> torch.Tensor:
    """The mean of the squared rows of ``S`` (m, N) together with ``count`` earlier samples
    whose mean square is ``previous`` (``None``: no earlier samples)."""
    s = S.to(torch.float32)
    if previous is None or count == 0:
        return (s * s).mean(dim=0)
    return (previous * count + (s * s).sum(dim=0)) / (count + s.shape[0])


def normalized(fisher: torch.Tensor, mean: float | None = None) -> torch.Tensor:
    """``F`` scaled to mean 1 (over ``fisher``'s entries, or by a given global ``mean``:
    a sharded Fisher holds only this rank's entries). An all-zero Fisher stays zero."""
    if mean is None:
        f = fisher.double()
        return (f / f.mean().clamp_min(_EPS)).to(fisher.dtype)
    return fisher / max(float(mean), _EPS)


def damping_factors(
    objectives: Sequence[tuple[float, Callable[[], torch.Tensor], Sequence[int], Sequence[slice]]],
    pos_of: Mapping[int, int],
) -> list[torch.Tensor | None]:
    """Per plan position, ``1 / (1 + sum_o lam_o F_hat_o)`` over the entries, or None (no damping).

    ``objectives``: per objective ``(lam, normalized Fisher (called only when lam > 0),
    covered parameter indices, each one's entries in the Fisher)``; ``pos_of``: parameter
    index -> plan position, for the parameters in this step.
    """
    excess: list[torch.Tensor | None] = [None] * len(pos_of)
    for lam, fisher, coverage, slices in objectives:
        if lam <= 0:
            continue
        f_hat = fisher()
        for i, sl in zip(coverage, slices):
            p = pos_of.get(i)
            if p is None:
                continue
            part = lam * f_hat[sl]
            excess[p] = part.clone() if excess[p] is None else excess[p] + part
    return [None if e is None else 1.0 / (1.0 + e) for e in excess]
