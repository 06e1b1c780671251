"""The backend interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..plan import Plan

__all__ = ["Backend", "StepRecord"]


def _host(x: np.ndarray | torch.Tensor | None) -> np.ndarray | None:
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.detach().to("cpu", torch.float64).numpy()


@dataclass
class StepRecord:
    """What one step measured, in the plan's flat layouts.

    ``coefs``: the coefficients (each block's ``rows @ h_t``, then ``||h_t||^2``);
    ``weights``: what the rule chose (None when no objective acts, or the step was not
    finite). Either may be a host array or a device tensor: a backend that never
    synchronises leaves tensors here, and they are read on the host only when a report is
    asked for.
    """

    coefs: np.ndarray | torch.Tensor
    weights: np.ndarray | torch.Tensor | None
    #: False when the covered tensors held a non-finite value and the surgery left them
    #: alone; a 0-d bool device tensor from a backend that does not synchronise
    finite: bool | torch.Tensor = True

    def is_finite(self) -> bool:
        """``finite`` as a host bool (a device synchronisation if it is a device tensor)."""
        return bool(self.finite)

    def host(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Both as float64 host arrays (a device synchronisation if they are on a device)."""
        return _host(self.coefs), _host(self.weights)


class Backend(Protocol):
    name: str

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
        """Apply the plan's surgery in place to ``tensors`` (aligned with ``plan.param_indices``)."""
        ...
