"""Checks shared by the integration tests."""

from __future__ import annotations

import torch


def flat(tensors, like) -> torch.Tensor:
    """Concatenate ``tensors`` (None -> zeros shaped like ``like[i]``) into one float64 vector."""
    return torch.cat([
        (torch.zeros(p.numel(), dtype=torch.float64) if t is None else t.detach().reshape(-1).double())
        for t, p in zip(tensors, like)
    ])


def orthonormal(samples, params) -> torch.Tensor:
    """(N, k) orthonormal basis of the span of the samples (float64)."""
    S = torch.stack([flat(s, params) for s in samples], dim=1)
    return torch.linalg.qr(S).Q


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def relative_overlap(Q: torch.Tensor, v: torch.Tensor) -> float:
    """|Q^T v| / |v|: 0 when v is orthogonal to the span of Q."""
    return float((Q.T @ v).norm() / v.norm())
