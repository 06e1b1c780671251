"""One training stage of any scenario with any method, and the study's monitor.

A scenario hands ``run_stage`` a ``Stage``: the new task's batches (index tensors), its loss
and logits, the protected sets and an evaluation. The method (``methods.build``) gives the
optimizer and the loss terms; this module composes the step's loss, steps, evaluates, and,
when ``monitor`` is on, runs the same ``GradientMonitor`` for every method: after each step
it is given the negated update, so its ``predicted_change`` is ``<r, delta theta>`` with r
the gradient of the memory loss (recomputed every ``monitor_every`` steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..collect import collect_gradients
from ..monitor import GradientMonitor
from .methods import KL_BATCH, LWF_TEMPERATURE, Protected, build, kl_rows

__all__ = ["Stage", "run_stage", "initial_cosine", "MONITOR", "COSINE_BATCHES"]

MONITOR = "protected"
COSINE_BATCHES = 4  # fine-tuning batches whose mean gradient the initial cosine reads


@dataclass
class Stage:
    """What one stage trains, protects and measures.

    ``evaluate()`` returns held-out metrics holding ``"protected"`` (the scenario's protected
    metric), ``"new"`` (its new-task metric) and ``"protected_loss"``.
    """

    batches: Sequence[torch.Tensor]
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # new-task loss of a batch (mean)
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # new-task rows (LwF)
    protected: Sequence[Protected]
    evaluate: Callable[[], dict[str, float]]
    eval_every: int
    seed: int  # the replay / joint draws
    monitor: bool = True
    monitor_every: int = 5


def _memory_loss(protected: Sequence[Protected]) -> torch.Tensor:
    return torch.stack([p.loss() for p in protected]).mean()


def _flat(sample: list[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(sample, params)])


def initial_cosine(model: torch.nn.Module, stage: Stage) -> float:
    """Cosine between the mean gradient of the first fine-tuning batches and the memory loss's gradient."""
    params = list(model.parameters())
    first = list(stage.batches[:COSINE_BATCHES])
    g_new, g_mem = collect_gradients(
        model, lambda which: (torch.stack([stage.loss(model, b) for b in first]).mean() if which == "new"
                              else _memory_loss(stage.protected)), ["new", "memory"])
    a, b = _flat(g_new, params), _flat(g_mem, params)
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def _draw(sets: Sequence[Any], k: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """``k`` examples drawn uniformly from the union of ``sets``: (set index, indices into it) per set."""
    sizes = torch.tensor([len(s) for s in sets])
    flat = torch.randint(int(sizes.sum()), (k,), generator=gen)
    edges = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    out = []
    for i in range(len(sets)):
        sel = flat[(flat >= edges[i]) & (flat < edges[i + 1])] - edges[i]
        if len(sel):
            out.append((i, sel))
    return out


def run_stage(model: torch.nn.Module, method: str, knobs: dict[str, float], lr: float, stage: Stage,
              step_offset: int = 0, weight_decay: float = 0.01) -> dict[str, Any]:
    """Train ``model`` through ``stage`` with ``method``; return curve, windows, cost and the initial cosine.

    - ``curve``: the evaluations (step 0, every ``eval_every`` steps, the last), lists keyed
      ``step`` and by the evaluation's metric names;
    - ``windows`` (monitor on): per interval between evaluations, ``predicted`` (sum of the
      monitor's predicted_change), ``measured`` (change of the held-out protected loss),
      ``steps``;
    - ``cost``: ``example_grads`` (setup + steps), ``train_seconds``, ``setup_seconds``, ``steps``;
    - ``cosine``: ``initial_cosine`` at the stage's start.
    """
    params = list(model.parameters())
    cosine = initial_cosine(model, stage)
    t0 = time.perf_counter()
    built = build(method, model, stage.protected, lr, knobs, weight_decay)
    setup_seconds = time.perf_counter() - t0
    opt, terms = built.optimizer, built.terms
    gen = torch.Generator().manual_seed(stage.seed)
    monitor = GradientMonitor(params) if stage.monitor else None
    curve: dict[str, list[float]] = {"step": []}
    windows: dict[str, list[float]] = {"predicted": [], "measured": [], "steps": []}

    def evaluate(step: int) -> float:
        metrics = stage.evaluate()
        curve["step"].append(step_offset + step)
        for k, v in metrics.items():
            curve.setdefault(k, []).append(float(v))
        return float(metrics["protected_loss"])

    def refresh() -> None:
        assert monitor is not None
        sample = collect_gradients(model, lambda _: _memory_loss(stage.protected), [None])
        if MONITOR in monitor.objectives:
            monitor.unprotect(MONITOR)
        monitor.protect(MONITOR, sample, rank=1)

    last = evaluate(0)
    if monitor is not None:
        refresh()
    predicted, in_window, example_grads, train_seconds = 0.0, 0, 0, 0.0
    sets = list(stage.protected)
    n = len(stage.batches)
    model.train()
    for i, batch in enumerate(stage.batches):
        snapshot = [p.detach().clone() for p in params] if monitor is not None else None
        t = time.perf_counter()
        b = len(batch)
        k = round(terms.replay_share * b) if terms.replay_share > 0 else (b // 2 if terms.joint else 0)
        new = batch[: b - k]
        opt.zero_grad()
        loss = stage.loss(model, new) * (len(new) / b)
        if k:
            pools = [p.pool if terms.joint else p.memory for p in sets]
            for si, idx in _draw(pools, k, gen):
                loss = loss + sets[si].loss_fn(model, pools[si][idx]) * (len(idx) / b)
        if terms.lwf_weight > 0 and terms.previous is not None:
            with torch.no_grad():
                ref = stage.logits(terms.previous, new)
            loss = loss + terms.lwf_weight * kl_rows(ref, stage.logits(model, new), LWF_TEMPERATURE)
        if terms.kl_weight > 0 and terms.previous is not None:
            parts = []
            for si, idx in _draw([p.memory for p in sets], KL_BATCH, gen):
                sub = sets[si].memory[idx]
                with torch.no_grad():
                    ref = sets[si].logits_fn(terms.previous, sub)
                parts.append(kl_rows(ref, sets[si].logits_fn(model, sub)) * len(idx))
            loss = loss + terms.kl_weight * torch.stack(parts).sum() / KL_BATCH
            example_grads += KL_BATCH
        loss.backward()
        opt.step()
        train_seconds += time.perf_counter() - t
        example_grads += b
        if monitor is not None and snapshot is not None:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.grad = s - p.detach()  # the negated update: what a gradient step of lr 1 would have used
            predicted += monitor.measure()[MONITOR]["predicted_change"]
            opt.zero_grad()
        in_window += 1
        if (i + 1) % stage.eval_every == 0 or i + 1 == n:
            current = evaluate(i + 1)
            windows["predicted"].append(predicted)
            windows["measured"].append(current - last)
            windows["steps"].append(in_window)
            last, predicted, in_window = current, 0.0, 0
        if monitor is not None and (i + 1) % stage.monitor_every == 0 and i + 1 < n:
            refresh()
    step_grads = sum(c.example_grads for c in built.closures)
    return {
        "curve": curve,
        "windows": windows if monitor is not None else {},
        "cosine": cosine,
        "cost": {
            "example_grads": built.setup_example_grads + example_grads + step_grads,
            "train_seconds": train_seconds,
            "setup_seconds": setup_seconds,
            "steps": n,
        },
    }
