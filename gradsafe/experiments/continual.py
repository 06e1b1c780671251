"""Scenario 1: continual learning on scikit-learn's digits.

A small MLP learns a sequence of tasks (``data.make_sequence``), one after the other, with
AdamW. Task 1 is learnt once per seed with plain AdamW (``pretrain``); from that model each
method learns tasks 2..T (``run``). Each learnt task joins the protected sets with a memory
budget of ``memory`` of its training examples; a method builds what it needs from that
memory (samples right after the task was learnt, or a closure), the study's monitor
measures interference with all protected tasks at once.

Metrics, with ``R[i, j]`` the test accuracy on task j after learning task i:

- ``avg_acc``: the final average accuracy, mean_j R[T, j];
- ``forgetting``: mean over old tasks of R[j, j] - R[T, j] (per task: ``forgetting_per_task``);
  backward transfer is its negative (``bwt``);
- ``new_acc``: R[T, T], the last (new) task's accuracy at the end; ``learn_acc``: mean over
  tasks 2..T of R[j, j] (how well each new task was learnt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import SEQUENCE_SETTINGS, Task, batch_order, make_sequence
from .methods import Hyper, Protected
from .runner import Stage, run_stage

__all__ = ["ContinualConfig", "MLP", "accuracy", "pretrain", "run", "describe", "FULL", "QUICK", "SPLIT_CLASS"]


@dataclass(frozen=True)
class ContinualConfig:
    setting: str = "permuted"
    n_tasks: int = 4
    steps: int = 300  # per task
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    hidden: int = 100
    memory: int = 100  # protected examples per learnt task
    eval_every: int = 25
    methods: tuple[str, ...] | None = None  # run only these (None: the study's methods)
    monitor_every: int = 5  # steps between refreshes of the monitor's reference

    def __post_init__(self) -> None:
        if self.setting not in SEQUENCE_SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; expected one of {SEQUENCE_SETTINGS}")
        if min(self.steps, self.batch_size, self.memory, self.eval_every, self.hidden) < 1:
            raise ValueError("steps, batch_size, memory, eval_every and hidden must be >= 1")


FULL = ContinualConfig()
QUICK = ContinualConfig(n_tasks=3, steps=100, memory=32, eval_every=25)
# the second setting of the full study: class-incremental split digits, a subset of the methods
SPLIT_CLASS = ContinualConfig(setting="split-class", n_tasks=5, steps=150, memory=50, eval_every=25,
                              methods=("plain", "damping", "ogd", "agem_1", "agem_10", "agem_100", "gem"))


class MLP(nn.Module):
    """A shared trunk (two hidden ReLU layers) and one linear head per task."""

    def __init__(self, d_in: int = 64, hidden: int = 100, heads: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(heads))

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return self.heads[head](self.trunk(x))


@torch.no_grad()
def accuracy(model: MLP, task: Task) -> float:
    """Test accuracy of ``model`` on ``task`` (read through the task's head)."""
    pred = model(task.x_test, task.head).argmax(dim=1)
    return float((pred == task.y_test).float().mean())


@torch.no_grad()
def _test_loss(model: MLP, task: Task) -> float:
    return float(F.cross_entropy(model(task.x_test, task.head), task.y_test))


def _train_loss(model: MLP, task: Task, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(task.x_train[idx], task.head), task.y_train[idx])


def _batches(cfg: ContinualConfig, seed: int, t: int, n: int) -> list[torch.Tensor]:
    return batch_order(n, cfg.batch_size, cfg.steps, torch.Generator().manual_seed(10_000 * seed + t))


def _memory(cfg: ContinualConfig, seed: int, t: int, n: int) -> torch.Tensor:
    """The memory budget of task ``t``: ``cfg.memory`` training indices (the same for every method)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(10_000 * seed + 5_000 + t))[: cfg.memory]


def _model(cfg: ContinualConfig, seed: int) -> tuple[MLP, list[Task]]:
    tasks, heads, classes = make_sequence(cfg.setting, cfg.n_tasks)
    torch.manual_seed(seed)
    return MLP(tasks[0].x_train.shape[1], cfg.hidden, heads, classes), tasks


def pretrain(seed: int, cfg: ContinualConfig) -> dict[str, Any]:
    """Learn task 1 with plain AdamW; return the model state and its accuracies."""
    model, tasks = _model(cfg, seed)
    first = tasks[0]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    model.train()
    for idx in _batches(cfg, seed, 0, len(first.y_train)):
        opt.zero_grad()
        _train_loss(model, first, idx).backward()
        opt.step()
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "acc": [accuracy(model, t) for t in tasks],
    }


def run(seed: int, cfg: ContinualConfig, method: str, hp: Hyper, pretrained: dict[str, Any],
        on_step: Any = None) -> dict[str, Any]:
    """Learn tasks 2..T from the pretrained model with ``method``; return metrics, curves, cost."""
    model, tasks = _model(cfg, seed)
    model.load_state_dict(pretrained["state"])
    T = len(tasks)
    R = np.full((T, T), np.nan)
    R[0] = pretrained["acc"]
    protected: list[Protected] = []
    curve: dict[str, list[float]] = {}
    windows: dict[str, list[float]] = {}
    cost = {"train_seconds": 0.0, "setup_seconds": 0.0, "setup_backward": 0, "step_backward": 0, "steps": 0}
    surgery = {"energy_removed": 0.0, "conflict_rate": 0.0}
    for t in range(1, T):
        old = tasks[t - 1]
        protected.append(
            Protected(
                f"task {t}",
                model,
                _memory(cfg, seed, t - 1, len(old.y_train)),
                lambda idx, task=old: _train_loss(model, task, idx),
            )
        )
        new = tasks[t]

        def evaluate(t: int = t, new: Task = new) -> dict[str, float]:
            model.eval()
            old_losses = [_test_loss(model, tasks[j]) for j in range(t)]
            out = {
                "protected_loss": float(np.mean(old_losses)),
                "old_acc": float(np.mean([accuracy(model, tasks[j]) for j in range(t)])),
                "new_acc": accuracy(model, new),
                "first_acc": accuracy(model, tasks[0]),
            }
            model.train()
            return out

        stage = Stage(
            batches=_batches(cfg, seed, t, len(new.y_train)),
            loss=lambda idx, task=new: _train_loss(model, task, idx),
            protected=list(protected),
            evaluate=evaluate,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            eval_every=cfg.eval_every,
            monitor_every=cfg.monitor_every,
        )
        res = run_stage(model, method, stage, hp, step_offset=(t - 1) * cfg.steps, on_step=on_step)
        for k, v in res["curve"].items():
            curve.setdefault(k, []).extend(v)
        curve.setdefault("task", []).extend([t + 1] * len(res["curve"]["step"]))
        for k, v in res["windows"].items():
            windows.setdefault(k, []).extend(v)
        windows.setdefault("stage", []).extend([t] * len(res["windows"]["steps"]))
        for k in cost:
            cost[k] += res["cost"][k]
        for k in surgery:
            surgery[k] += res["surgery"][k] / (T - 1)
        model.eval()
        R[t] = [accuracy(model, task) for task in tasks]
        model.train()
    forgetting = [float(R[j, j] - R[T - 1, j]) for j in range(T - 1)]
    final = {
        "avg_acc": float(np.mean(R[T - 1])),
        "forgetting": float(np.mean(forgetting)),
        "bwt": -float(np.mean(forgetting)),
        "new_acc": float(R[T - 1, T - 1]),
        "learn_acc": float(np.mean([R[j, j] for j in range(1, T)])),
        "first_acc": float(R[T - 1, 0]),
    }
    return {
        "final": final,
        "forgetting_per_task": forgetting,
        "acc_matrix": R.tolist(),
        "curve": curve,
        "windows": windows,
        "cost": cost,
        "surgery": surgery,
    }


def describe(cfg: ContinualConfig) -> dict[str, Any]:
    """The configuration as recorded in the results."""
    d = asdict(cfg)
    d["methods"] = None if cfg.methods is None else list(cfg.methods)
    d["incremental"] = {"permuted": "domain-incremental", "split-task": "task-incremental",
                        "split-class": "class-incremental"}[cfg.setting]
    d["optimizer"] = f"AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay})"
    return d
