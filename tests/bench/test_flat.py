"""``gradsafe bench`` on the flat scopes (``gradsafe.bench.flat``): the naive loop it times is
the surgery, and the command runs."""

from __future__ import annotations

import sys

import pytest
import torch

from gradsafe._optional import MissingDependency
from gradsafe.backends.torch_backend import TorchBackend
from gradsafe.bench.flat import (
    FLOOR,
    PROBE,
    TABLE_LEGEND,
    floor_case,
    format_sweep,
    format_table,
    make_problem,
    naive_bases,
    naive_step,
    surgery_floor_bytes,
    sweep,
)
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
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.startswith(f"gradsafe bench: 4,000 parameters in 4 tensors, k=2, scope=global, fp32 gradients; "
                              f"cpu, {torch.get_num_threads()} threads; 2 interleaved rounds\n")
    assert TABLE_LEGEND in printed
    names = (PROBE, "naive per-parameter loop", "gradsafe torch backend", "AdamW step (default)", "AdamW step (fused)")
    table = printed[printed.index("variant"):]
    for name in (FLOOR,) + names:
        assert name in table
    row = next(line for line in table.splitlines() if line.startswith(FLOOR))
    assert row.split()[-4:-2] == ["32", "1.00x"]  # 2k+1 = 5 rows of 4 B, 3 gradient passes of 4 B
    assert "gradsafe torch backend: " in table and "x its bytes floor (32 B/param at that rate)." in table
    assert out.read_text() == printed
    # progress on stderr: the problem, then each variant's warm-up, then each round
    progress = [line.split("] ", 1)[1] for line in captured.err.splitlines()]
    assert progress == (["building the problem (4,000 parameters, k=2, scope=global)"]
                        + [f"warm-up {i + 1}/5: {name}" for i, name in enumerate(names)]
                        + [f"timed round {r}/2 (every variant once)" for r in (1, 2)])


def test_floor_case_moves_the_surgery_bytes_and_leaves_the_gradients():
    problem = make_problem(3000, 3, 4, seed=1)
    before = [g.clone() for g in problem.grad_sets[1]]
    floor_case(problem)(1)
    assert all(torch.equal(a, b) for a, b in zip(problem.grad_sets[1], before))
    assert problem.objective.memory.storage.shape[0] >= problem.rank + 1  # the rows it reads exist


@pytest.mark.parametrize("probe_s, floor_ms, source", [(0.010, 10.0, PROBE), (0.020, 14.286, "AdamW step (fused)")])
def test_format_table_ratios_are_times_over_the_named_rows(probe_s, floor_ms, source):
    # the floor is the surgery's 80 B/param at the higher bandwidth: the probe's 8.0 GB/s, or
    # fused AdamW's 28 B / 5 ms = 5.6 GB/s when the probe only reaches 4.0
    times = {PROBE: [probe_s, probe_s], "naive per-parameter loop": [0.040], "gradsafe torch backend": [0.012, 0.011, 0.013],
             "AdamW step (default)": [0.020], "AdamW step (fused)": [0.005]}
    floors = {PROBE: 80, "naive per-parameter loop": 76, "gradsafe torch backend": 80,
              "AdamW step (default)": 28, "AdamW step (fused)": 28}
    text = format_table(times, floors, 1_000_000)
    lines = text.splitlines()
    assert lines[2].startswith(FLOOR) and lines[2].split()[-5:-3] == [f"{floor_ms:.3f}", "80"]
    row = next(line for line in lines if line.startswith("gradsafe torch backend"))
    assert row.split()[-5:] == ["12.000", "80", f"{12 / floor_ms:.2f}x", "0.30x", "0.60x"]
    assert f"at {80 / floor_ms:.1f} GB/s ({source})" in text
    assert f"AdamW step (fused): 5.6 GB/s, {PROBE}: {80 / probe_s / 1e9 * 1e6:.1f} GB/s." in text
    assert f"gradsafe torch backend: {12 / floor_ms:.2f}x its bytes floor (80 B/param at that rate)." in text


def test_format_table_states_each_backend_against_its_own_bytes():
    # a bfloat16 basis moves 17 * 2 + 12 = 46 B/param: its line uses its own floor, the column the fp32 one
    times = {PROBE: [0.010], "gradsafe triton (bf16 basis)": [0.0069], "AdamW step (fused)": [0.1]}
    floors = {PROBE: 80, "gradsafe triton (bf16 basis)": 46, "AdamW step (fused)": 28}
    text = format_table(times, floors, 1_000_000)
    row = next(line for line in text.splitlines() if line.startswith("gradsafe triton"))
    assert row.split()[-5:-2] == ["6.900", "46", "0.69x"]
    assert "gradsafe triton (bf16 basis): 1.20x its bytes floor (46 B/param at that rate)." in text


def test_sweep_needs_cuda(capsys):
    assert main(["bench", "--sweep", "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "gradsafe bench: --sweep measures the Triton kernels against the memory floor: it needs a CUDA device\n"


def test_cpu_kernels_need_the_torch_backend_on_the_cpu(capsys):
    assert main(["bench", "--cpu-kernels", "--backend", "triton", "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("gradsafe bench: --cpu-kernels times the torch backend's CPU loops: it needs --device cpu "
                       "and --backend torch\n")


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
