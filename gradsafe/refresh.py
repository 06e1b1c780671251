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

from collections.abc import Callable, Sequence

import torch

__all__ = ["STALE", "closure_gradient", "closure_loss", "staleness", "is_due"]

STALE = 0.5


def closure_loss(name: str, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Evaluate a closure; it must return a scalar tensor."""
    loss = closure()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the closure of {name!r} must return a scalar loss tensor")
    return loss


def closure_gradient(
    name: str, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[float, list[torch.Tensor | None]]:
    """The protected loss and its gradient at the current parameters; ``.grad`` is untouched."""
    with torch.enable_grad():
        loss = closure_loss(name, closure)
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
