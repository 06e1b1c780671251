"""Regressions for silent wrong answers found against external solvers: a rule whose cut
depended on the objectives' scales, and float64 parameters rounded in space "update"."""

import numpy as np
import pytest
import torch

from gradsafe import ProtectedOptimizer
from gradsafe.numerics import equilibrated_pinv


@pytest.mark.parametrize("strength", [1e-6, 1e-9, 0.5])
def test_a_weak_soft_objective_leaves_a_hard_one_on(strength):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.protect("hard", [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)])
    opt.protect("soft", [torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)], strength=strength)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(-p.detach().numpy(), [0.0, 1.0 - strength, 1.0], rtol=1e-6, atol=1e-12)


def test_equilibrated_pinv_solves_in_the_range_whatever_the_scales():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5, 8))
    A[4] = A[0] + A[1]  # a dependent row
    for E in ([0, 0, 1e6, 1e9, 0], [0, 1e-12, 0, 0, 0], [1e12] * 5):
        K = A @ A.T + np.diag(E)
        a = K @ rng.standard_normal(5)
        mu = equilibrated_pinv(K) @ a
        np.testing.assert_allclose(K @ mu, a, rtol=1e-8, atol=1e-8 * np.abs(a).max())


@pytest.mark.parametrize("mode", ["project", "conflict", "observe"])
def test_update_space_keeps_float64_parameters_exact(mode):
    p = torch.nn.Parameter(torch.full((4,), 1.0 + 1e-12, dtype=torch.float64))
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=0.0), space="update")
    opt.protect("old", [torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)], mode=mode)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), 1.0 + 1e-12, dtype=torch.float64))


def test_update_space_float64_surgery_is_float64_accurate_off_the_rows():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64) * 1e3)
    start = p.detach().clone()
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1e-9), space="update")
    opt.protect("old", [torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)])
    step = torch.randn(6, generator=g, dtype=torch.float64)
    p.grad = step.clone()
    opt.step()
    expect = start - 1e-9 * step
    expect[0] = start[0]
    torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-15 * 1e3)


def test_the_monitor_sees_a_small_reference_of_its_own_span():
    """energy_in_subspace of a GEM objective: a reference 1e-6 the size of the other still
    spans its direction (the report's pseudo-inverse is the rule's, scale-invariant)."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
    refs = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1e-6, 0.0], dtype=torch.float64)]
    opt.protect("gem", [[r] for r in refs], mode="conflict", references="samples", rank=2)
    p.grad = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    opt.step()
    assert opt.report["gem"]["energy_in_subspace"] == pytest.approx(1.0, rel=1e-6)
