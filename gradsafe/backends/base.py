"""The backend interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..plan import Plan

__all__ = ["Backend", "StepRecord"]


@dataclass
class StepRecord:
    """What one step measured: the flat coefficients and the weights the rule chose (host)."""

    coefs: np.ndarray
    weights: np.ndarray | None


class Backend(Protocol):
    name: str

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
        """Apply the plan's surgery in place to ``tensors`` (aligned with ``plan.param_indices``)."""
        ...
