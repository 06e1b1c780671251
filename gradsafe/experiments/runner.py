"""One fine-tuning stage with one method: the loop both scenarios share.

The monitor. Every run, the baseline included, is watched by the same
``gradsafe.GradientMonitor`` over the same protected data budget, which changes nothing.
It measures the parameter update each step actually made: after the step, the negated
update ``theta_before - theta_after`` is put where the monitor reads gradients, and the
monitor's holder has learning rate 1, so its ``predicted_change`` is ``<r, delta theta>``,
the first-order change of the protected loss for the step taken (the quantity a
ProtectedOptimizer reports in space "update"), whatever the method and the space its
surgery acts in. Every ``monitor_every`` steps the reference ``r`` is replaced by the
gradient of the memory loss at the current parameters, so that the predictions, summed
over the steps, follow the protected loss along the path the parameters take. The sum over
a window between two evaluations is set against the change of the protected loss measured
on held-out data (and, as a diagnostic, on the memory itself).

The monitor is kept out of the method's optimizer on purpose: an objective registered in a
ProtectedOptimizer rebuilds its plan when it is replaced, and that cost grows with the
acting objectives' rows, so a monitor refreshed every few steps inside the optimizer would
be charged to the method.

What is timed (``train_seconds``): zero_grad + forward + backward + ``opt.step()`` (surgery
and the method's own refreshes included). The monitor, the evaluations and the reading of
the report are outside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..collect import collect_gradients
from ..monitor import GradientMonitor
from ..optimizer import ProtectedOptimizer
from .methods import Hyper, Protected, build_optimizer

__all__ = ["Stage", "run_stage", "MONITOR"]

MONITOR = "protected"


@dataclass
class Stage:
    """What one stage trains, protects and measures."""

    batches: Sequence[Any]  # the training batches, in order
    loss: Callable[[Any], torch.Tensor]  # training loss of one batch
    protected: Sequence[Protected]  # the budget of every protected set
    evaluate: Callable[[], dict[str, float]]  # held-out metrics; must hold "protected_loss"
    lr: float
    weight_decay: float
    eval_every: int
    monitor_every: int = 5  # steps between two refreshes of the monitor's reference


def _monitor_loss(protected: Sequence[Protected]) -> torch.Tensor:
    losses = [p.loss() for p in protected]
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def _refresh_monitor(monitor: GradientMonitor, model: torch.nn.Module, protected: Sequence[Protected]) -> None:
    sample = collect_gradients(model, lambda _: _monitor_loss(protected), [None])
    if MONITOR in monitor.objectives:
        monitor.unprotect(MONITOR)
    monitor.protect(MONITOR, sample, rank=1)


def run_stage(
    model: torch.nn.Module,
    method: str,
    stage: Stage,
    hp: Hyper,
    step_offset: int = 0,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` through ``stage`` with ``method``; return curve, windows and cost.

    - ``curve``: the evaluations (step 0, every ``eval_every`` steps, the last), as lists
      keyed ``step``, ``memory_loss`` and by the evaluation's metric names;
    - ``windows``: per interval between two evaluations, ``predicted`` (sum of the monitor's
      predicted_change), ``measured`` (change of the held-out protected loss),
      ``measured_memory`` (change of the memory loss), ``conflicts`` (steps whose update
      conflicted with the monitor's reference), ``steps``;
    - ``cost``: ``train_seconds``, ``setup_seconds`` (building the memory and the
      optimizer), ``setup_backward`` and ``step_backward`` (backward passes of the
      protection: memory samples, closure refreshes), ``steps``;
    - ``surgery``: mean over steps of the largest ``energy_removed`` of the method's
      objectives, and the share of steps where one of them found the gradient (or update)
      in conflict before the surgery.
    """
    params = list(model.parameters())
    t0 = time.perf_counter()
    before = sum(p.backward_passes for p in stage.protected)
    base = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, foreach=True)
    opt, closure = build_optimizer(method, base, stage.protected, hp)
    setup_seconds = time.perf_counter() - t0
    setup_backward = sum(p.backward_passes for p in stage.protected) - before
    own = list(opt.objectives) if isinstance(opt, ProtectedOptimizer) else []
    monitor = GradientMonitor(params)  # its holder's learning rate is 1: predicted_change = <r, delta theta>

    curve: dict[str, list[float]] = {"step": []}

    def evaluate(step: int) -> tuple[float, float]:
        metrics = stage.evaluate()
        with torch.no_grad():
            metrics["memory_loss"] = float(_monitor_loss(stage.protected))
        curve["step"].append(step_offset + step)
        for k, v in metrics.items():
            curve.setdefault(k, []).append(float(v))
        return float(metrics["protected_loss"]), metrics["memory_loss"]

    windows: dict[str, list[float]] = {"predicted": [], "measured": [], "measured_memory": [], "conflicts": [], "steps": []}
    last_loss, last_memory = evaluate(0)
    _refresh_monitor(monitor, model, stage.protected)
    predicted = conflicts = 0.0
    in_window = 0
    removed_sum = own_conflicts = 0.0
    train_seconds = 0.0
    n = len(stage.batches)
    model.train()
    for i, batch in enumerate(stage.batches):
        snapshot = [p.detach().clone() for p in params]
        t = time.perf_counter()
        opt.zero_grad()
        stage.loss(batch).backward()
        opt.step()
        train_seconds += time.perf_counter() - t
        if own:
            report = opt.report
            removed_sum += max(report[o]["energy_removed"] for o in own)
            own_conflicts += float(any(report[o]["conflict"] > 0 for o in own))
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.grad = s - p.detach()  # the negated update: what a gradient step of lr 1 would have used
        mon = monitor.measure()[MONITOR]
        opt.zero_grad()
        predicted += mon["predicted_change"]
        conflicts += mon["conflict"]
        in_window += 1
        if on_step is not None:
            on_step()
        if (i + 1) % stage.eval_every == 0 or i + 1 == n:
            loss, memory = evaluate(i + 1)
            windows["predicted"].append(predicted)
            windows["measured"].append(loss - last_loss)
            windows["measured_memory"].append(memory - last_memory)
            windows["conflicts"].append(conflicts)
            windows["steps"].append(in_window)
            last_loss, last_memory, predicted, conflicts, in_window = loss, memory, 0.0, 0.0, 0
        if (i + 1) % stage.monitor_every == 0 and i + 1 < n:
            _refresh_monitor(monitor, model, stage.protected)
    step_backward = closure.backward_passes - 1 if closure is not None else 0  # the first is at registration
    if closure is not None:
        setup_backward += 1
    return {
        "curve": curve,
        "windows": windows,
        "cost": {
            "train_seconds": train_seconds,
            "setup_seconds": setup_seconds,
            "setup_backward": setup_backward,
            "step_backward": step_backward,
            "steps": n,
        },
        "surgery": {
            "energy_removed": removed_sum / n if own else 0.0,
            "conflict_rate": own_conflicts / n if own else 0.0,
        },
    }
