"""Fisher diagonals: the mean of squared gradient samples, with an online (EWC) average."""

from __future__ import annotations

import torch

__all__ = ["empirical_fisher", "online_fisher"]


def empirical_fisher(samples: torch.Tensor) -> torch.Tensor:
    """Mean of squared sample rows: ``samples`` (m, n) -> (n,), in float32."""
    s = samples.to(torch.float32)
    return (s * s).mean(dim=0)


def online_fisher(previous: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    """Online EWC: ``decay * previous + (1 - decay) * new`` (just ``new`` the first time)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"fisher_decay must be in [0, 1), got {decay}")
    if previous is None:
        return new.clone()
    return previous * decay + new * (1.0 - decay)
