"""Observe: the surgery off, the monitor on.

The step reads the basis and the mean reference so that the report can say how much of the
gradient lies in the protected subspace and how the protected loss is predicted to move,
and hands the gradient on unchanged (damping, if asked for, still applies). A projection
with ``strength=0`` is the same operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Operator

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["Observe"]


class Observe(Operator):
    mode = "observe"
    title = "observe (no surgery)"

    def selects(self, config: "ObjectiveConfig") -> bool:
        return config.mode == "observe" or (config.mode == "project" and config.strength == 0)
