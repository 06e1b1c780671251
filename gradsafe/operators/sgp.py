"""Scaled Gradient Projection (SGP): each basis direction scaled by its importance.

Saha and Roy, 2023, "Continual Learning with Scaled Gradient Projection" (AAAI). GPM
projects the new gradient off the protected basis ``U`` entirely; SGP removes from each
basis direction ``u_i`` only the fraction given by its importance

    lam_i = (alpha + 1) sigma_i / (alpha sigma_i + sigma_max),

where ``sigma_i`` are the singular values of the protected samples that the basis keeps
(``sigma_max`` the largest of the objective's basis, per tensor with scope "tensor", as
SGP computes it per layer) and ``alpha > 0`` (option ``scale``) sets how fast the
importance grows. The step of one objective is

    g' = g - sum_i lam_i u_i u_i^T g  =  g - U^T diag(lam) U g.

The most important direction (``lam = 1``) is removed exactly; weak ones are only slowed.
Jointly with other objectives each direction enters the rule with its own penalty
``E_i = (1 - lam_i) / lam_i`` on its coefficient (docs/math.md section 4), which gives the
formula above for one objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import RowSpan, RuleRows
from .projection import OrthogonalProjection

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["ImportanceScaledProjection", "sgp_importance"]


def sgp_importance(sigma: np.ndarray, alpha: float) -> np.ndarray:
    """SGP's importance of each direction, ``(alpha + 1) sigma / (alpha sigma + sigma_max)``.

    ``sigma``: ``(k,)`` singular values, or ``(T, k)`` with ``sigma_max`` taken per row.
    Directions with ``sigma = 0`` (padding) get importance 0.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    top = sigma.max(axis=-1, keepdims=True) if sigma.size else sigma
    denom = alpha * sigma + top
    return np.where(denom > 0, (alpha + 1.0) * sigma / np.where(denom > 0, denom, 1.0), 0.0)


class ImportanceScaledProjection(OrthogonalProjection):
    title = "scaled gradient projection (SGP, per-direction importance)"
    paper = "Saha and Roy 2023 (SGP)"

    def selects(self, config: "ObjectiveConfig") -> bool:
        return config.importance == "sgp"

    def check(self, config: "ObjectiveConfig") -> None:
        if config.mode != "project":
            raise ValueError("importance='sgp' applies to mode='project' only")
        if config.strength != 1.0:
            raise ValueError("importance='sgp' scales each direction by its own importance; leave strength at 1")
        if config.scope == "factored":
            raise ValueError("importance='sgp' needs scope 'global' or 'tensor' (a factored operator has one strength)")

    def rule_rows(self, config: "ObjectiveConfig", span: RowSpan, energies=None) -> RuleRows:
        if energies is None:
            raise ValueError("importance='sgp' needs the basis's singular values")
        lam = sgp_importance(np.asarray(energies)[..., : span.n_basis], float(config.scale))
        # a zero row (lam = 0, padding) has a zero column in the rule: any penalty leaves it at 0
        penalty = np.where(lam > 0, (1.0 - lam) / np.where(lam > 0, lam, 1.0), 0.0)
        return RuleRows(
            basis_rows=tuple(range(span.n_basis)),
            penalty=penalty,
            apply_rows=slice(0, span.n_basis),
            acts=True,
        )
