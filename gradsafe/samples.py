"""Gradient samples: validated against the optimizer's parameters and packed into rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .activations import ActivationBases
from .factored import FactorMemory, matrix_shape
from .factored import from_bases as factor_from_bases
from .sharding import full, is_dtensor

__all__ = ["Sample", "normalize_samples", "pack_samples", "bases_by_index"]

Sample = Sequence["torch.Tensor | None"]


def _check_tensor(t: Any, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{where}: sparse gradients are not supported")
    if t.is_complex():
        raise TypeError(f"{where}: complex gradients are not supported")
    return t


def normalize_samples(value: Any, name: str) -> list[list[torch.Tensor | None]]:
    """Accept one sample (a sequence of tensors/None) or a sequence of samples."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"protected gradients for {name!r} must be a sequence of tensors (one sample, aligned "
            f"with the optimizer's parameters) or a sequence of such samples, got {type(value).__name__}"
        )
    first = next((v for v in value if v is not None), None)
    if first is None:
        raise ValueError(f"protected gradients for {name!r} are empty")
    if isinstance(first, torch.Tensor):
        return [list(value)]
    samples = []
    for i, s in enumerate(value):
        if isinstance(s, torch.Tensor) or not isinstance(s, Sequence):
            raise TypeError(f"sample {i} of {name!r} must be a sequence of tensors, got {type(s).__name__}")
        samples.append(list(s))
    if not samples:
        raise ValueError(f"protected gradients for {name!r} are empty")
    return samples


def pack_samples(
    samples: list[list[torch.Tensor | None]],
    params: Sequence[torch.Tensor],
    name: str,
    coverage: Sequence[int] | None = None,
    allow_zero: bool = False,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """Validate samples against the parameters and pack them into an ``(m, N)`` fp32 matrix.

    The coverage (parameter indices) is the union of parameters any sample gives a gradient
    for, unless ``coverage`` fixes it; a covered parameter missing from a sample counts as 0.
    """
    for si, sample in enumerate(samples):
        # FSDP2 gradients (DTensors) are gathered whole: memory is merged whole on every rank
        sample[:] = [full(t) if is_dtensor(t) else t for t in sample]
        if len(sample) != len(params):
            raise ValueError(
                f"sample {si} of {name!r} has {len(sample)} entries but the optimizer has "
                f"{len(params)} parameters (give None for a parameter the objective does not cover)"
            )
        for i, t in enumerate(sample):
            if t is None:
                continue
            _check_tensor(t, f"objective {name!r}, sample {si}, parameter {i}")
            if t.shape != params[i].shape:
                raise ValueError(
                    f"objective {name!r}, sample {si}: gradient for parameter {i} has shape "
                    f"{tuple(t.shape)} but the parameter has shape {tuple(params[i].shape)}"
                )
    if coverage is None:
        coverage = tuple(i for i in range(len(params)) if any(s[i] is not None for s in samples))
    else:
        coverage = tuple(coverage)
        covered = set(coverage)
        for si, sample in enumerate(samples):
            extra = [i for i, t in enumerate(sample) if t is not None and i not in covered]
            if extra:
                raise ValueError(
                    f"sample {si} of {name!r} gives gradients for parameters {extra} that the "
                    "objective did not cover when it was registered"
                )
    if not coverage:
        raise ValueError(f"objective {name!r} covers no parameter (every entry is None)")
    for i in coverage:
        meta = params[i].is_meta or any(s[i] is not None and s[i].is_meta for s in samples)
        if meta:
            raise ValueError(
                f"objective {name!r}: parameter {i} (or its gradient) is on the meta device and holds no "
                "values; materialise the model first (e.g. model.to_empty(device=...) and load its weights)"
            )
    devices = {params[i].device for i in coverage}
    if len(devices) > 1:
        raise ValueError(f"objective {name!r} covers parameters on several devices {devices}; not supported")
    device = devices.pop()
    n_total = sum(params[i].numel() for i in coverage)
    S = torch.zeros(len(samples), n_total, dtype=torch.float32, device=device)
    for si, sample in enumerate(samples):
        off = 0
        for i in coverage:
            n = params[i].numel()
            if sample[i] is not None:
                S[si, off : off + n] = sample[i].detach().reshape(-1).to(device=device, dtype=torch.float32)
            off += n
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"protected gradients for objective {name!r} contain inf or nan")
    norms = S.norm(dim=1)
    if not allow_zero and bool((norms == 0).any()):
        bad = int(torch.nonzero(norms == 0)[0])
        raise ValueError(f"sample {bad} of objective {name!r} has zero norm over the parameters it covers")
    return coverage, S


def bases_by_index(bases: Any, params: list[torch.Tensor], name: str) -> dict[int, FactorMemory]:
    """Map ``ActivationBases`` (parameter -> basis) onto the optimizer's parameter indices."""
    if not isinstance(bases, ActivationBases):
        raise TypeError(f"bases for {name!r} must be an ActivationBases (gradsafe.collect_activation_bases), got {type(bases).__name__}")
    index = {id(p): i for i, p in enumerate(params)}
    out = {}
    for p in bases:
        if id(p) not in index:
            raise ValueError(f"bases for {name!r} include {bases.names[id(p)]}, which is not among the optimizer's parameters")
        b = bases[p]
        shape = matrix_shape(p.shape)
        left = b.rows if b.side == "left" else None
        right = b.rows if b.side == "right" else None
        le = b.energies if b.side == "left" else None
        re = b.energies if b.side == "right" else None
        out[index[id(p)]] = factor_from_bases(shape, left, le, right, re, None, p.device)
    if not out:
        raise ValueError(f"bases for {name!r} are empty")
    return out
