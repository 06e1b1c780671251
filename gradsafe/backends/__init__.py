"""How a step of surgery is executed.

A backend takes a ``Plan`` and the covered tensors (gradients, or update vectors in space
"update"), changes the tensors in place, and returns a ``StepRecord`` with what it measured.
"""

from __future__ import annotations

import os

from .base import Backend, StepRecord
from .torch_backend import TorchBackend

__all__ = ["Backend", "StepRecord", "TorchBackend", "get_backend", "BACKENDS"]

BACKENDS = ("torch",)


def get_backend(name: str | None = None) -> Backend:
    """Resolve a backend by name; None means the environment's ``GRADSAFE_BACKEND``, else auto."""
    if name is None:
        name = os.environ.get("GRADSAFE_BACKEND") or "torch"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        raise RuntimeError("the Triton backend is not available in this version of gradsafe; use backend='torch'")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
