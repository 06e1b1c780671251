"""``gradsafe demo``: train a small MLP on task A, then on task B, plain vs protected.

Real data (scikit-learn's 8x8 digits, shipped with scikit-learn). The model is trained on
task A; copies of it are then trained on task B with the same seed, the same batch order,
the same number of steps and the same learning rate, once per method:

- ``plain``: the base optimizer alone (SGD with momentum);
- ``project``: gradsafe ``mode="project"`` - the B gradient is projected off a low-rank
  basis of task-A gradient samples (OGD-style);
- ``conflict``: gradsafe ``mode="conflict"`` - the B gradient loses only its component
  against the mean task-A gradient, and only when they conflict (A-GEM-style);
- ``damping``: gradsafe ``mode="observe", damping=lam`` - the B gradient is divided by
  ``1 + lam * F`` with F the diagonal empirical Fisher of task A (EWC-like damping).

All protected methods get the same task-A data budget: gradient samples from the same
``budget`` batches of task A, collected with ``gradsafe.collect_gradients``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..collect import collect_gradients
from ..optimizer import ProtectedOptimizer
from .data import Task, TwoTasks, batch_order, make_tasks

__all__ = ["METHODS", "MLP", "add_arguments", "run", "run_demo", "format_result"]

METHODS = ("plain", "project", "conflict", "damping", "agem", "conflict_samples")

# Defaults of the full run and of --quick.
FULL = dict(steps_a=600, steps_b=600)
QUICK = dict(steps_a=200, steps_b=200)


class MLP(nn.Module):
    """A shared trunk (two hidden layers) and one linear head per task."""

    def __init__(self, d_in: int = 64, hidden: int = 100, heads: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(heads))

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return self.heads[head](self.trunk(x))


def _loss(model: MLP, task: Task, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(task.x_train[idx], task.head), task.y_train[idx])


@torch.no_grad()
def accuracy(model: MLP, task: Task) -> float:
    """Test accuracy of ``model`` on ``task`` (read through the task's head)."""
    model.eval()
    pred = model(task.x_test, task.head).argmax(dim=1)
    model.train()
    return float((pred == task.y_test).float().mean())


def _train(
    model: MLP,
    opt: torch.optim.Optimizer,
    task: Task,
    batches: Sequence[torch.Tensor],
    on_step: Callable[[ProtectedOptimizer], None] | None = None,
    progress: Any = None,
) -> None:
    model.train()
    for idx in batches:
        opt.zero_grad()
        _loss(model, task, idx).backward()
        opt.step()
        if on_step is not None:
            on_step(opt)  # type: ignore[arg-type]
        if progress is not None:
            progress.update(1)


def _base_optimizer(model: nn.Module, lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def run_demo(
    seed: int = 0,
    quick: bool = False,
    *,
    setting: str = "permuted",
    steps_a: int | None = None,
    steps_b: int | None = None,
    batch_size: int = 32,
    hidden: int = 100,
    lr: float = 0.05,
    momentum: float = 0.9,
    budget: int = 32,
    rank: int = 32,
    scope: str = "global",
    sample_batch_size: int | None = None,
    damping: float = 1e4,
    methods: Sequence[str] = METHODS,
    progress: bool = False,
) -> dict[str, Any]:
    """Train on task A, then on task B with each method; return what was measured.

    The returned dict holds the configuration (``config``), the task names, the task-A
    accuracy after A (``acc_a_before``), and per method (``methods[name]``): task-A accuracy
    after B (``acc_a_after``), ``kept`` = after / before, task-B accuracy (``acc_b``), the
    mean over B steps of the interference report (protected methods), and seconds taken.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {METHODS}")
    if "plain" not in methods:
        methods = ("plain", *methods)
    defaults = QUICK if quick else FULL
    steps_a = defaults["steps_a"] if steps_a is None else int(steps_a)
    steps_b = defaults["steps_b"] if steps_b is None else int(steps_b)
    t_start = time.perf_counter()

    torch.manual_seed(seed)
    np.random.seed(seed)
    tasks: TwoTasks = make_tasks(setting)
    a, b = tasks.a, tasks.b
    # Three independent streams, so that changing one budget leaves the other orders alone.
    batches_a = batch_order(len(a.y_train), batch_size, steps_a, torch.Generator().manual_seed(seed))
    budget_batches = batch_order(
        len(a.y_train), sample_batch_size or batch_size, budget, torch.Generator().manual_seed(seed + 1_000)
    )
    batches_b = batch_order(len(b.y_train), batch_size, steps_b, torch.Generator().manual_seed(seed + 2_000))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_a + steps_b * len(methods), desc="gradsafe demo", unit="step", leave=False)

    # Task A.
    model = MLP(a.x_train.shape[1], hidden, tasks.heads, tasks.classes)
    _train(model, _base_optimizer(model, lr, momentum), a, batches_a, progress=bar)
    acc_a_before = accuracy(model, a)
    acc_b_before = accuracy(model, b)

    # The protected data budget: one gradient sample per task-A batch, at the end of A.
    samples = collect_gradients(model, lambda idx: _loss(model, a, idx), budget_batches)
    memory = torch.cat(budget_batches)

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        base = _base_optimizer(m, lr, momentum)
        opt: torch.optim.Optimizer
        reports: list[dict[str, float]] = []
        on_step = None
        if method == "plain":
            opt = base
        else:
            # collect_gradients returns samples aligned with model.parameters(), which is the
            # order of the copy's parameters and of the optimizer built from them.
            if method == "project":
                opt = ProtectedOptimizer(base, {"task A": samples}, mode="project", rank=rank, scope=scope)
            elif method == "conflict":
                opt = ProtectedOptimizer(base, {"task A": samples}, mode="conflict", rank=rank, scope=scope)
            elif method == "conflict_samples":
                opt = ProtectedOptimizer(base, {"task A": samples}, mode="conflict", rank=rank, references="samples")
            elif method == "agem":
                opt = ProtectedOptimizer(base, mode="conflict")
                opt.protect("task A", closure=lambda m=m: _loss(m, a, memory), refresh_every=1)
            elif method == "project_refresh":
                opt = ProtectedOptimizer(base, {"task A": samples}, mode="project", rank=rank, scope=scope)
            else:
                opt = ProtectedOptimizer(base, {"task A": samples}, mode="observe", rank=rank, damping=damping)

            def on_step(o: ProtectedOptimizer) -> None:
                reports.append(dict(o.report["task A"]))

        torch.manual_seed(seed + 1)  # same state for every method (nothing random is drawn in B)
        _train(m, opt, b, batches_b, on_step=on_step, progress=bar)
        acc_a_after = accuracy(m, a)
        entry: dict[str, Any] = {
            "acc_a_after": acc_a_after,
            "kept": acc_a_after / acc_a_before if acc_a_before > 0 else float("nan"),
            "acc_b": accuracy(m, b),
            "seconds": time.perf_counter() - t0,
        }
        if reports:
            entry["report_mean"] = {k: float(np.mean([r[k] for r in reports])) for k in reports[0]}
            entry["conflict_steps"] = float(np.mean([r["conflict"] > 0 for r in reports]))
        results[method] = entry
    if bar is not None:
        bar.close()

    return {
        "seed": seed,
        "quick": quick,
        "setting": setting,
        "task_a": a.name,
        "task_b": b.name,
        "config": dict(
            steps_a=steps_a,
            steps_b=steps_b,
            batch_size=batch_size,
            hidden=hidden,
            optimizer=f"SGD(lr={lr}, momentum={momentum})",
            lr=lr,
            momentum=momentum,
            budget_batches=budget,
            rank=rank,
            damping=damping,
            chance=1.0 / tasks.classes,
        ),
        "acc_a_before": acc_a_before,
        "acc_b_before": acc_b_before,
        "methods": results,
        "seconds": time.perf_counter() - t_start,
    }


_LABELS = {
    "plain": "plain fine-tuning",
    "project": "gradsafe project",
    "conflict": "gradsafe conflict",
    "damping": "gradsafe damping",
}


def format_result(res: dict[str, Any]) -> str:
    """The table and the summary line, as printed by ``gradsafe demo``."""
    cfg = res["config"]
    lines = [
        f"gradsafe demo - {res['setting']} digits: task A = {res['task_a']}, task B = {res['task_b']}",
        f"  MLP 64-{cfg['hidden']}-{cfg['hidden']}, {cfg['optimizer']}, batch {cfg['batch_size']}, "
        f"{cfg['steps_a']} steps on A then {cfg['steps_b']} on B, seed {res['seed']}",
        f"  protected data: {cfg['budget_batches']} task-A batches -> gradient samples; "
        f"project/conflict rank {cfg['rank']}; damping lambda {cfg['damping']:g}",
        "",
        f"  {'method':<20} {'A after A':>9} {'A after B':>9} {'A kept':>7} {'B acc':>6}",
    ]
    before = res["acc_a_before"]
    for name, r in res["methods"].items():
        lines.append(
            f"  {_LABELS.get(name, name):<20} {before:>9.3f} {r['acc_a_after']:>9.3f} "
            f"{100 * r['kept']:>6.1f}% {r['acc_b']:>6.3f}"
        )
    lines.append("")
    plain = res["methods"]["plain"]
    parts = [f"plain fine-tuning keeps {100 * plain['kept']:.1f}% of task A (B acc {plain['acc_b']:.3f})"]
    for name, r in res["methods"].items():
        if name == "plain":
            continue
        diff = 100 * (r["kept"] - plain["kept"])
        verdict = "more" if diff > 0.05 else ("less" if diff < -0.05 else "the same")
        amount = "" if verdict == "the same" else f"{abs(diff):.1f} points "
        parts.append(
            f"{name} keeps {100 * r['kept']:.1f}% ({amount}{verdict}{'' if verdict == 'the same' else ' than plain'}; "
            f"B acc {r['acc_b']:.3f}, {r['acc_b'] - plain['acc_b']:+.3f} vs plain)"
        )
    lines.append("Task A kept: " + parts[0] + ";")
    for p in parts[1:]:
        lines.append("             " + p + ";")
    lines[-1] = lines[-1][:-1] + "."
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few seconds)")
    parser.add_argument("--out", metavar="PATH", default=None, help="also write the result as JSON to PATH")
    parser.add_argument(
        "--setting",
        choices=("permuted", "split"),
        default="permuted",
        help="permuted: B = digits with permuted pixels, shared head (default); "
        "split: A = digits 0-4, B = digits 5-9, one head per task",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    res = run_demo(
        seed=args.seed,
        quick=args.quick,
        setting=getattr(args, "setting", "permuted"),
        progress=not getattr(args, "no_progress", False),
    )
    print(format_result(res))
    wall = time.perf_counter() - t0
    res["wall_seconds"] = wall
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"result written to {args.out}")
    print(f"wall time {wall:.1f} s")
    return 0
