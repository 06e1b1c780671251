"""How a step of surgery is executed.

A backend takes a ``Plan`` and the covered tensors (gradients, or update vectors in space
"update"), changes the tensors in place, and returns a ``StepRecord`` with what it measured.

- ``"torch"``: ``TorchBackend``, per-tensor BLAS on k-major rows, the rule on the host;
- ``"triton"``: ``TritonBackend``, fused kernels with the rule on the device (CUDA tensors;
  CPU tensors only under ``TRITON_INTERPRET=1``, for tests). An error if triton cannot run;
- ``"auto"`` (or ``None`` without ``GRADSAFE_BACKEND``): ``AutoBackend``, which picks per
  plan: Triton when the plan's tensors are on CUDA and triton imports, else torch.

``GRADSAFE_BACKEND`` (``torch``, ``triton`` or ``auto``) overrides the auto choice when
``backend=None``. ``import gradsafe`` never imports triton.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..plan import Plan
from .base import Backend, StepRecord
from .torch_backend import TorchBackend

__all__ = ["Backend", "StepRecord", "TorchBackend", "AutoBackend", "get_backend", "BACKENDS", "triton_available"]

BACKENDS = ("torch", "triton", "auto")
ENV_VAR = "GRADSAFE_BACKEND"


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (triton installed and importable)."""
    from .triton_backend import triton_unavailable_reason

    return triton_unavailable_reason() is None


class AutoBackend:
    """Triton for plans on CUDA when triton imports, torch otherwise (decided per plan device)."""

    name = "auto"

    def __init__(self) -> None:
        self._torch = TorchBackend()
        self._triton: Any = None
        self._triton_ok: bool | None = None
        self.last: str | None = None  # the backend the last step ran on

    def choose(self, device: torch.device) -> Backend:
        if torch.device(device).type == "cuda":
            if self._triton_ok is None:
                self._triton_ok = triton_available()
                if self._triton_ok:
                    from .triton_backend import TritonBackend

                    try:
                        self._triton = TritonBackend()
                    except RuntimeError:
                        self._triton_ok = False
            if self._triton_ok:
                from .. import kernels

                if not kernels.INTERPRETED:
                    return self._triton
        return self._torch

    def can_subtract(self, plan: Plan) -> bool:
        """Whether the backend ``plan`` runs on takes ``subtract_from`` for it (``TorchBackend.run``)."""
        can = getattr(self.choose(plan.device), "can_subtract", None)
        return can is not None and can(plan)

    def run(self, plan: Plan, tensors: list[torch.Tensor], subtract_from: list[torch.Tensor] | None = None) -> StepRecord:
        backend = self.choose(plan.device)
        self.last = backend.name
        if subtract_from is None:
            return backend.run(plan, tensors)
        return backend.run(plan, tensors, subtract_from=subtract_from)


def get_backend(name: "str | Backend | None" = None) -> Backend:
    """Resolve a backend.

    ``None``: the environment's ``GRADSAFE_BACKEND`` if set, else ``"auto"``. A string:
    ``"torch"``, ``"triton"`` (raises ``RuntimeError`` if triton cannot be imported) or
    ``"auto"``. An object with a ``run(plan, tensors)`` method (e.g. a configured
    ``TritonBackend(basis_dtype=torch.bfloat16)``) is returned as is.
    """
    if name is None:
        name = os.environ.get(ENV_VAR) or "auto"
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}")
    if not isinstance(name, str):
        if callable(getattr(name, "run", None)):
            return name
        raise TypeError(f"backend must be a string, None or an object with run(plan, tensors), got {type(name).__name__}")
    if name == "torch":
        return TorchBackend()
    if name == "auto":
        return AutoBackend()
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
