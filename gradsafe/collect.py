"""Gradient samples of a protected objective, aligned with the optimizer's parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["collect_gradients"]


def collect_gradients(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
) -> list[list[torch.Tensor | None]]:
    """One gradient sample per batch: ``loss_fn(batch)`` differentiated w.r.t. the parameters.

    Parameters are a module's ``.parameters()`` (in that order, which is the order of an
    optimizer built from them) or an explicit iterable. Each sample is a list aligned with
    them: a detached gradient, or ``None`` for a parameter that does not require grad or
    does not influence the loss. ``.grad`` is never touched.
    """
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("collect_gradients got no parameters")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if not trainable:
        raise ValueError("collect_gradients: no parameter requires grad")
    samples: list[list[torch.Tensor | None]] = []
    for batch in batches:
        with torch.enable_grad():
            loss = loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar loss tensor")
        grads = torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
        sample: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, grads):
            sample[i] = None if g is None else g.detach()
        samples.append(sample)
    if not samples:
        raise ValueError("collect_gradients got no batches")
    return samples
