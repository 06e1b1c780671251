"""Closure objectives: their gradient at the current parameters, and when to recompute it.

A closure objective's memory describes its gradient where it was last computed. Between
refreshes gradsafe adds up the first-order change of the protected loss that each step
predicts (``<r, delta theta>``, the report's ``predicted_change``). At the next measurement
of the loss the actual change is compared with that prediction: the *staleness*

    staleness = |actual - predicted| / (|actual| + |predicted| + eps)

is 0 when the first-order picture held and approaches 1 when it did not (the basis no longer
describes the objective). ``refresh_every="auto"`` measures the loss (a forward pass, no
backward) every ``auto_check_every`` steps and refreshes when the staleness exceeds
``STALE``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from .samples import pack_samples, sample_norms2

if TYPE_CHECKING:  # pragma: no cover
    from .objective import ProtectedObjective

__all__ = ["STALE", "RefreshState", "closure_gradient", "closure_loss", "staleness", "is_due", "refresh_due"]

STALE = 0.5


@dataclass
class RefreshState:
    """A closure objective's schedule: the step of the last refresh and of the last loss
    check, the protected loss at the last refresh, the first-order change predicted since,
    and the last measured staleness."""

    last_refresh_step: int = 0
    last_check_step: int = 0
    loss_at_refresh: float | None = None
    predicted_since_refresh: float = 0.0
    staleness: float | None = None

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "RefreshState":
        return cls(
            last_refresh_step=int(state["last_refresh_step"]),
            last_check_step=int(state["last_check_step"]),
            loss_at_refresh=state["loss_at_refresh"],
            predicted_since_refresh=float(state["predicted_since_refresh"]),
            staleness=state["staleness"],
        )

    def restart(self, step: int, loss: float | None) -> None:
        """A refresh at ``step`` with the protected loss ``loss``."""
        self.last_refresh_step = self.last_check_step = step
        self.loss_at_refresh = loss
        self.predicted_since_refresh = 0.0

    def measure(self, loss: float) -> None:
        """Compare the loss now with the prediction since the last refresh."""
        if self.loss_at_refresh is not None:
            self.staleness = staleness(loss - self.loss_at_refresh, self.predicted_since_refresh, self.loss_at_refresh)


STATE_KEYS = tuple(f.name for f in fields(RefreshState))


def closure_loss(name: str, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Evaluate a closure; it must return a scalar tensor."""
    loss = closure()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the closure of {name!r} must return a scalar loss tensor")
    return loss


def closure_gradient(
    name: str, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[float, list[torch.Tensor | None]]:
    """The protected loss and its gradient at the current parameters; ``.grad`` is untouched.

    The parameters' ``.grad`` are set aside while the closure runs, so that a closure that
    calls ``backward()`` itself (it must only return the loss) is caught without having
    changed them.
    """
    stashed = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            loss = closure_loss(name, closure)
        called_backward = any(p.grad is not None for p in params)
    finally:
        for p, g in zip(params, stashed):
            p.grad = g
    if called_backward:
        raise RuntimeError(
            f"the closure of {name!r} called backward(); it must only return the protected loss "
            "(gradsafe differentiates it with torch.autograd.grad and leaves .grad alone): "
            "end it with `return loss`, not `loss.backward()`"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"the loss returned by the closure of {name!r} does not depend on the parameters (it does not "
            "require grad): compute it from the model's output, outside torch.no_grad() and without .detach()"
        )
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
    sample: list[torch.Tensor | None] = [None] * len(params)
    for i, g in zip(trainable, grads):
        sample[i] = g
    return float(loss.detach()), sample


def staleness(actual: float, predicted: float, reference: float) -> float:
    """How far the measured change of the protected loss is from the first-order prediction."""
    eps = 1e-8 * (abs(reference) + 1.0)
    return abs(actual - predicted) / (abs(actual) + abs(predicted) + eps)


def is_due(refresh_every: int | str | None, step: int, last_refresh: int, last_check: int, auto_check_every: int) -> str | None:
    """``"refresh"``, ``"check"`` (auto: measure the loss first) or None."""
    if refresh_every is None:
        return None
    if refresh_every == "auto":
        return "check" if step - last_check >= auto_check_every else None
    return "refresh" if step - last_refresh >= refresh_every else None


def refresh_due(
    objectives: Iterable["ProtectedObjective"], params: list[torch.Tensor], step: int, auto_check_every: int,
    fisher_read: bool = True,
) -> bool:
    """Recompute the memory of every closure objective that is due; True if a memory record
    was replaced (a plan over it is rebuilt).

    A refresh whose memory keeps its shape (a live conflict reference) writes the fresh
    gradient into the rows in place (``ProtectedObjective.refresh_in_place``) and returns
    False for it: the plan sees the new ``rows_version`` and updates only its numbers that
    depend on those rows. A due objective without its closure (closures are not saved in
    state dicts) is an error that says how to give it back. ``fisher_read``: whether the
    report reads the objectives' Fisher (``fisher_step``); an in-place refresh keeps none
    otherwise (``ProtectedObjective.refresh_in_place``).
    """
    changed = False
    for obj in objectives:
        sched = obj.schedule
        due = is_due(obj.config.refresh_every, step, sched.last_refresh_step, sched.last_check_step, auto_check_every)
        if due is None or (obj.closure is None and not obj.had_closure):
            continue  # sample-based memory: nothing to recompute
        name = obj.name
        if obj.closure is None:
            raise RuntimeError(
                f"objective {name!r} is due for a refresh but has no closure (closures are not "
                f"saved in state dicts): call opt.attach_closure({name!r}, fn) after loading"
            )
        if due == "check":
            sched.last_check_step = step
            with torch.no_grad():
                loss = float(closure_loss(name, obj.closure).detach())
            sched.measure(loss)
            if sched.staleness is None or sched.staleness <= STALE:
                continue
        loss, fresh = closure_gradient(name, obj.closure, params)
        sched.measure(loss)
        # the memory's layout is fixed at registration: keep covered entries (0 where the
        # loss no longer reaches one), drop parameters the loss reaches only now
        covered = set(obj.coverage)
        sample = [fresh[i] if i in covered else None for i in range(len(params))]
        if obj.refreshes_in_place:
            # checked on its norms first (nothing written yet), then written into the rows
            norms2 = sample_norms2(sample, params, name, obj.coverage)
            sched.restart(step, loss)
            if not norms2.any():
                _warn_zero(name, step)
                continue
            obj.refresh_in_place([sample[i] for i in obj.coverage], norms2, fisher_read)
            continue
        sample = [s if s is not None or i not in covered else torch.zeros_like(params[i]) for i, s in enumerate(sample)]
        _, S = pack_samples([sample], params, name, coverage=obj.coverage, allow_zero=True)
        sched.restart(step, loss)
        if not bool(S.any()):
            _warn_zero(name, step)
            continue
        obj.refresh(S)
        changed = True
    return changed


def _warn_zero(name: str, step: int) -> None:
    warnings.warn(
        f"the protected gradient of {name!r} is exactly zero at step {step}; keeping the previous memory",
        RuntimeWarning,
        stacklevel=5,
    )
