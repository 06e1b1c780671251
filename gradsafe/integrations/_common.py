"""Helpers shared by the integrations: no third-party imports here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..optimizer import ProtectedOptimizer

__all__ = [
    "ProtectedOptimizerFromParams",
    "ReportAccumulator",
    "align_samples",
    "find_protected_optimizer",
    "flatten_report",
]

# attributes under which the usual wrappers keep the optimizer they wrap:
# accelerate's AcceleratedOptimizer (.optimizer), Lightning's LightningOptimizer (._optimizer)
_WRAPPED_ATTRS = ("optimizer", "_optimizer", "base_optimizer")


def find_protected_optimizer(optimizer: Any) -> ProtectedOptimizer | None:
    """The ProtectedOptimizer inside ``optimizer`` (itself, or under accelerate/Lightning wrappers)."""
    seen: set[int] = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        if isinstance(current, ProtectedOptimizer):
            return current
        seen.add(id(current))
        nxt = None
        for attr in _WRAPPED_ATTRS:
            candidate = current.__dict__.get(attr) if hasattr(current, "__dict__") else None
            if candidate is not None and candidate is not current:
                nxt = candidate
                break
        current = nxt
    return None


def flatten_report(report: Mapping[str, Mapping[str, Any]], prefix: str = "gradsafe") -> dict[str, float]:
    """``{objective: {stat: value}}`` -> ``{"<prefix>/<objective>/<stat>": float}`` (numbers only)."""
    out: dict[str, float] = {}
    for name, stats in report.items():
        for stat, value in stats.items():
            if isinstance(value, bool) or isinstance(value, (int, float)):
                out[f"{prefix}/{name}/{stat}"] = float(value)
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                out[f"{prefix}/{name}/{stat}"] = float(value)
    return out


class ReportAccumulator:
    """Averages the reports of the optimizer steps between two logging events.

    ``update(opt)`` after each ``optimizer.step()`` records ``opt.report`` once per new gradsafe
    step (a repeated call without a new step, e.g. under gradient accumulation, records
    nothing); ``pop()`` returns the mean of every recorded stat since the last ``pop`` and
    starts over. Non-finite values are averaged as they are (a NaN shows up in the logs).
    """

    def __init__(self, prefix: str = "gradsafe") -> None:
        self.prefix = prefix
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last_step: tuple[int, int] | None = None

    def update(self, optimizer: Any) -> bool:
        opt = find_protected_optimizer(optimizer)
        if opt is None:
            return False
        key = (id(opt), opt.gradsafe_steps)
        if key == self._last_step or opt.gradsafe_steps == 0:
            return False
        self._last_step = key
        for k, v in flatten_report(opt.report, self.prefix).items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        return True

    def pop(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums, self._counts = {}, {}
        return out

    def __len__(self) -> int:
        return len(self._sums)


def _is_single_sample(value: Sequence[Any]) -> bool:
    first = next((v for v in value if v is not None), None)
    return isinstance(first, torch.Tensor)


def align_samples(
    samples: Any,
    source_params: Iterable[torch.Tensor] | torch.nn.Module,
    target_params: Iterable[torch.Tensor] | torch.optim.Optimizer,
) -> Any:
    """Re-align gradient samples from one parameter order to another, by parameter identity.

    ``samples``: one sample (a sequence of tensors/None aligned with ``source_params``) or a
    sequence of samples; ``source_params``: a module (its ``.parameters()``) or the list the
    samples are aligned with (e.g. what ``collect_gradients`` used); ``target_params``: the
    optimizer's parameters in ``param_groups`` order, or the optimizer itself (its
    ``param_groups``, e.g. a ``ProtectedOptimizer`` whose parameter order a library chose, such
    as Trainer with ``optimizer_cls_and_kwargs``, before ``opt.protect(...)``). A target parameter that is not among the
    source parameters gets ``None`` (not covered); a source parameter that the target lacks
    must have ``None`` in every sample, otherwise ``ValueError`` (that gradient would be lost).
    Callables (closure objectives) are returned unchanged.
    """
    if callable(samples):
        return samples
    if isinstance(source_params, torch.nn.Module):
        source = list(source_params.parameters())
    else:
        source = list(source_params)
    if isinstance(target_params, torch.optim.Optimizer):
        target = [p for group in target_params.param_groups for p in group["params"]]
    else:
        target = list(target_params)
    index = {id(p): i for i, p in enumerate(source)}
    target_ids = {id(p) for p in target}
    if isinstance(samples, torch.Tensor) or not isinstance(samples, Sequence):
        raise TypeError(f"samples must be a sequence of tensors or of samples, got {type(samples).__name__}")
    single = _is_single_sample(samples)
    batch = [samples] if single else list(samples)
    out = []
    for si, sample in enumerate(batch):
        sample = list(sample)
        if len(sample) != len(source):
            raise ValueError(f"sample {si} has {len(sample)} entries but there are {len(source)} source parameters")
        for i, (p, g) in enumerate(zip(source, sample)):
            if g is not None and id(p) not in target_ids:
                raise ValueError(
                    f"sample {si} has a gradient for source parameter {i} (shape {tuple(p.shape)}), "
                    "which the optimizer does not hold"
                )
        out.append([sample[index[id(p)]] if id(p) in index else None for p in target])
    return out[0] if single else out


class ProtectedOptimizerFromParams(ProtectedOptimizer):
    """A ProtectedOptimizer built from parameters, as ``torch.optim`` classes are.

    ``ProtectedOptimizerFromParams(params, base_cls=torch.optim.AdamW, base_kwargs={...},
    protected_grads={...}, samples_from=model, **gradsafe_kwargs)`` builds ``base_cls(params,
    **base_kwargs)`` and wraps it. This is the form that libraries which construct the
    optimizer themselves expect (Hugging Face ``Trainer(optimizer_cls_and_kwargs=...)`` calls
    ``cls(param_groups, **kwargs)``).

    The library chooses the parameter order (Trainer puts the weight-decay group first), so
    gradient samples cannot be aligned with it in advance: give ``samples_from`` (the model whose
    ``.parameters()`` the samples are aligned with, as ``collect_gradients(model, ...)`` returns
    them, or that parameter list) and the samples are re-aligned to the optimizer's order by
    parameter identity. Closure objectives need none. (The keyword is not ``model``: Trainer
    takes a ``model`` entry out of the kwargs for itself.)
    """

    def __init__(
        self,
        params: Any,
        base_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        base_kwargs: Mapping[str, Any] | None = None,
        protected_grads: Mapping[str, Any] | None = None,
        *,
        samples_from: torch.nn.Module | Sequence[torch.Tensor] | None = None,
        **gradsafe_kwargs: Any,
    ) -> None:
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
            raise TypeError(f"base_cls must be a torch.optim.Optimizer subclass, got {base_cls!r}")
        if issubclass(base_cls, ProtectedOptimizer):
            raise TypeError("base_cls is already a ProtectedOptimizer; give the base optimizer class")
        params = list(params)
        base = base_cls(params, **dict(base_kwargs or {}))
        aligned: dict[str, Any] | None = None
        if protected_grads is not None:
            if not isinstance(protected_grads, Mapping):
                raise TypeError(f"protected_grads must be a mapping name -> samples, got {type(protected_grads).__name__}")
            source = samples_from
            target = [p for g in base.param_groups for p in g["params"]]
            aligned = {}
            for name, value in protected_grads.items():
                if callable(value):
                    aligned[name] = value
                elif source is None:
                    raise TypeError(
                        f"the gradient samples of {name!r} need samples_from= (the model, or the parameter list "
                        "they are aligned with) so that they can be re-aligned with the optimizer's parameter "
                        "order, which the caller chooses"
                    )
                else:
                    aligned[name] = align_samples(value, source, target)
        super().__init__(base, aligned, **gradsafe_kwargs)

