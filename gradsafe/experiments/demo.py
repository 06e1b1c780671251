"""``gradsafe demo``: train a small MLP on task A, then on task B, plain vs protected.

Real data: scikit-learn's 8x8 digits (shipped with scikit-learn), standardised, one fixed
stratified train/test split. Default setting "permuted" (domain-incremental): task A is the
digits, task B the same digits with a fixed random pixel permutation, one shared 10-way
head; plain fine-tuning on B clearly forgets A there. (Setting "split", digits 0-4 then 5-9
with one head per task, forgets little with this model, so protection has little to show.)

The model is trained on A with SGD + momentum; deep copies of it are then trained on B with
the same seed, the same batch order, the same number of steps and the same learning rate,
once per method:

- ``plain``: the base optimizer alone;
- ``project``: ``mode="project"`` - the B gradient is projected off a rank-``rank`` basis of
  task-A gradient samples (OGD-style);
- ``conflict``: ``mode="conflict"`` with a closure over the task-A memory refreshed at every
  step - the B gradient loses its component against the current task-A gradient, only when
  they conflict (A-GEM);
- ``conflict_fixed``: ``mode="conflict"`` with the mean of the stored samples as a fixed
  reference (no refresh), to show what refreshing buys;
- ``damping``: ``mode="observe", damping=lam`` - the B gradient is divided by ``1 + lam * F``,
  F the diagonal empirical Fisher of the task-A samples (EWC-like damping).

Every protected method gets the same task-A data budget, the ``memory`` examples: one
gradient sample per example, collected with ``gradsafe.collect_gradients`` after task A.
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
from .data import SETTINGS, Task, TwoTasks, batch_order, make_tasks

__all__ = ["METHODS", "MLP", "accuracy", "add_arguments", "format_result", "run", "run_demo"]

METHODS = ("plain", "project", "conflict", "conflict_fixed", "damping")

# Steps of the full run and of --quick.
FULL = dict(steps_a=600, steps_b=600)
QUICK = dict(steps_a=300, steps_b=200)


class MLP(nn.Module):
    """A shared trunk (two hidden ReLU layers) and one linear head per task."""

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
    was_training = model.training
    model.eval()
    pred = model(task.x_test, task.head).argmax(dim=1)
    model.train(was_training)
    return float((pred == task.y_test).float().mean())


def _train(
    model: MLP,
    opt: torch.optim.Optimizer,
    task: Task,
    batches: Sequence[torch.Tensor],
    on_step: Callable[[], None] | None = None,
    progress: Any = None,
) -> None:
    model.train()
    for idx in batches:
        opt.zero_grad()
        _loss(model, task, idx).backward()
        opt.step()
        if on_step is not None:
            on_step()
        if progress is not None:
            progress.update(1)


def run_demo(
    seed: int = 0,
    quick: bool = False,
    *,
    setting: str = "permuted",
    steps_a: int | None = None,
    steps_b: int | None = None,
    batch_size: int = 32,
    hidden: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    memory: int = 256,
    rank: int = 64,
    damping: float = 10.0,
    methods: Sequence[str] = METHODS,
    progress: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train on task A, then on task B with each method; return what was measured.

    Returns a JSON-serialisable dict: ``seed``, ``quick``, ``setting``, ``task_a``,
    ``task_b``, ``config``, ``acc_a_before`` (task-A test accuracy after A), ``acc_b_before``,
    ``methods`` (name -> ``acc_a_after``, ``kept`` = acc_a_after / acc_a_before, ``acc_b``,
    ``seconds`` and, for protected methods, ``report_mean``: the interference report averaged
    over the B steps, and ``conflict_steps``: the fraction of B steps whose gradient conflicted
    with task A), and ``seconds``.

    ``threads``: torch intra-op threads while the demo runs (restored afterwards); the
    matrices are tiny, and more threads on shared cores only add overhead. None leaves it.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {METHODS}")
    methods = tuple(dict.fromkeys(("plain", *methods)))  # plain first, always (the baseline)
    defaults = QUICK if quick else FULL
    steps_a = defaults["steps_a"] if steps_a is None else int(steps_a)
    steps_b = defaults["steps_b"] if steps_b is None else int(steps_b)
    if min(steps_a, steps_b, memory, batch_size) < 1:
        raise ValueError("steps_a, steps_b, memory and batch_size must be >= 1")

    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        res = _run(
            seed, quick, setting, steps_a, steps_b, batch_size, hidden, lr, momentum, memory, rank, damping, methods,
            progress,
        )
    finally:
        torch.set_num_threads(old_threads)
    res["seconds"] = time.perf_counter() - t_start
    return res


def _run(
    seed: int,
    quick: bool,
    setting: str,
    steps_a: int,
    steps_b: int,
    batch_size: int,
    hidden: int,
    lr: float,
    momentum: float,
    memory: int,
    rank: int,
    damping: float,
    methods: tuple[str, ...],
    progress: bool,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    tasks: TwoTasks = make_tasks(setting)
    a, b = tasks.a, tasks.b
    if memory > len(a.y_train):
        raise ValueError(f"memory={memory} is more than the {len(a.y_train)} task-A training examples")
    # Independent streams: changing one budget leaves the other orders alone.
    batches_a = batch_order(len(a.y_train), batch_size, steps_a, torch.Generator().manual_seed(seed))
    memory_idx = torch.randperm(len(a.y_train), generator=torch.Generator().manual_seed(seed + 1_000))[:memory]
    batches_b = batch_order(len(b.y_train), batch_size, steps_b, torch.Generator().manual_seed(seed + 2_000))

    def base_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_a + steps_b * len(methods), desc="gradsafe demo", unit="step", leave=False)

    # Task A.
    model = MLP(a.x_train.shape[1], hidden, tasks.heads, tasks.classes)
    _train(model, base_optimizer(model), a, batches_a, progress=bar)
    acc_a_before = accuracy(model, a)
    acc_b_before = accuracy(model, b)

    # The task-A data budget: one gradient sample per memory example, after training on A.
    # Samples are aligned with model.parameters(), the order of every copy's optimizer.
    one_each = [memory_idx[i : i + 1] for i in range(memory)]
    samples = collect_gradients(model, lambda idx: _loss(model, a, idx), one_each)

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        base = base_optimizer(m)
        opt: torch.optim.Optimizer
        if method == "plain":
            opt = base
        elif method == "project":
            opt = ProtectedOptimizer(base, {"task A": samples}, mode="project", rank=rank)
        elif method == "conflict":
            opt = ProtectedOptimizer(base, mode="conflict")
            opt.protect("task A", closure=lambda m=m: _loss(m, a, memory_idx), refresh_every=1)
        elif method == "conflict_fixed":
            opt = ProtectedOptimizer(base, {"task A": samples}, mode="conflict")
        else:  # damping
            opt = ProtectedOptimizer(base, {"task A": samples}, mode="observe", rank=rank, damping=damping)

        reports: list[dict[str, float]] = []
        on_step = None
        if isinstance(opt, ProtectedOptimizer):
            popt = opt

            def on_step() -> None:
                reports.append(dict(popt.report["task A"]))

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
            memory=memory,
            rank=rank,
            damping=damping,
            heads=tasks.heads,
            classes=tasks.classes,
            chance=1.0 / tasks.classes,
            train_a=len(a.y_train),
            test_a=len(a.y_test),
            train_b=len(b.y_train),
            test_b=len(b.y_test),
        ),
        "acc_a_before": acc_a_before,
        "acc_b_before": acc_b_before,
        "methods": results,
    }


def _label(name: str, cfg: dict[str, Any]) -> str:
    return {
        "plain": "plain fine-tuning",
        "project": f"project, rank {cfg['rank']}",
        "conflict": "conflict (A-GEM)",
        "conflict_fixed": "conflict, fixed ref",
        "damping": f"damping, lambda {cfg['damping']:g}",
    }.get(name, name)


def format_result(res: dict[str, Any]) -> str:
    """The table and the summary, as printed by ``gradsafe demo``."""
    cfg = res["config"]
    lines = [
        f"gradsafe demo ({res['setting']}): task A = {res['task_a']}, task B = {res['task_b']} "
        f"(scikit-learn digits, {cfg['train_a']} train / {cfg['test_a']} test)",
        f"  MLP 64-{cfg['hidden']}-{cfg['hidden']}-{cfg['heads']}x{cfg['classes']}, "
        f"{cfg['optimizer']}, batch {cfg['batch_size']}: {cfg['steps_a']} steps on A, then {cfg['steps_b']} on B "
        f"per method from the same copy; seed {res['seed']}",
        f"  gradsafe memory of A: {cfg['memory']} task-A training examples (one gradient sample each); "
        "conflict (A-GEM) recomputes A's gradient on them every step",
        "",
        f"  {'method':<22}{'A after A':>10}{'A after B':>10}{'A kept':>8}{'B acc':>7}{'B conflicts A':>15}",
    ]
    before = res["acc_a_before"]
    for name, r in res["methods"].items():
        conflicts = f"{100 * r['conflict_steps']:.0f}% steps" if "conflict_steps" in r else "-"
        lines.append(
            f"  {_label(name, cfg):<22}{before:>10.3f}{r['acc_a_after']:>10.3f}"
            f"{100 * r['kept']:>7.1f}%{r['acc_b']:>7.3f}{conflicts:>15}"
        )
    lines.append("")
    plain = res["methods"]["plain"]
    lines.append(
        f"Task A kept: plain fine-tuning keeps {100 * plain['kept']:.1f}% of task A accuracy "
        f"({before:.3f} -> {plain['acc_a_after']:.3f}); protected:"
    )
    for name, r in res["methods"].items():
        if name == "plain":
            continue
        diff = 100 * (r["kept"] - plain["kept"])
        if abs(diff) < 0.05:
            verdict = "the same as plain"
        else:
            verdict = f"{abs(diff):.1f} points {'more' if diff > 0 else 'less'} than plain"
        cost = r["acc_b"] - plain["acc_b"]
        lines.append(
            f"  {_label(name, cfg)} keeps {100 * r['kept']:.1f}% ({verdict}); "
            f"task B accuracy {r['acc_b']:.3f} ({cost:+.3f} vs plain)"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradsafe demo``."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few seconds)")
    parser.add_argument("--out", metavar="PATH", default=None, help="also write the result dict as JSON to PATH")
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default="permuted",
        help="permuted (default): B = the digits with permuted pixels, one shared head; "
        "split: A = digits 0-4, B = digits 5-9, one head per task",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``gradsafe demo``: run, print the table, optionally write JSON; returns 0."""
    t0 = time.perf_counter()
    res = run_demo(
        seed=args.seed,
        quick=args.quick,
        setting=getattr(args, "setting", "permuted"),
        progress=not getattr(args, "no_progress", False),
    )
    print(format_result(res))
    res["wall_seconds"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"result written to {args.out}")
    print(f"wall time {res['wall_seconds']:.1f} s")
    return 0
