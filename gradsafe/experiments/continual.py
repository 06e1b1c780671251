"""Scenario plug-in 1: continual learning on scikit-learn's digits.

A small MLP learns a sequence of tasks (``data.make_sequence``) one after the other. Task 1
is learnt once per seed with AdamW (``pretrain``, not tuned: the common start); from that
model each method learns tasks 2..T (``run``), each stage with the setting's learning rate
and steps. Each learnt task joins the protected sets with ``memory`` of its training
examples (the same for every method).

Conditions: ``permuted`` (10 tasks, domain-incremental, the tuned one) and ``split-class``
(5 two-digit tasks, class-incremental, one shared head, no task identity).

Metrics, with ``R[i, j]`` the test accuracy on task j after learning task i (``i = 0``:
after task 1) and ``b_j`` the untrained model's accuracy on task j:

- ``acc``: mean_j R[T, j] (ACC; the selection criterion); ``bwt``: mean_{j<T} R[T, j] - R[j, j];
- ``fwt``: mean_{j>=2} R[j-1, j] - b_j; ``learn_acc``: mean_{j>=2} R[j, j] (the new-task metric);
- ``old_acc``: mean_{j<T} R[T, j] (the protected metric); ``new_acc``: R[T, T].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import SEQUENCE_SETTINGS, Task, batch_order, make_sequence
from .methods import Protected
from .runner import Stage, run_stage
from .scenario import Metric, Scenario, Setting

__all__ = ["ContinualConfig", "ContinualScenario", "MLP", "accuracy", "FULL", "QUICK"]


@dataclass(frozen=True)
class ContinualConfig:
    tasks: dict[str, int] = field(default_factory=lambda: {"permuted": 10, "split-class": 5})
    memory: dict[str, int] = field(default_factory=lambda: {"permuted": 50, "split-class": 50})
    batch_size: int = 32
    hidden: int = 100
    pretrain_steps: int = 100
    pretrain_lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 25
    steps_grid: tuple[int, ...] = (50, 100)

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(SEQUENCE_SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; expected a subset of {SEQUENCE_SETTINGS}")
        if min(self.batch_size, self.hidden, self.pretrain_steps, self.eval_every, *self.memory.values()) < 1:
            raise ValueError("batch_size, hidden, pretrain_steps, eval_every and memory must be >= 1")


FULL = ContinualConfig()
QUICK = ContinualConfig(tasks={"permuted": 3}, memory={"permuted": 20}, pretrain_steps=60, eval_every=10,
                        steps_grid=(20,))


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


def _protected(name: str, model: MLP, task: Task, memory: torch.Tensor) -> Protected:
    def logits(m: Any, idx: torch.Tensor) -> torch.Tensor:
        return m(task.x_train[idx], task.head)

    return Protected(
        name, model, memory,
        loss=lambda m, idx: F.cross_entropy(logits(m, idx), task.y_train[idx]),
        logits=logits,
        target_logit=lambda m, idx: logits(m, idx).gather(1, task.y_train[idx, None]).mean(),
        forward=logits,
        pool=torch.arange(len(task.y_train)),
    )


@dataclass
class ContinualScenario(Scenario):
    """Continual learning on digits (see the module docstring)."""

    config: ContinualConfig = field(default_factory=lambda: FULL)

    def __post_init__(self) -> None:
        self.name = "continual"
        self.title = "continual learning on digits"
        self.conditions = tuple(self.config.tasks)
        self.tuned_condition = "permuted" if "permuted" in self.config.tasks else self.conditions[0]
        self.protected = Metric("old_acc", "earlier tasks' accuracy")
        self.new = Metric("learn_acc", "learning accuracy")
        self.metrics = (Metric("bwt", "BWT"), Metric("fwt", "FWT"))
        self.criterion_label = "ACC (final average accuracy over all tasks)"
        self.steps_grid = self.config.steps_grid
        self.lr_grid = {"adamw": (3e-4, 1e-3, 3e-3), "sgd": (0.01, 0.03, 0.1)}

    def pretrain_key(self, condition: str) -> str:
        return condition

    def _model(self, seed: int, condition: str) -> tuple[MLP, list[Task]]:
        tasks, heads, classes = make_sequence(condition, self.config.tasks[condition])
        torch.manual_seed(seed)
        return MLP(tasks[0].x_train.shape[1], self.config.hidden, heads, classes), tasks

    def _batches(self, seed: int, t: int, n: int, steps: int) -> list[torch.Tensor]:
        return batch_order(n, self.config.batch_size, steps, torch.Generator().manual_seed(10_000 * seed + t))

    def _memory(self, seed: int, condition: str, t: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 * seed + 5_000 + t)
        return torch.randperm(n, generator=g)[: self.config.memory[condition]]

    def pretrain(self, seed: int, key: str) -> dict[str, Any]:
        """Learn task 1 with AdamW; return the state, the untrained and the trained accuracies."""
        model, tasks = self._model(seed, key)
        untrained = [accuracy(model, t) for t in tasks]
        first = tasks[0]
        c = self.config
        opt = torch.optim.AdamW(model.parameters(), lr=c.pretrain_lr, weight_decay=c.weight_decay, foreach=True)
        model.train()
        for idx in self._batches(seed, 0, len(first.y_train), c.pretrain_steps):
            opt.zero_grad()
            F.cross_entropy(model(first.x_train[idx], first.head), first.y_train[idx]).backward()
            opt.step()
        model.eval()
        return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "untrained": untrained, "acc": [accuracy(model, t) for t in tasks]}

    def run(self, seed: int, condition: str, method: str, setting: Setting, pretrained: dict[str, Any],
            monitor: bool = True) -> dict[str, Any]:
        """Learn tasks 2..T from the pretrained model with ``method`` at ``setting``."""
        model, tasks = self._model(seed, condition)
        model.load_state_dict(pretrained["state"])
        T = len(tasks)
        R = np.full((T, T), np.nan)
        R[0] = pretrained["acc"]
        protected: list[Protected] = []
        stages = []
        cost = {"example_grads": 0, "train_seconds": 0.0, "setup_seconds": 0.0, "steps": 0}
        for t in range(1, T):
            old = tasks[t - 1]
            protected.append(_protected(f"task {t}", model, old, self._memory(seed, condition, t - 1, len(old.y_train))))
            new = tasks[t]

            def evaluate(t: int = t, new: Task = new) -> dict[str, float]:
                model.eval()
                out = {
                    "protected": float(np.mean([accuracy(model, tasks[j]) for j in range(t)])),
                    "new": accuracy(model, new),
                    "protected_loss": float(np.mean([_test_loss(model, tasks[j]) for j in range(t)])),
                }
                model.train()
                return out

            stage = Stage(
                batches=self._batches(seed, t, len(new.y_train), setting.steps),
                loss=lambda m, idx, task=new: F.cross_entropy(m(task.x_train[idx], task.head), task.y_train[idx]),
                logits=lambda m, idx, task=new: m(task.x_train[idx], task.head),
                protected=list(protected),
                evaluate=evaluate,
                eval_every=self.config.eval_every,
                seed=20_000 * seed + t,
                monitor=monitor,
            )
            res = run_stage(model, method, setting.knob_dict, setting.lr, stage,
                            step_offset=(t - 1) * setting.steps, weight_decay=self.config.weight_decay)
            stages.append({"stage": t, "cosine": res["cosine"], "curve": res["curve"], "windows": res["windows"]})
            for k in cost:
                cost[k] += res["cost"][k]
            model.eval()
            R[t] = [accuracy(model, task) for task in tasks]
            model.train()
        b = pretrained["untrained"]
        final = {
            "acc": float(np.mean(R[T - 1])),
            "bwt": float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)])),
            "fwt": float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)])),
            "learn_acc": float(np.mean([R[j, j] for j in range(1, T)])),
            "old_acc": float(np.mean(R[T - 1, : T - 1])),
            "new_acc": float(R[T - 1, T - 1]),
        }
        return {"final": final, "acc_matrix": R.tolist(), "stages": stages, "cost": cost}

    def criterion(self, final: dict[str, float]) -> float:
        return float(final["acc"])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(asdict(self.config))
        d["model"] = f"MLP 64-{self.config.hidden}-{self.config.hidden}-10"
        d["incremental"] = {"permuted": "domain-incremental", "split-task": "task-incremental",
                            "split-class": "class-incremental"}
        return d
