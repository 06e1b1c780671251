"""The operator families, one per file, each citing the paper it implements.

The registry below is the one place that maps a configuration to its operator: the first
whose ``selects(config)`` holds. Adding an operator means adding its file and one line here.

| file | operator | selected by |
|---|---|---|
| ``observe.py`` | no surgery, the monitor's view | ``mode="observe"``, or ``"project"`` with ``strength=0`` |
| ``projection.py`` | orthogonal projection (OGD / GPM) | ``mode="project"``, ``strength=1`` |
| ``sgp.py`` | scaled gradient projection (SGP, one importance per direction) | ``mode="project"``, ``importance="sgp"`` |
| ``scaled.py`` | scaled projection (one strength per objective) | ``mode="project"``, ``0 < strength < 1`` |
| ``conflict.py`` | conflict projection (A-GEM / GEM / SafeGrad) | ``mode="conflict"`` |
| ``damping.py`` | Fisher damping (a preconditioner) | ``damping > 0``, with any mode |
| ``ewc.py`` | the EWC / online EWC / L2-SP penalty's gradient | ``ewc > 0``, with any mode |
| ``safegrad.py`` | SafeGrad's ``rho r`` term after the surgery | ``rho > 0``, with any mode |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Operator, RowSpan, RuleRows
from .conflict import ConflictProjection
from .observe import Observe
from .projection import OrthogonalProjection
from .scaled import ScaledProjection
from .sgp import ImportanceScaledProjection

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = [
    "OPERATORS",
    "Operator",
    "RowSpan",
    "RuleRows",
    "operator_for",
    "Observe",
    "OrthogonalProjection",
    "ScaledProjection",
    "ImportanceScaledProjection",
    "ConflictProjection",
]

OPERATORS: tuple[Operator, ...] = (
    ImportanceScaledProjection(),  # first: it checks that importance="sgp" comes with mode "project"
    Observe(),
    OrthogonalProjection(),
    ScaledProjection(),
    ConflictProjection(),
)


def operator_for(config: "ObjectiveConfig") -> Operator:
    """The operator that implements ``config``."""
    for op in OPERATORS:
        if op.selects(config):
            return op
    raise ValueError(f"no operator implements mode={config.mode!r} with strength={config.strength!r}")
