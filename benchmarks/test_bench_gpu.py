"""pytest-benchmark suite on a GPU: the Triton backend against the torch backend, the naive
loop and AdamW (skipped without CUDA: these measure the compiled kernels).

Run with ``python -m pytest benchmarks/test_bench_gpu.py -q`` on an NVIDIA machine.
Problem: ``GRADSAFE_BENCH_NUMEL`` parameters (default 2^25, 128 MB of fp32 gradient, larger
than any L2) in 1 or 200 tensors, k = 16, scope global and tensor. Each benchmarked call
ends with a device synchronisation, so the times are step times. ``gradsafe bench --sweep``
prints the full grid as one table with floors and ratios.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU benchmarks need a CUDA device", allow_module_level=True)

from gradsafe.bench.flat import make_problem, naive_bases, naive_step  # noqa: E402
from gradsafe.backends import get_backend  # noqa: E402

NUMEL = int(os.environ.get("GRADSAFE_BENCH_NUMEL", 1 << 25))
K = 16


@pytest.fixture(scope="module", params=[(1, "global"), (200, "global"), (200, "tensor")], ids=lambda p: f"T{p[0]}-{p[1]}")
def problem(request):
    tensors, scope = request.param
    pr = make_problem(NUMEL, tensors, K, scope=scope, device="cuda")
    for p, g in zip(pr.params, pr.grad_sets[0]):
        p.grad = g
    yield pr
    del pr
    torch.cuda.empty_cache()


def synced(fn):
    def call(*args):
        fn(*args)
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("basis", ["fp32", "bf16"])
def test_naive_loop(benchmark, problem, basis):
    nb = naive_bases(problem, torch.float32 if basis == "fp32" else torch.bfloat16)
    benchmark(synced(naive_step), problem, nb, problem.grad_sets[0])


def test_torch_backend(benchmark, problem):
    be = get_backend("torch")
    benchmark(synced(be.run), problem.plan, problem.grad_sets[0])


@pytest.mark.parametrize("basis", ["fp32", "bf16"])
def test_triton_backend(benchmark, problem, basis):
    from gradsafe.backends.triton_backend import TritonBackend

    be = TritonBackend(basis_dtype=torch.float32 if basis == "fp32" else torch.bfloat16)
    be.run(problem.plan, problem.grad_sets[0])  # compile and build the layout first
    benchmark(synced(be.run), problem.plan, problem.grad_sets[0])


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_step(benchmark, problem, fused):
    opt = torch.optim.AdamW(problem.params, lr=1e-3, fused=fused)
    benchmark(synced(opt.step))
