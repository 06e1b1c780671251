"""Hugging Face ``transformers.Trainer``: the optimizer, and the report in Trainer's logs.

Importing this module imports ``transformers``.

- ``Trainer(optimizers=(ProtectedOptimizer(...), scheduler_or_None))`` works as is.
- ``Trainer(optimizer_cls_and_kwargs=protected_optimizer_cls_and_kwargs(torch.optim.AdamW,
  {"lr": 1e-4}, protected_grads=..., samples_from=model, rank=8))``: Trainer then builds the
  optimizer on its own parameter groups (weight decay split), and the samples are re-aligned
  to that order.
- ``GradsafeCallback`` adds ``gradsafe/<objective>/<stat>`` to Trainer's training logs (the
  mean over the optimizer steps since the previous log). ``add_gradsafe_callback(trainer)``
  puts it before the reporting integrations, so TensorBoard / W&B / ... receive the keys too.
- ``protected_optimizer_from_kwargs(kwargs)`` in a ``TrainerCallback`` event gives the wrapper
  that Trainer steps (e.g. to ``protect(...)`` a new objective in the middle of a run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from ..optimizer import ProtectedOptimizer
from ._common import ProtectedOptimizerFromParams, ReportAccumulator, find_protected_optimizer

__all__ = [
    "GradsafeCallback",
    "add_gradsafe_callback",
    "protected_optimizer_cls_and_kwargs",
    "protected_optimizer_from_kwargs",
]


def protected_optimizer_cls_and_kwargs(
    base_cls: type[torch.optim.Optimizer],
    base_kwargs: Mapping[str, Any] | None = None,
    protected_grads: Mapping[str, Any] | None = None,
    *,
    samples_from: Any = None,
    **gradsafe_kwargs: Any,
) -> tuple[type[ProtectedOptimizerFromParams], dict[str, Any]]:
    """The ``(cls, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Trainer calls ``cls(param_groups, **kwargs)``; ``cls`` is ``ProtectedOptimizerFromParams``,
    which builds ``base_cls(param_groups, **base_kwargs)`` and wraps it with
    ``protected_grads`` and the gradsafe options (``mode``, ``rank``, ``space``, ...).
    Gradient samples are aligned with ``model.parameters()`` (what
    ``collect_gradients(model, ...)`` returns) and re-aligned to Trainer's order: pass
    ``samples_from=model`` for them. Trainer does not add its ``learning_rate`` to these kwargs: put
    ``lr`` into ``base_kwargs``.
    """
    kwargs: dict[str, Any] = {
        "base_cls": base_cls,
        "base_kwargs": dict(base_kwargs or {}),
        "protected_grads": protected_grads,
        **gradsafe_kwargs,
    }
    for reserved in ("model", "params", "optimizer_dict"):
        if reserved in kwargs:
            raise TypeError(f"{reserved!r} cannot be a keyword here: Trainer takes it out of the kwargs for itself")
    if samples_from is not None:
        kwargs["samples_from"] = samples_from
    # fail now, not deep inside Trainer: the class validates its arguments at construction
    if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
        raise TypeError(f"base_cls must be a torch.optim.Optimizer subclass, got {base_cls!r}")
    return ProtectedOptimizerFromParams, kwargs


class GradsafeCallback(TrainerCallback):
    """Puts the interference report into Trainer's training logs.

    After every optimizer step it records the report of the ``ProtectedOptimizer`` that Trainer
    steps (found under accelerate's wrapper); at each training log it adds
    ``"<prefix>/<objective>/<stat>"``: the mean of each stat over the optimizer steps since the
    previous log (``conflict`` thus becomes the share of conflicting steps). The keys are added
    to the ``logs`` dict that the callbacks after this one receive and to the matching entry of
    ``trainer.state.log_history``. Callbacks that run *before* it (Trainer puts the reporting
    integrations first) do not see them: use ``add_gradsafe_callback(trainer)``.
    """

    def __init__(self, prefix: str = "gradsafe") -> None:
        self.prefix = prefix
        self._acc = ReportAccumulator(prefix)

    def on_train_begin(self, args, state, control, **kwargs):
        self._acc.pop()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._acc.update(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not len(self._acc):
            return  # evaluation logs and the final summary carry no report
        values = self._acc.pop()
        logs.update(values)
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and last.get("loss") == logs.get("loss"):
                last.update(values)


def add_gradsafe_callback(trainer: Any, prefix: str = "gradsafe") -> GradsafeCallback:
    """Add a ``GradsafeCallback`` to ``trainer`` ahead of the reporting integrations."""
    callback = GradsafeCallback(prefix)
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(cb, GradsafeCallback) for cb in callbacks):
        raise ValueError("this Trainer already has a GradsafeCallback")
    callbacks.insert(0, callback)
    return callback


def protected_optimizer_from_kwargs(callback_kwargs: Mapping[str, Any]) -> ProtectedOptimizer:
    """The ``ProtectedOptimizer`` that Trainer steps, from the ``**kwargs`` of a callback event.

    Trainer passes ``optimizer=trainer.optimizer`` (accelerate's ``AcceleratedOptimizer`` around
    the wrapper) to every ``TrainerCallback`` event; this unwraps it. Objectives registered with
    ``protect(...)`` in ``on_step_end`` act from the next optimizer step on. Raises
    ``LookupError`` when the event carries no optimizer (before Trainer built it) or when the
    optimizer is not a ``ProtectedOptimizer``.
    """
    optimizer = callback_kwargs.get("optimizer")
    if optimizer is None:
        raise LookupError("this callback event carries no optimizer (Trainer has not built it yet)")
    opt = find_protected_optimizer(optimizer)
    if opt is None:
        raise LookupError(f"Trainer's optimizer is not a ProtectedOptimizer (got {type(optimizer).__name__})")
    return opt
