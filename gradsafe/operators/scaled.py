"""Scaled (soft) projection: a fraction ``strength`` of the protected component is removed.

With one objective and ``0 < s < 1`` the step is ``g' = g - s U^T (U g)``: the protected
directions are slowed, not frozen, which leaves room to learn the new task. SGP (Saha and
Roy, 2023, "Continual Learning with Scaled Gradient Projection") scales each basis
direction by its own importance, computed from its singular value; this operator scales
every direction of an objective by the same ``s`` (the per-direction form is a separate
operator). Jointly with other objectives ``s`` is the penalty ``E = (1 - s) / s`` on the
basis coefficients (docs/math.md section 4), exact for one objective and well-posed with
hard constraints and overlapping bases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .projection import OrthogonalProjection

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["ScaledProjection", "penalty_of_strength"]


def penalty_of_strength(strength: float) -> float:
    """The basis-coefficient penalty ``(1 - s) / s`` that makes the joint rule remove ``s``."""
    return (1.0 - strength) / strength


class ScaledProjection(OrthogonalProjection):
    title = "scaled projection (uniform strength)"
    paper = "Saha and Roy 2023 (SGP), with one strength per objective"

    def selects(self, config: "ObjectiveConfig") -> bool:
        return config.mode == "project" and 0.0 < config.strength < 1.0

    def penalty(self, config: "ObjectiveConfig") -> float:
        return penalty_of_strength(float(config.strength))
