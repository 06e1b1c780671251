"""Task sequences built on scikit-learn's 8x8 digits (shipped with scikit-learn; nothing is downloaded).

Two tasks (``make_tasks``):

- ``"permuted"`` (domain-incremental): task A is the digits, task B the same digits with a
  fixed random permutation of the 64 pixels; one shared 10-way head.
- ``"split"`` (task-incremental): task A is digits 0-4, task B digits 5-9; one 5-way head
  per task on a shared trunk.

Sequences of tasks (``make_sequence``), for the continual-learning study:

- ``"permuted"`` (domain-incremental): task 1 is the digits, task t > 1 the digits with the
  fixed pixel permutation number t - 1 (task 2 is ``make_tasks("permuted").b``); one shared
  10-way head, the label is the digit.
- ``"split-task"`` (task-incremental): five tasks of two digits each (0/1, 2/3, ...), one
  2-way head per task; the task identity is given at test time.
- ``"split-class"`` (class-incremental): the same five tasks, one shared 10-way head, and
  no task identity: the model must tell every digit from every other.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from .._optional import require_installed

__all__ = [
    "SETTINGS",
    "SPLIT_SEED",
    "PERMUTATION_SEED",
    "Task",
    "TwoTasks",
    "load_digits_tensors",
    "make_tasks",
    "make_sequence",
    "SEQUENCE_SETTINGS",
    "batch_order",
]

SPLIT_SEED = 0  # the train/test split is the same for every run seed
PERMUTATION_SEED = 1234  # task B's pixel permutation is the same for every run seed
TEST_FRACTION = 0.3
SETTINGS = ("permuted", "split")
SEQUENCE_SETTINGS = ("permuted", "split-task", "split-class")


@dataclass(frozen=True)
class Task:
    """One task: standardised inputs, labels in ``[0, classes)`` and the head that reads them."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    head: int
    classes: int


@dataclass(frozen=True)
class TwoTasks:
    setting: str
    a: Task
    b: Task
    heads: int  # number of output heads the model needs
    classes: int  # outputs per head


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 64) float32 pixels and int64 labels.

    Reads the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, the file that
    ``load_digits`` reads) without importing scikit-learn, which takes seconds; falls back to
    ``sklearn.datasets.load_digits`` if the file is not where it is expected. Without
    scikit-learn (the ``[demo]`` extra) raises ``MissingDependency``.
    """
    require_installed("sklearn", "demo", "the digits data (gradsafe.experiments.data)")
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            if data.shape == (1797, 65):
                return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 digits, split (fixed seed, stratified) and standardised with train statistics."""
    x, y = _digits_arrays()
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(TEST_FRACTION * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = np.sort(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std < 1e-6] = 1.0  # a few border pixels are always 0
    x = (x - mean) / std
    return (
        torch.from_numpy(x[train_idx]),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x[test_idx]),
        torch.from_numpy(y[test_idx]),
    )


def make_tasks(setting: str = "permuted") -> TwoTasks:
    """Build task A and task B for ``setting`` ("permuted" or "split")."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    xtr, ytr, xte, yte = load_digits_tensors()
    if setting == "permuted":
        perm = torch.from_numpy(np.random.default_rng(PERMUTATION_SEED).permutation(xtr.shape[1]))
        a = Task("digits", xtr, ytr, xte, yte, head=0, classes=10)
        b = Task("permuted digits", xtr[:, perm], ytr, xte[:, perm], yte, head=0, classes=10)
        return TwoTasks(setting, a, b, heads=1, classes=10)
    lo_tr, lo_te = ytr < 5, yte < 5
    a = Task("digits 0-4", xtr[lo_tr], ytr[lo_tr], xte[lo_te], yte[lo_te], head=0, classes=5)
    b = Task("digits 5-9", xtr[~lo_tr], ytr[~lo_tr] - 5, xte[~lo_te], yte[~lo_te] - 5, head=1, classes=5)
    return TwoTasks(setting, a, b, heads=2, classes=5)


def make_sequence(setting: str = "permuted", n_tasks: int | None = None) -> tuple[list[Task], int, int]:
    """The tasks of ``setting`` in order, the number of heads and the outputs per head.

    ``n_tasks``: how many tasks (permuted: any number >= 2, default 4; split: 2 to 5, default 5).
    """
    if setting not in SEQUENCE_SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SEQUENCE_SETTINGS}")
    xtr, ytr, xte, yte = load_digits_tensors()
    if setting == "permuted":
        n = 4 if n_tasks is None else int(n_tasks)
        if n < 2:
            raise ValueError(f"n_tasks must be >= 2, got {n}")
        tasks = [Task("digits", xtr, ytr, xte, yte, head=0, classes=10)]
        for t in range(1, n):
            perm = torch.from_numpy(np.random.default_rng(PERMUTATION_SEED + t - 1).permutation(xtr.shape[1]))
            tasks.append(Task(f"permutation {t}", xtr[:, perm], ytr, xte[:, perm], yte, head=0, classes=10))
        return tasks, 1, 10
    n = 5 if n_tasks is None else int(n_tasks)
    if not 2 <= n <= 5:
        raise ValueError(f"split settings have 2 to 5 tasks, got {n}")
    task_il = setting == "split-task"
    tasks = []
    for t in range(n):
        lo = 2 * t
        tr = (ytr == lo) | (ytr == lo + 1)
        te = (yte == lo) | (yte == lo + 1)
        shift = lo if task_il else 0
        tasks.append(
            Task(
                f"digits {lo}/{lo + 1}",
                xtr[tr],
                ytr[tr] - shift,
                xte[te],
                yte[te] - shift,
                head=t if task_il else 0,
                classes=2 if task_il else 10,
            )
        )
    return tasks, (n if task_il else 1), (2 if task_il else 10)


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches: shuffled epochs over ``n`` examples, drawn from ``generator``."""
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=generator)
    pos = 0
    while len(out) < steps:
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=generator)
            pos = 0
        out.append(perm[pos : pos + batch_size])
        pos += batch_size
    return out
