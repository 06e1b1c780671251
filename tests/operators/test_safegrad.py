"""SafeGrad (Yi et al. 2025): g' = g - min(0, <g, r>) / |r|^2 r + rho r with r the alignment
gradient recomputed every step; and GEM with live references (one closure per task)
against quadprog at every step."""

import numpy as np
import pytest
import torch

from gradsafe import ProtectedOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("rho", [0.0, 0.3])
@pytest.mark.parametrize("space", ["grad", "update"])
def test_safegrad_step_by_step(rho, space):
    model = _model()
    twin = _model()
    params, twin_params = list(model.parameters()), list(twin.parameters())
    lr = 0.2
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=lr), space=space)
    opt.protect("align", closure=lambda: _loss(model, 99), mode="conflict", refresh_every=1, rho=rho)
    conflicts = 0
    for step in range(12):
        # the hand-written SafeGrad step on the twin
        r = _flat_grad(_loss(twin, 99), twin_params)
        g = _flat_grad(_loss(twin, step), twin_params)
        if space == "grad":  # SafeGrad: project, then add rho r
            dot = float(g @ r)
            x = g - min(dot, 0.0) / float(r @ r) * r + rho * r
        else:  # space "update": rho r joins the gradient the base step reads; the update is projected
            dot = float((g + rho * r) @ r)
            x = (g + rho * r) - min(dot, 0.0) / float(r @ r) * r
        conflicts += dot < 0
        with torch.no_grad():
            offset = 0
            for q in twin_params:
                q -= lr * x[offset : offset + q.numel()].view_as(q)
                offset += q.numel()
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        for p, q in zip(params, twin_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        if space == "grad":  # the monitor's first-order change includes the rho r term
            assert opt.report["align"]["predicted_change"] == pytest.approx(float(-lr * r @ x), rel=1e-4, abs=1e-9)
    assert conflicts > 0  # the check exercised the projection


def test_rho_in_observe_mode_is_joint_training_and_the_monitor_counts_it():
    model = _model(1)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.protect("align", closure=lambda: _loss(model, 7), mode="observe", refresh_every=1, rho=0.5)
    opt.zero_grad()
    _loss(model, 0).backward()
    r = _flat_grad(_loss(model, 7), params)
    g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after, before - 0.1 * (g + 0.5 * r))
    rep = opt.report["align"]
    assert rep["predicted_change"] == pytest.approx(float(-0.1 * r @ (g + 0.5 * r)), rel=1e-5)
    assert rep["predicted_change_unprotected"] == pytest.approx(float(-0.1 * r @ g), rel=1e-5)


def test_project_mode_reports_the_change_it_averted():
    """Project mode: predicted_change is ~0 by construction; the unprotected one is not."""
    model = _model(2)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.protect("old", closure=lambda: _loss(model, 5))
    opt.zero_grad()
    _loss(model, 5).backward()  # the protected loss's own gradient: fully inside the subspace
    r = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    opt.step()
    rep = opt.report["old"]
    assert abs(rep["predicted_change"]) < 1e-6 * 0.1 * float(r @ r)  # float32 memory: rounding only
    assert rep["predicted_change_unprotected"] == pytest.approx(float(-0.1 * r @ r), rel=1e-5)


def test_gem_with_live_references_matches_quadprog_every_step():
    """Lopez-Paz and Ranzato 2017: min |x - g|^2 s.t. <x, r_k> >= 0 for every past task k,
    with every r_k recomputed at the current parameters (one closure objective per task)."""
    quadprog = pytest.importorskip("quadprog")
    model = _model(3)
    params = list(model.parameters())
    lr = 0.3
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=lr))
    tasks = [11, 12, 13, 14]
    for k in tasks:
        opt.protect(f"task{k}", closure=lambda k=k: _loss(model, k), mode="conflict", refresh_every=1)
    active_steps = 0
    for step in range(10):
        R = torch.stack([_flat_grad(_loss(model, k), params) for k in tasks]).numpy()
        opt.zero_grad()
        _loss(model, 100 + step).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy()
        before = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
        x = quadprog.solve_qp(np.eye(g.size), g, R.T, np.zeros(len(tasks)))[0]
        active_steps += bool(np.any(R @ g < 0))
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
        np.testing.assert_allclose((before - after) / lr, x, rtol=1e-6, atol=1e-7 * np.abs(g).max())
    assert active_steps > 0
