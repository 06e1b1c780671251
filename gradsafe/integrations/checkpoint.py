"""``torch.distributed.checkpoint`` (DCP) and the objectives' memory.

DCP's ``get_optimizer_state_dict`` keeps only ``"state"`` (per parameter, keyed by name) and
``"param_groups"``: the ``"gradsafe"`` entry of ``ProtectedOptimizer.state_dict()`` (bases,
references, Fisher, counters) is dropped, and ``set_optimizer_state_dict`` therefore restores
the base optimizer only. Both functions also run a "fake" ``step()`` with zero gradients and
lr 0 when the optimizer has no state yet (a fresh optimizer; SGD without momentum every time
its gradients are ``None``); gradsafe does not count a step whose covered gradients are
all exactly zero, so that step changes neither counters nor report.

This module gives the memory its own entry in a DCP checkpoint:

- ``GradsafeMemory(opt)``: a ``Stateful`` holding only the memory (as one bytes value, so the
  checkpoint's layout does not depend on the objectives' ranks or names).
- ``GradsafeAppState(model, opt)``: the ``Stateful`` of the DCP tutorial (model + optimizer
  through ``get_state_dict``/``set_state_dict``) plus the memory, in the order that makes a
  resumed run continue exactly: the fake steps DCP runs are undone for the counters.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ..optimizer import ProtectedOptimizer
from ._common import find_protected_optimizer

__all__ = ["GradsafeAppState", "GradsafeMemory", "memory_state", "load_memory_state"]


def _protected(optimizer: Any) -> ProtectedOptimizer:
    opt = find_protected_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"expected a ProtectedOptimizer (possibly wrapped), got {type(optimizer).__name__}")
    return opt


def memory_state(optimizer: Any) -> dict[str, Any]:
    """The ``"gradsafe"`` part of the optimizer's state dict (memory, configuration, counters)."""
    return _protected(optimizer).gradsafe_state_dict()


def load_memory_state(optimizer: Any, memory: dict[str, Any]) -> None:
    """Restore what ``memory_state`` returned, leaving the base optimizer's state as it is."""
    _protected(optimizer).load_gradsafe_state_dict(memory)


class GradsafeMemory:
    """A DCP ``Stateful`` for the objectives' memory of ``optimizer``.

    ``dcp.save({"model": ..., "optim": ..., "gradsafe": GradsafeMemory(opt)}, ...)``; on load,
    DCP calls ``load_state_dict`` and the memory (and the counters) are restored. Load it
    *after* ``set_optimizer_state_dict``: that function's fake step would otherwise count.
    The memory travels as one bytes value (``torch.save``), read back with
    ``weights_only=True``; every rank saves and loads the same, replicated memory.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(memory_state(self.optimizer), buffer)
        return {"memory": buffer.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        blob = state_dict["memory"]
        if isinstance(blob, io.BytesIO):
            blob = blob.getvalue()
        if not isinstance(blob, (bytes, bytearray)):
            raise TypeError(f"expected the saved memory as bytes, got {type(blob).__name__}")
        load_memory_state(self.optimizer, torch.load(io.BytesIO(bytes(blob)), weights_only=True))


class GradsafeAppState:
    """Model, optimizer and gradsafe memory as one DCP ``Stateful``.

    ``dcp.save({"app": GradsafeAppState(model, opt)}, checkpoint_id=...)`` and
    ``dcp.load({"app": GradsafeAppState(model, opt)}, checkpoint_id=...)``. Model and base
    optimizer go through ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` /
    ``set_state_dict``, so they reshard like any DCP state); the memory is added as bytes.
    The fake zero-gradient step DCP may run is undone for gradsafe's counters on both sides.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, options: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        memory = memory_state(self.optimizer)
        opt = _protected(self.optimizer)
        steps = opt.gradsafe_steps
        model_sd, optim_sd = get_state_dict(self.model, opt, options=self.options)
        if opt.gradsafe_steps != steps:  # DCP ran its fake step: give the counters back
            load_memory_state(opt, memory)
        buffer = io.BytesIO()
        torch.save(memory, buffer)
        return {"model": model_sd, "optim": optim_sd, "gradsafe": buffer.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        opt = _protected(self.optimizer)
        set_state_dict(self.model, opt, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"], options=self.options)
        GradsafeMemory(opt).load_state_dict({"memory": state_dict["gradsafe"]})
