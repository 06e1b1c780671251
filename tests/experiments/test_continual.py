"""The digits task sequences and the continual-learning runs (``data``, ``continual``); the digits
ship with scikit-learn (the ``[demo]`` extra)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("sklearn")

from gradsafe.experiments import continual  # noqa: E402
from gradsafe.experiments.data import make_sequence, make_tasks  # noqa: E402
from gradsafe.experiments.methods import Hyper  # noqa: E402


def test_task_sequences():
    tasks, heads, classes = make_sequence("permuted", 4)
    assert len(tasks) == 4 and heads == 1 and classes == 10
    assert torch.equal(tasks[1].x_test, make_tasks("permuted").b.x_test)
    tasks, heads, classes = make_sequence("split-class")
    assert heads == 1 and classes == 10 and [int(t.y_train.max()) for t in tasks] == [1, 3, 5, 7, 9]
    tasks, heads, classes = make_sequence("split-task")
    assert heads == 5 and classes == 2 and [t.head for t in tasks] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        make_sequence("rotated")



def test_continual_run_is_deterministic():
    cfg = replace(continual.QUICK, n_tasks=2, steps=12, memory=8, eval_every=6)
    pre = continual.pretrain(3, cfg)
    r1 = continual.run(3, cfg, "agem_10", Hyper(), pre)
    r2 = continual.run(3, cfg, "agem_10", Hyper(), pre)
    assert r1["final"] == r2["final"] and r1["windows"] == r2["windows"]
    assert r1["cost"]["step_backward"] == 1  # refreshed at step 10 of 12

