"""GPM's representation bases: orthonormal bases of what each layer reads on protected data.

``collect_activation_bases(model, batches)`` runs the model on protected data with forward
hooks, accumulates each supported layer's input covariance ``X^T X`` (float64), and keeps
the leading eigenvectors that capture ``energy`` of it (GPM's threshold), at most
``max_rank``. A weight whose inputs span ``Q`` changes the layer's outputs on those inputs
not at all when its gradient is projected off ``Q`` on the input side.

Supported layers and which side of the weight's ``(m, n)`` view the basis is for:

- ``nn.Linear`` (weight ``(out, in)``): the right side, from the inputs' last dimension;
- ``nn.Conv1d`` / ``nn.Conv2d`` (weight ``(out, in, *k)`` viewed ``(out, in * prod(k))``):
  the right side, from the unfolded input patches (``groups=1`` only);
- Hugging Face ``Conv1D`` (GPT-2; weight ``(in, out)``, ``y = x W``): the left side.

Other layers are skipped (their parameters get no factored basis). The covariance costs
``n^2`` float64 numbers per layer while collecting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ActivationBasis", "ActivationBases", "collect_activation_bases", "energy_rank"]


@dataclass(frozen=True)
class ActivationBasis:
    """One weight's basis: ``side`` "left" or "right" of its ``(m, n)`` view, ``rows`` (r, dim) orthonormal."""

    side: str
    rows: torch.Tensor
    energies: torch.Tensor  # singular values of the inputs along each row
    captured: float  # share of the inputs' energy the rows capture


class ActivationBases(Mapping[torch.Tensor, ActivationBasis]):
    """Parameter (by identity) -> its ``ActivationBasis``; ``names`` keeps the module paths."""

    def __init__(self, items: list[tuple[str, torch.Tensor, ActivationBasis]]) -> None:
        self._items = items
        self._by_id = {id(p): (p, b) for _, p, b in items}
        self.names = {id(p): n for n, p, _ in items}

    def __getitem__(self, param: torch.Tensor) -> ActivationBasis:
        return self._by_id[id(param)][1]

    def __contains__(self, param: object) -> bool:
        return id(param) in self._by_id

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for _, p, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {b.side} rank {b.rows.shape[0]} ({b.captured:.3f})" for n, _, b in self._items)
        return f"ActivationBases({parts})"


def energy_rank(eigenvalues: torch.Tensor, energy: float, max_rank: int) -> int:
    """GPM's threshold: the fewest leading eigenvalues whose sum reaches ``energy`` of the total."""
    total = float(eigenvalues.sum())
    if total <= 0:
        return 0
    captured = torch.cumsum(eigenvalues, 0) / total
    return int(min(max_rank, int((captured < energy - 1e-12).sum()) + 1, int((eigenvalues > 0).sum())))


def _default_forward(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _layer_inputs(module: torch.nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(side, rows) of what the layer's weight reads, or None for an unsupported layer."""
    if isinstance(module, torch.nn.Linear):
        return "right", x.reshape(-1, x.shape[-1])
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        if module.groups != 1 or not isinstance(module.padding, tuple):
            return None
        x4 = x if isinstance(module, torch.nn.Conv2d) else x.unsqueeze(2)
        if x4.ndim == 3:  # unbatched
            x4 = x4.unsqueeze(0)
        k = module.kernel_size if isinstance(module, torch.nn.Conv2d) else (1, module.kernel_size[0])
        d = module.dilation if isinstance(module, torch.nn.Conv2d) else (1, module.dilation[0])
        p = module.padding if isinstance(module, torch.nn.Conv2d) else (0, module.padding[0])
        st = module.stride if isinstance(module, torch.nn.Conv2d) else (1, module.stride[0])
        if module.padding_mode != "zeros":
            return None
        patches = F.unfold(x4, k, dilation=d, padding=p, stride=st)  # (N, C*k, L)
        return "right", patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.ndim == 2:
        return "left", x.reshape(-1, x.shape[-1])  # HF Conv1D: y = x W, W (in, out)
    return None


def collect_activation_bases(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    energy: float = 0.97,
    max_rank: int = 64,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    modules: Iterable[str] | None = None,
) -> ActivationBases:
    """Bases of the inputs every supported layer of ``model`` reads on ``batches``.

    Args:
        batches: protected data; each is passed to ``forward(model, batch)`` (default:
            ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else ``model(batch)``).
        energy: GPM's threshold, the share of the inputs' energy each basis keeps.
        max_rank: the most directions per layer.
        modules: names (as in ``model.named_modules()``) to restrict to; default all supported.

    Returns an ``ActivationBases`` mapping each covered weight to its basis; pass it to
    ``ProtectedOptimizer.protect(name, bases=...)`` (scope "factored").
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
    wanted = None if modules is None else set(modules)
    named = dict(model.named_modules())
    if wanted is not None and not wanted <= set(named):
        raise ValueError(f"no modules named {sorted(wanted - set(named))} in the model")
    forward = forward or _default_forward
    cov: dict[str, torch.Tensor] = {}
    sides: dict[str, str] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            got = _layer_inputs(module, x.detach())
            if got is None:
                return
            side, X = got
            X = X.double()
            sides[name] = side
            cov[name] = cov[name] + X.T @ X if name in cov else X.T @ X

        return hook

    for name, module in named.items():
        if wanted is not None and name not in wanted:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            continue
        hooks.append(module.register_forward_pre_hook(hook_for(name)))
    seen_batch = False
    try:
        with torch.no_grad():
            for batch in batches:
                seen_batch = True
                forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if not seen_batch:
        raise ValueError("collect_activation_bases got no batches")
    items = []
    for name, C in cov.items():
        evals, evecs = torch.linalg.eigh(C)
        evals = evals.flip(0).clamp_min(0.0)
        evecs = evecs.flip(1)
        r = energy_rank(evals, energy, max_rank)
        total = float(evals.sum())
        weight = named[name].weight
        rows = evecs[:, :r].T.to(device=weight.device, dtype=torch.float32).contiguous()
        basis = ActivationBasis(sides[name], rows, evals[:r].sqrt().to(device=weight.device, dtype=torch.float32),
                                float(evals[:r].sum()) / total if total > 0 else 0.0)
        items.append((f"{name}.weight" if name else "weight", weight, basis))
    if not items:
        raise ValueError("collect_activation_bases found no supported layer (nn.Linear, nn.Conv1d/2d, HF Conv1D) that ran")
    return ActivationBases(items)
