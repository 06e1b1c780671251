"""Gradient samples: validated against the optimizer's parameters and packed into rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .activations import ActivationBases
from .factored import FactorMemory, matrix_shape
from .factored import from_bases as factor_from_bases
from .sharding import full, is_dtensor

__all__ = ["Sample", "normalize_samples", "pack_samples", "sample_norms2", "bases_by_index"]

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


def _validate(
    samples: list[list[torch.Tensor | None]],
    params: Sequence[torch.Tensor],
    name: str,
    coverage: Sequence[int] | None,
) -> tuple[tuple[int, ...], torch.device]:
    """Check samples against the parameters; the coverage and the covered parameters' device."""
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
    return coverage, devices.pop()


_SQUARE_MAX = 1.8446743e19  # the largest float32 whose square is finite


def _check_norms(norms2: torch.Tensor, values: Callable[[], list[torch.Tensor]], name: str, fisher_later: bool) -> None:
    """Refuse non-finite samples, seen from their squared norms (float32 sums, computed anyway):
    a norm is finite exactly when every entry is, unless the sum itself overflowed.

    An entry whose square overflows makes the Fisher diagonal overflow: ``fisher_later``
    leaves that to the merge, which says so; otherwise it is said here, in the same words.
    """
    if bool(torch.isfinite(norms2).all()):
        return
    vals = values()
    if not all(bool(torch.isfinite(v).all()) for v in vals):
        raise ValueError(f"protected gradients for objective {name!r} contain inf or nan")
    largest = max(float(v.abs().max()) for v in vals if v.numel())
    if largest > _SQUARE_MAX:
        if fisher_later:
            return
        raise ValueError(
            f"objective {name!r}: the Fisher diagonal overflowed float32 (the largest protected gradient entry is "
            f"{largest:.3g}; its square must stay below 3.4e38): scale the protected loss down"
        )
    raise ValueError(
        f"objective {name!r}: the squared norm of its protected gradient overflowed float32 (the largest "
        f"entry is {largest:.3g}): scale the protected loss down"
    )


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
    coverage, device = _validate(samples, params, name, coverage)
    n_total = sum(params[i].numel() for i in coverage)
    S = torch.zeros(len(samples), n_total, dtype=torch.float32, device=device)
    for si, sample in enumerate(samples):
        off = 0
        for i in coverage:
            n = params[i].numel()
            if sample[i] is not None:
                S[si, off : off + n] = sample[i].detach().reshape(-1).to(device=device, dtype=torch.float32)
            off += n
    norms2 = torch.linalg.vecdot(S, S)
    _check_norms(norms2, lambda: [S], name, fisher_later=True)
    if not allow_zero and bool((norms2 == 0).any()):
        bad = int(torch.nonzero(norms2 == 0)[0])
        raise ValueError(f"sample {bad} of objective {name!r} has zero norm over the parameters it covers")
    return coverage, S


def sample_norms2(sample: list[torch.Tensor | None], params: Sequence[torch.Tensor], name: str, coverage: Sequence[int]) -> np.ndarray:
    """Validate one sample against the parameters; its squared norm on each covered parameter.

    Float32 sums, float64 on the host (one transfer). Non-finite entries are refused with the
    same error as ``pack_samples``, before anything is written anywhere: a live reference's
    refresh checks the gradient this way and then writes it into the memory's rows in place.
    """
    coverage, device = _validate([sample], params, name, coverage)
    flat = [None if sample[i] is None else _flat32(sample[i], device) for i in coverage]
    sums = [torch.dot(g, g) if g is not None else torch.zeros((), device=device) for g in flat]
    host = torch.stack(sums).double().cpu().numpy()
    if not np.isfinite(host).all():
        _check_norms(torch.from_numpy(host), lambda: [g for g in flat if g is not None], name, fisher_later=False)
    return host


def _flat32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` flattened, as float32 on ``device`` (itself, viewed, when it already is)."""
    t = t.detach().reshape(-1)
    return t if t.dtype == torch.float32 and t.device == device else t.to(device=device, dtype=torch.float32)


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
