"""pytest-benchmark suite: a live conflict closure against the hand-written SafeGrad / A-GEM loop.

Run with ``python -m pytest benchmarks/test_bench_live.py -q`` (not part of the test suite).
The problem is ``gradsafe bench --live``'s small MLP (6 x Linear(512, 512) + GELU, a head to
10 classes, batches of 64, AdamW lr 1e-4): one training step of (b) the hand loop
(``torch.autograd.grad`` of the alignment loss, the task backward, a dot product, a
conditional subtraction, AdamW's step) and of (c) ``ProtectedOptimizer(AdamW)`` with one
conflict objective whose closure is refreshed every step. Compare the two medians of one run;
``gradsafe bench --live`` prints the ratio, measured interleaved.
"""

from __future__ import annotations

import pytest

from gradsafe.bench.live import GradsafeLive, HandAGEM, check_pair, make_live_problem


@pytest.fixture(scope="module")
def problem():
    return make_live_problem("mlp512")


@pytest.fixture(scope="module")
def loops(problem):
    hand, gradsafe = HandAGEM(problem), GradsafeLive(problem, 1)
    checks = check_pair("(b) vs (c)", hand, gradsafe, 1)  # the two time the same computation
    assert all(c.ok for c in checks), [str(c) for c in checks]
    return hand, gradsafe


def test_hand_safegrad_loop(benchmark, loops):
    benchmark(loops[0].step)


def test_gradsafe_live_conflict(benchmark, loops):
    benchmark(loops[1].step)
