"""``gradsafe bench`` on the flat scopes (``gradsafe.bench.flat``): the naive loop it times is
the surgery, and the command runs."""

from __future__ import annotations

import sys

import pytest
import torch

from gradsafe._optional import MissingDependency
from gradsafe.backends.torch_backend import TorchBackend
from gradsafe.bench.flat import format_sweep, make_problem, naive_bases, naive_step, surgery_floor_bytes, sweep
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
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "gradsafe bench: --sweep measures the Triton kernels against the memory floor: it needs a CUDA device\n"


def test_python_m_gradsafe_bench_is_gradsafe_bench(capsys):
    from gradsafe.bench import main as bench_main

    assert bench_main(["--numel", "400", "--tensors", "2", "--rank", "1", "--rounds", "1", "--device", "cpu"]) == 0
    assert "gradsafe bench: 400 parameters in 2 tensors" in capsys.readouterr().out


def test_sweep_rows_without_triton():
    rows, peak = sweep(torch.device("cpu"), ks=(2,), bases=("fp32", "bf16"), scopes=("global", "tensor"),
                       tensor_counts=(1, 3), numel=600, rounds=1, with_triton=False, peak=1e10)
    assert peak == 1e10
    assert [(r.basis, r.scope, r.tensors) for r in rows] == [
        ("fp32", "global", 1), ("bf16", "global", 1), ("fp32", "global", 3), ("bf16", "global", 3),
        ("fp32", "tensor", 3), ("bf16", "tensor", 3)]  # tensor scope on one tensor is the global problem
    assert all(set(r.times) == {"naive", "torch", "adamw", "adamw_fused"} and r.launches is None for r in rows)
    assert "gradsafe bench --sweep on cpu" in format_sweep(rows, peak, "cpu")


def test_sweep_names_the_triton_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(MissingDependency, match=r'^gradsafe bench --sweep needs triton: pip install "gradsafe\[triton\]"$'):
        sweep(torch.device("cpu"), ks=(1,), tensor_counts=(1,), numel=100, rounds=1, peak=1e10)
