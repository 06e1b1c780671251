"""The operator families, one per file, each citing the paper it implements.

The registry below is the one place that maps a configuration to its operator: the first
whose ``selects(config)`` holds. Adding an operator means adding its file and one line here.

| file | operator | selected by |
|---|---|---|
| ``observe.py`` | no surgery, the monitor's view | ``mode="observe"``, or ``"project"`` with ``strength=0`` |
| ``projection.py`` | orthogonal projection (OGD / GPM) | ``mode="project"``, ``strength=1`` |
| ``scaled.py`` | scaled projection (one strength per objective) | ``mode="project"``, ``0 < strength < 1`` |
| ``conflict.py`` | conflict projection (A-GEM / GEM / SafeGrad) | ``mode="conflict"`` |
| ``damping.py`` | Fisher damping (a preconditioner) | ``damping > 0``, with any mode |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Operator, RowSpan, RuleRows
from .conflict import ConflictProjection
from .observe import Observe
from .projection import OrthogonalProjection
from .scaled import ScaledProjection

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
    "ConflictProjection",
]

OPERATORS: tuple[Operator, ...] = (
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
