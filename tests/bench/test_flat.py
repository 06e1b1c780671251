"""``gradsafe bench`` on the flat scopes (``gradsafe.bench.flat``): the naive loop it times is
the surgery, and the command runs."""

from __future__ import annotations

import torch

from gradsafe.backends.torch_backend import TorchBackend
from gradsafe.bench.flat import make_problem, naive_bases, naive_step, surgery_floor_bytes
from gradsafe.cli import main


def test_naive_loop_matches_the_torch_backend_in_tensor_scope():
    problem = make_problem(600, 3, 4, "tensor", seed=2)
    assert problem.numel == 600 and len(problem.params) == 3
    bases = naive_bases(problem)
    for U in bases:  # per tensor, orthonormal columns
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1]), atol=1e-5, rtol=0)
    grads = problem.grad_sets[0]
    expected = [g.clone() for g in grads]
    naive_step(problem, bases, expected)
    TorchBackend().run(problem.plan, grads)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_global_problem_has_one_orthonormal_basis():
    # (the naive loop per parameter is a cost reference there, not the global projection)
    problem = make_problem(601, 3, 4, "global", seed=2)
    assert problem.numel == 601 and [p.numel() for p in problem.params] == [201, 200, 200]
    B = problem.objective.basis
    torch.testing.assert_close(B @ B.T, torch.eye(4), atol=1e-5, rtol=0)
    assert [tuple(U.shape) for U in naive_bases(problem)] == [(201, 4), (200, 4), (200, 4)]


def test_surgery_floor_bytes():
    assert surgery_floor_bytes(8, 4) == 17 * 4 + 12
    assert surgery_floor_bytes(1, 2, grad_bytes=2) == 3 * 2 + 6


def test_bench_cli(capsys, tmp_path):
    out = tmp_path / "table.txt"
    rc = main(["bench", "--numel", "4000", "--tensors", "4", "--rank", "2", "--rounds", "2", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gradsafe bench: 4,000 parameters in 4 tensors, k=2, scope=global" in printed
    for name in ("naive per-parameter loop", "gradsafe torch backend", "AdamW step (default)", "AdamW step (fused)"):
        assert name in printed
    assert out.read_text() == printed


def test_sweep_needs_cuda(capsys):
    assert main(["bench", "--sweep", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


def test_python_m_gradsafe_bench_is_gradsafe_bench(capsys):
    from gradsafe.bench import main as bench_main

    assert bench_main(["--numel", "400", "--tensors", "2", "--rank", "1", "--rounds", "1", "--device", "cpu"]) == 0
    assert "gradsafe bench: 400 parameters in 2 tensors" in capsys.readouterr().out
