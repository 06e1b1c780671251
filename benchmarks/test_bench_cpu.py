"""pytest-benchmark suite: the torch backend against its bytes floor, a naive loop and AdamW on CPU.

Run with ``python -m pytest benchmarks -q`` (not part of the test suite). The problem is
a CPU setting scaled by ``GRADSAFE_BENCH_NUMEL`` (default 10M parameters in 50
tensors, k = 8, fp32). Compare the medians in one run; ``gradsafe bench`` prints the same
comparison as a table of ratios, measured in interleaved rounds. ``test_bytes_floor`` streams
the fused surgery's bytes without its arithmetic (``gradsafe.bench.flat.floor_case``);
``test_torch_backend`` runs the step split over ``torch.get_num_threads()`` threads,
``test_torch_backend_one_thread`` on the calling thread alone. The factored cases (``-k factored``) time the factored
projection on ``GRADSAFE_BENCH_FACTORED_LAYERS`` (default 4) square matrices of side
``GRADSAFE_BENCH_FACTORED_SIZE`` (default 512), rank 16, against the naive two-sided loop and
the read+write floor; ``gradsafe bench --scope factored`` prints them as a table.
"""

from __future__ import annotations

import os

import pytest
import torch

from gradsafe.backends import TorchBackend, get_backend
from gradsafe.bench.factored import make_factored_problem, naive_two_sided
from gradsafe.bench.flat import floor_case, make_problem, naive_step

NUMEL = int(os.environ.get("GRADSAFE_BENCH_NUMEL", 10_000_000))


@pytest.fixture(scope="module", params=["global", "tensor"])
def problem(request):
    return make_problem(NUMEL, 50, 8, scope=request.param)


def _set_grads(problem):
    for p, g in zip(problem.params, problem.grad_sets[0]):
        p.grad = g
    return problem.grad_sets[0]


def test_naive_loop(benchmark, problem):
    bases = [problem.objective.basis[:, sl].T.contiguous() for sl in problem.objective.slices()]
    grads = _set_grads(problem)
    benchmark(naive_step, problem, bases, grads)


def test_bytes_floor(benchmark, problem):
    _set_grads(problem)
    benchmark(floor_case(problem), 0)


def test_torch_backend(benchmark, problem):
    backend = get_backend("torch")
    grads = _set_grads(problem)
    benchmark(backend.run, problem.plan, grads)


def test_torch_backend_one_thread(benchmark, problem):
    backend = TorchBackend(threads=1)
    grads = _set_grads(problem)
    benchmark(backend.run, problem.plan, grads)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_step(benchmark, problem, fused):
    _set_grads(problem)
    opt = torch.optim.AdamW(problem.params, lr=1e-3, fused=fused)
    benchmark(opt.step)


# ---------------------------------------------------------------------- the factored scope
FACTORED_LAYERS = int(os.environ.get("GRADSAFE_BENCH_FACTORED_LAYERS", 4))
FACTORED_SIZE = int(os.environ.get("GRADSAFE_BENCH_FACTORED_SIZE", 512))


@pytest.fixture(scope="module")
def factored_problem():
    return make_factored_problem(FACTORED_LAYERS, FACTORED_SIZE, FACTORED_SIZE, 16)


def test_factored_torch_backend(benchmark, factored_problem):
    backend = get_backend("torch")
    benchmark(backend.run, factored_problem.plan, factored_problem.grad_sets[0])


def test_factored_naive_two_sided(benchmark, factored_problem):
    benchmark(naive_two_sided, factored_problem.memories, factored_problem.grad_sets[0])


def test_factored_floor(benchmark, factored_problem):
    benchmark(torch._foreach_mul_, factored_problem.grad_sets[0], 1.0)
