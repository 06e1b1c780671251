"""``gradsafe bench --scope factored``: the problem it times is right, and the command runs."""

from __future__ import annotations

import pytest
import torch

from gradsafe.backends.torch_backend import TorchBackend
from gradsafe.bench.factored import FLOOR, GRADSAFE, NAIVE, make_factored_problem, memory_bytes, naive_two_sided
from gradsafe.cli import main


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_backend_matches_naive_two_sided(sides):
    problem = make_factored_problem(2, 24, 16, 3, sides=sides, seed=1)
    mems = problem.memories
    assert len(mems) == 2 and problem.plan.factor_ops
    for fm in mems:
        for B in (fm.left, fm.right):
            torch.testing.assert_close(B @ B.T, torch.eye(B.shape[0]), atol=1e-5, rtol=0)
        assert fm.rank_left == (3 if sides in ("both", "left") else 0)
        assert fm.rank_right == (3 if sides in ("both", "right") else 0)

    grads = problem.grad_sets[0]
    expected = [g.clone() for g in grads]
    naive_two_sided(mems, expected)
    # the naive projection is (I - P^T P) G (I - Q^T Q)
    for fm, g, e in zip(mems, grads, expected):
        L = torch.eye(24) - fm.left.T @ fm.left
        R = torch.eye(16) - fm.right.T @ fm.right
        torch.testing.assert_close(e, L @ g @ R, atol=1e-5, rtol=1e-5)

    TorchBackend().run(problem.plan, grads)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_memory_bytes_from_tensors():
    layers, m, n, r = 2, 24, 16, 3
    problem = make_factored_problem(layers, m, n, r)
    mem = memory_bytes(problem)
    assert mem["factored"] == layers * 4 * r * (m + n) * 2
    assert mem["flat_basis"] == layers * 4 * r * m * n
    assert mem["params"] == layers * 4 * m * n


def test_bench_factored_cli(capsys):
    rc = main(["bench", "--scope", "factored", "--quick", "--device", "cpu",
               "--layers", "2", "--shape", "64", "48", "--rank", "4", "--rounds", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "variant" in out and "median ms" in out and "vs floor" in out
    assert "floor" in out
    for name in (FLOOR, NAIVE, GRADSAFE, "AdamW step (default)"):
        assert name in out
    assert "2 layers of 64x48" in out and "rank 4" in out
