"""The methods compared by the study: name -> how to build the ProtectedOptimizer.

Every method but the baseline is a ``ProtectedOptimizer`` around the same AdamW; the
baseline is that AdamW alone. Every method gets the same protected data budget: a
``Protected`` per protected set (a task already learned, or the aligned refusals), holding
the memory examples, from which each method builds what it needs:

- per-example gradient samples (one backward pass per example), taken when the set is
  first protected (right after it was learned): the Fisher, OGD's basis, A-GEM's cached
  mean reference;
- per-mini-batch gradient samples (``gem_refs`` batches): GEM's references;
- a closure: the loss on the whole memory at the current parameters, recomputed by
  gradsafe every ``refresh_every`` steps (A-GEM / SafeGrad with a live reference).

The cost of all of it is counted: backward passes and seconds spent building the memory,
backward passes spent in refreshes during training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collect import collect_gradients
from ..optimizer import ProtectedOptimizer

__all__ = ["Hyper", "Method", "METHODS", "QUICK_METHODS", "Protected", "build_optimizer", "method_names"]

Sample = list["torch.Tensor | None"]


@dataclass(frozen=True)
class Hyper:
    """Method hyperparameters, shared by every method that uses them."""

    rank: int = 64  # OGD: most basis directions per protected set
    damping: float = 3.0  # Fisher damping: lambda in g / (1 + lambda * F_hat)
    gem_refs: int = 8  # GEM: references (memory mini-batches) per protected set


class Protected:
    """The protected data budget of one objective and what is built from it, with its cost.

    ``memory_loss(batch)`` is the protected loss of a batch of memory examples (a mean);
    ``memory`` is indexable by a ``slice`` or an index tensor and has a ``len``.
    """

    def __init__(self, name: str, model: torch.nn.Module, memory: Any, memory_loss: Callable[[Any], torch.Tensor]) -> None:
        self.name = name
        self.model = model
        self.memory = memory
        self.memory_loss = memory_loss
        self._samples: list[Sample] | None = None
        self._batch_samples: dict[int, list[Sample]] = {}
        self.backward_passes = 0  # spent building samples
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self.memory)

    def samples(self) -> list[Sample]:
        """One gradient sample per memory example, at the parameters of the first call."""
        if self._samples is None:
            t0 = time.perf_counter()
            n = len(self.memory)
            self._samples = collect_gradients(self.model, self.memory_loss, [self.memory[i : i + 1] for i in range(n)])
            self.backward_passes += n
            self.seconds += time.perf_counter() - t0
        return self._samples

    def batch_samples(self, batches: int) -> list[Sample]:
        """One gradient sample per memory mini-batch (``batches`` contiguous, near-equal parts)."""
        n = len(self.memory)
        batches = max(1, min(batches, n))
        if batches not in self._batch_samples:
            t0 = time.perf_counter()
            edges = [round(i * n / batches) for i in range(batches + 1)]
            parts = [self.memory[edges[i] : edges[i + 1]] for i in range(batches)]
            self._batch_samples[batches] = collect_gradients(self.model, self.memory_loss, parts)
            self.backward_passes += batches
            self.seconds += time.perf_counter() - t0
        return self._batch_samples[batches]

    def loss(self) -> torch.Tensor:
        """The protected loss on the whole memory at the current parameters."""
        return self.memory_loss(self.memory)


class _CountingClosure:
    """The mean memory loss of several protected sets; counts its gradient evaluations."""

    def __init__(self, protected: Sequence[Protected]) -> None:
        self.protected = list(protected)
        self.backward_passes = 0
        self.forward_passes = 0

    def __call__(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.backward_passes += 1  # gradsafe differentiates what it gets under grad
        else:
            self.forward_passes += 1  # refresh_every="auto" measures the loss only
        losses = [p.loss() for p in self.protected]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


Register = Callable[[ProtectedOptimizer, Sequence[Protected], Hyper], "_CountingClosure | None"]


@dataclass(frozen=True)
class Method:
    """One row of the method table."""

    name: str
    label: str  # as printed in the tables
    space: str  # where the surgery acts ("update" measures the AdamW step exactly)
    register: Register = field(repr=False)
    family: str = ""  # groups methods in the plots
    quick: bool = False  # part of ``--quick``
    note: str = ""


def _plain(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
    return None


def _damping(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
    for p in protected:  # one Fisher per protected set: the dampings add up (a preconditioner, not EWC)
        opt.protect(p.name, p.samples(), mode="observe", damping=hp.damping)


def _ogd(scope: str) -> Register:
    def register(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
        for p in protected:  # one basis per protected set, taken when it was learned (OGD / GPM)
            opt.protect(p.name, p.samples(), mode="project", rank=hp.rank, scope=scope)

    return register


def _damping_ogd(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
    for p in protected:
        opt.protect(p.name, p.samples(), mode="project", rank=hp.rank, damping=hp.damping)


def _agem(refresh_every: int | str) -> Register:
    def register(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> _CountingClosure:
        closure = _CountingClosure(protected)  # one reference: the gradient of the whole memory
        opt.protect("protected", closure=closure, mode="conflict", refresh_every=refresh_every)
        return closure

    return register


def _agem_cached(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
    # one reference, never refreshed: the mean of every memory example's gradient, taken
    # when its set was learned (A-GEM with a cached reference)
    samples = [s for p in protected for s in p.samples()]
    opt.protect("protected", samples, mode="conflict")


def _gem(opt: ProtectedOptimizer, protected: Sequence[Protected], hp: Hyper) -> None:
    for p in protected:  # one constraint per memory mini-batch, solved exactly (GEM's QP)
        opt.protect(p.name, p.batch_samples(hp.gem_refs), mode="conflict", references="samples", rank=hp.gem_refs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("plain", "plain AdamW", "-", _plain, "baseline", quick=True, note="baseline: AdamW alone"),
        Method("damping", "Fisher damping", "update", _damping, "damping", quick=True,
               note="Fisher damping of the update (no anchor: not EWC)"),
        Method("ogd", "OGD global", "update", _ogd("global"), "projection, fixed basis", quick=True,
               note="projection off a global basis"),
        Method("ogd_tensor", "OGD per-tensor", "update", _ogd("tensor"), "projection, fixed basis",
               note="one basis per tensor"),
        Method("ogd_grad", "OGD global, grad", "grad", _ogd("global"), "projection, fixed basis",
               note="projects the gradient, not the update"),
        Method("agem_1", "A-GEM refresh 1", "update", _agem(1), "conflict, live reference", quick=True,
               note="SafeGrad-like: live reference"),
        Method("agem_10", "A-GEM refresh 10", "update", _agem(10), "conflict, live reference",
               note="reference recomputed every 10 steps"),
        Method("agem_100", "A-GEM refresh 100", "update", _agem(100), "conflict, stale reference",
               note="reference recomputed every 100 steps"),
        Method("agem_auto", "A-GEM refresh auto", "update", _agem("auto"), "conflict, live reference",
               note="recomputed when stale"),
        Method("agem_cached", "A-GEM cached", "update", _agem_cached, "conflict, stale reference",
               note="reference never recomputed"),
        Method("agem_1_grad", "A-GEM refresh 1, grad", "grad", _agem(1), "conflict, live reference",
               note="projects the gradient, not the update"),
        Method("gem", "GEM exact", "update", _gem, "conflict, stale reference", note="several references, exact QP"),
        Method("damping_ogd", "Fisher damping + OGD", "update", _damping_ogd, "damping", note="damping, then projection"),
    )
}
QUICK_METHODS = tuple(name for name, m in METHODS.items() if m.quick)


def method_names(names: Sequence[str] | None = None, quick: bool = False) -> tuple[str, ...]:
    """Validated method names, the baseline first; None: all (or the quick subset)."""
    if names is None:
        names = QUICK_METHODS if quick else tuple(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {tuple(METHODS)}")
    return tuple(dict.fromkeys(("plain", *names)))


def build_optimizer(
    method: str, base: torch.optim.Optimizer, protected: Sequence[Protected], hp: Hyper
) -> tuple[torch.optim.Optimizer, _CountingClosure | None]:
    """The method's ProtectedOptimizer around ``base`` (``base`` itself for the baseline),
    and its counting closure if it has one."""
    if method == "plain":
        return base, None
    m = METHODS[method]
    opt = ProtectedOptimizer(base, space=m.space)
    closure = m.register(opt, protected, hp)
    return opt, closure
