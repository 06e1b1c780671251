"""Scope "factored": the fast path against the reference operators in gradsafe.surgery."""

from __future__ import annotations

import math

import pytest
import torch

from gradsafe import ProtectedOptimizer, collect_activation_bases
from gradsafe.subspace import orthogonality_error
from gradsafe.surgery import factored_component, factored_project, joint_surgery, project_out

SHAPES = [(9, 12), (16, 5), (6, 3, 2, 2)]  # a Linear-like, a tall one, a conv kernel


def _model_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    return params, gen


def _samples(params, gen, n):
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(n)]


def _step(opt, params, grads):
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    return [(b - p.detach()) / lr for b, p in zip(before, params)]


def _mat(t):
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_project_matches_reference(shape, sides, strength):
    params, gen = _model_params([shape, (shape[0],)])
    opt = ProtectedOptimizer(
        torch.optim.SGD(params, lr=0.5),
        {"old": _samples(params, gen, 3)},
        scope="factored",
        rank=2,
        sides=sides,
        strength=strength,
        backend="torch",
    )
    obj = opt.objectives["old"]
    fm = obj.factors[0]
    assert fm.rank_left == (2 if sides != "right" else 0) and fm.rank_right == (2 if sides != "left" else 0)
    assert orthogonality_error(fm.left) < 1e-5 and orthogonality_error(fm.right) < 1e-5
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    x = _step(opt, params, grads)
    expect_w = factored_project(_mat(grads[0]).double(), [(fm.left, strength)], [(fm.right, strength)])
    torch.testing.assert_close(_mat(x[0]).double(), expect_w, rtol=1e-4, atol=1e-5)
    # the 1-D bias keeps a flat per-tensor basis (tensor scope)
    expect_b = project_out(grads[1].double(), obj.basis[:, :].double(), strength)
    torch.testing.assert_close(x[1].double(), expect_b, rtol=1e-4, atol=1e-5)


def test_hard_projection_removes_the_whole_factored_subspace():
    params, gen = _model_params([(10, 14)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), {"old": _samples(params, gen, 4)}, scope="factored", rank=3)
    fm = opt.objectives["old"].factors[0]
    g = torch.randn(10, 14, generator=gen)
    x = _step(opt, params, [g])[0].double()
    # nothing of the result lies in span{P^T A + B Q}: its component there is zero
    assert factored_component(x, fm.left, fm.right).abs().max() < 1e-5
    torch.testing.assert_close(x, g.double() - factored_component(g, fm.left, fm.right).double(), rtol=1e-4, atol=1e-5)


def test_several_objectives_project_off_the_union():
    params, gen = _model_params([(8, 11)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), scope="factored", rank=2, backend="torch")
    opt.protect("a", _samples(params, gen, 2))
    opt.protect("b", _samples(params, gen, 2), strength=0.5)
    opt.protect("c", _samples(params, gen, 2), sides="right")
    fa, fb, fc = (opt.objectives[n].factors[0] for n in "abc")
    g = torch.randn(8, 11, generator=gen)
    x = _step(opt, params, [g])[0]
    expect = factored_project(
        g.double(),
        [(fa.left, 1.0), (fb.left, 0.5)],
        [(fa.right, 1.0), (fb.right, 0.5), (fc.right, 1.0)],
    )
    torch.testing.assert_close(x.double(), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gradient_dtypes(dtype):
    params, gen = _model_params([(12, 7)])
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    samples = [[torch.randn(12, 7, generator=gen).to(dtype)] for _ in range(3)]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), {"old": samples}, scope="factored", rank=2)
    fm = opt.objectives["old"].factors[0]
    g = torch.randn(12, 7, generator=gen).to(dtype)
    params[0].grad = g.clone()
    opt.base_optimizer.step = lambda *a, **k: None  # look at the gradient the surgery hands on
    opt.step()
    expect = factored_project(g.double(), [(fm.left, 1.0)], [(fm.right, 1.0)])
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert params[0].grad.dtype == dtype
    torch.testing.assert_close(params[0].grad.double(), expect, rtol=tol, atol=tol * float(g.abs().max()))


def test_conflict_reference_is_the_projected_mean_and_the_constraint_holds():
    params, gen = _model_params([(9, 6), (9,)])
    samples = _samples(params, gen, 3)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), {"safe": samples}, scope="factored", mode="conflict", rank=2)
    obj = opt.objectives["safe"]
    fm = obj.factors[0]
    mean_w = torch.stack([s[0] for s in samples]).mean(0)
    torch.testing.assert_close(fm.reference().double(), factored_component(mean_w, fm.left, fm.right).double(), rtol=1e-4, atol=1e-5)
    r = torch.cat([fm.reference().reshape(-1), obj.mean_ref]).double()
    # a gradient that conflicts with the reference
    g = -3.0 * r.float() + 0.1 * torch.randn(r.numel(), generator=gen)
    grads = [g[:54].reshape(9, 6), g[54:]]
    x = _step(opt, params, grads)
    xf = torch.cat([t.reshape(-1) for t in x]).double()
    expect = joint_surgery(g.double(), references=[r])
    torch.testing.assert_close(xf, expect, rtol=1e-4, atol=1e-4)
    assert float(xf @ r) > -1e-4
    rep = opt.report["safe"]
    assert rep["conflict"] == 1.0
    assert rep["cosine"] == pytest.approx(float(g.double() @ r) / float(g.double().norm() * r.norm()), rel=1e-4)
    assert rep["predicted_change"] == pytest.approx(-float(xf @ r), abs=1e-4)


def test_factored_project_then_conflict_composes_in_order():
    params, gen = _model_params([(10, 8)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), scope="factored", rank=2, backend="torch")
    opt.protect("task", _samples(params, gen, 3))
    opt.protect("safe", _samples(params, gen, 2), mode="conflict", rank=3)
    ft, fs = opt.objectives["task"].factors[0], opt.objectives["safe"].factors[0]
    r = fs.reference().reshape(-1).double()
    g = -2.0 * fs.reference() + 0.2 * torch.randn(10, 8, generator=gen)
    x = _step(opt, params, [g])[0].reshape(-1).double()
    phi = factored_project(g.double(), [(ft.left, 1.0)], [(ft.right, 1.0)]).reshape(-1)
    torch.testing.assert_close(x, joint_surgery(phi, references=[r]), rtol=1e-4, atol=1e-4)


def test_factored_with_flat_objectives_on_the_same_tensors():
    params, gen = _model_params([(7, 9), (7,)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), rank=2, backend="torch")
    opt.protect("fact", _samples(params, gen, 2), scope="factored")
    opt.protect("flat", _samples(params, gen, 2), scope="global", mode="conflict")
    ff, fl = opt.objectives["fact"], opt.objectives["flat"]
    g = [torch.randn(p.shape, generator=gen) for p in params]
    x = _step(opt, params, g)
    phi_w = factored_project(g[0].double(), [(ff.factors[0].left, 1.0)], [(ff.factors[0].right, 1.0)])
    phi_b = project_out(g[1].double(), ff.basis.double())
    h = torch.cat([phi_w.reshape(-1), phi_b])
    expect = joint_surgery(h, references=[fl.mean_ref.double()])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in x]).double(), expect, rtol=1e-4, atol=1e-4)


def test_report_energies_and_cosine():
    params, gen = _model_params([(8, 12)])
    samples = _samples(params, gen, 3)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, scope="factored", rank=2)
    fm = opt.objectives["old"].factors[0]
    g = torch.randn(8, 12, generator=gen)
    x = _step(opt, params, [g])[0].double()
    rep = opt.report["old"]
    inside = factored_component(g, fm.left, fm.right).double()
    r = fm.reference().double()
    gd = g.double()
    assert rep["energy_in_subspace"] == pytest.approx(float((inside * inside).sum() / (gd * gd).sum()), rel=1e-4)
    assert rep["energy_removed"] == pytest.approx(float(((gd - x) ** 2).sum() / (gd * gd).sum()), rel=1e-4)
    assert rep["cosine"] == pytest.approx(float((gd * r).sum() / (gd.norm() * r.norm())), rel=1e-4)
    assert rep["predicted_change"] == pytest.approx(-0.1 * float((x * r).sum()), abs=1e-6)
    assert rep["grad_norm"] == pytest.approx(float(gd.norm()), rel=1e-5)


def test_observe_mode_changes_nothing_and_reports():
    params, gen = _model_params([(8, 12)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 3)}, scope="factored", mode="observe")
    g = torch.randn(8, 12, generator=gen)
    x = _step(opt, params, [g])[0]
    torch.testing.assert_close(x, g, rtol=1e-5, atol=1e-6)
    assert 0 < opt.report["old"]["energy_in_subspace"] < 1
    assert opt.report["old"]["energy_removed"] == 0.0


def test_triton_backend_runs_factored_plans_through_torch():
    pytest.importorskip("triton")
    from gradsafe.backends.triton_backend import TritonBackend

    results = []
    for backend in ("torch", TritonBackend()):
        params, gen = _model_params([(8, 12), (8,)])
        opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 3)}, scope="factored", backend=backend)
        results.append(_step(opt, params, [torch.randn(p.shape, generator=gen) for p in params]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip():
    params, gen = _model_params([(6, 5), (6,)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 3)}, scope="factored", rank=2, damping=0.5)
    state = opt.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ProtectedOptimizer(torch.optim.SGD(params2, lr=0.1))
    opt2.load_state_dict(state)
    g = [torch.randn(p.shape, generator=gen) for p in params]
    x1, x2 = _step(opt, params, g), _step(opt2, params2, g)
    for a, b in zip(x1, x2):
        torch.testing.assert_close(a, b)
    assert opt2.objectives["old"].factors[0].rank_left == 2


def test_add_samples_grows_the_bases_and_keeps_the_running_mean():
    params, gen = _model_params([(9, 10)])
    # rank-one gradients: each sample adds one direction per side
    rank_one = lambda: [torch.randn(9, 1, generator=gen) @ torch.randn(1, 10, generator=gen)]  # noqa: E731
    first, second = [rank_one()], [rank_one(), rank_one()]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": first}, scope="factored", rank=3, mode="conflict")
    assert opt.objectives["old"].factors[0].rank_left == 1
    opt.add_samples("old", second)
    fm = opt.objectives["old"].factors[0]
    assert fm.rank_left == 3 and fm.rank_right == 3
    mean = torch.stack([s[0] for s in first + second]).mean(0)
    # bases of three rank-one samples at rank 3 span every sample's rows and columns
    torch.testing.assert_close(fm.reference(), factored_component(mean, fm.left, fm.right), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fm.reference(), mean, rtol=1e-4, atol=1e-4)


def test_factored_memory_is_what_the_formula_says():
    m, n, r = 64, 48, 4
    params, gen = _model_params([(m, n), (m,)])
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 8)}, scope="factored", rank=r)
    report = opt.memory_report(quiet=True)
    rows = {row.parameter: row for row in report.rows}
    assert rows["param 0"].basis == 4 * r * (m + n)
    assert rows["param 0"].reference == 4 * r * (n + m)
    assert rows["param 0"].fisher == 0  # no damping: no Fisher kept
    obj = opt.objectives["old"]
    fm = obj.factors[0]
    actual = sum(t.numel() * 4 for t in (fm.left, fm.right, fm.ref_left, fm.ref_right)) + obj._storage.numel() * 4
    assert report.total() == actual
    flat = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 8)}, scope="tensor", rank=r)
    assert flat.memory_report(quiet=True).total() > 4 * report.total()


def test_memory_report_prints_a_table(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": _samples(params, gen, 2)}, scope="factored", rank=2)
    opt.memory_report(model)
    out = capsys.readouterr().out
    assert "0.weight" in out and "1.bias" in out and "factored" in out and "% of param" in out


def test_memory_budget_fits_and_follows_energy():
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(32, 32)), torch.nn.Parameter(torch.zeros(32, 32))]
    # layer 0's gradients are nearly rank one, layer 1's spread over many directions
    u, v = torch.randn(32, 1, generator=gen), torch.randn(1, 32, generator=gen)
    samples = [
        [u @ v * (1 + 0.1 * i) + 0.01 * torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)]
        for i in range(6)
    ]
    budget = 12 * 4 * 64  # twelve factored directions
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, scope="factored", rank=8, memory_budget=budget)
    report = opt.memory_report(quiet=True)
    assert report.total() <= budget
    f0, f1 = (opt.objectives["old"].factors[t] for t in (0, 1))
    assert f0.rank_left + f0.rank_right < f1.rank_left + f1.rank_right
    assert f0.rank_left >= 1 and f0.rank_right >= 1
    # a fraction of the parameters' bytes
    opt2 = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, scope="factored", rank=8, memory_budget=0.25)
    assert opt2.memory_report(quiet=True).total() <= 0.25 * 2 * 32 * 32 * 4


def test_memory_budget_for_flat_scopes_and_errors():
    params, gen = _model_params([(10, 10), (10,)])
    samples = _samples(params, gen, 6)
    for scope in ("global", "tensor"):
        opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, scope=scope, rank=6, memory_budget=4 * 110 * 4)
        assert opt.memory_report(quiet=True).total() <= 4 * 110 * 4
        assert opt.objectives["old"].basis.shape[0] == 2
    with pytest.raises(ValueError, match="below its fixed memory"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, scope="tensor", memory_budget=100)
    with pytest.raises(ValueError, match="fraction"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, memory_budget=1.5)
    with pytest.raises(TypeError, match="memory_budget"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"old": samples}, memory_budget="1GB")


def test_config_errors():
    params, gen = _model_params([(4, 4)])
    samples = _samples(params, gen, 2)
    with pytest.raises(ValueError, match="references='samples'"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"s": samples}, scope="factored", mode="conflict", references="samples")
    with pytest.raises(ValueError, match="unknown sides"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), {"s": samples}, scope="factored", sides="top")


# ---------------------------------------------------------------------- activation bases
def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_activation_bases_keep_outputs_on_protected_inputs():
    model = _mlp()
    old_x = torch.randn(40, 4) @ torch.randn(4, 12)  # protected inputs span 4 directions
    acts = collect_activation_bases(model, [old_x[:20], old_x[20:]], energy=0.999)
    assert acts[model[0].weight].side == "right" and acts[model[0].weight].rows.shape == (4, 12)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.protect("old", bases=acts)
    assert opt.objectives["old"].config.scope == "factored"
    with torch.no_grad():
        first_layer_before = model[0](old_x)
    new_x, new_y = torch.randn(64, 12), torch.randn(64, 3)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(new_x), new_y).backward()
        opt.step()
    with torch.no_grad():
        # the first layer's weight never moves along the protected inputs (its bias does)
        delta = model[0](old_x) - first_layer_before
        bias_shift = delta.mean(0, keepdim=True)
    assert float((delta - bias_shift).abs().max()) < 1e-4
    assert model[0].weight.grad is not None


def test_activation_bases_for_conv_layers_match_unfolded_patches():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(3, 2, 5, 5)
    acts = collect_activation_bases(conv, [x], energy=1.0, max_rank=100)
    b = acts[conv.weight]
    assert b.side == "right" and b.rows.shape[1] == 2 * 3 * 3
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    # every patch lies in the span of the basis
    resid = patches - patches @ b.rows.T @ b.rows
    assert float(resid.norm() / patches.norm()) < 1e-4
    opt = ProtectedOptimizer(torch.optim.SGD(conv.parameters(), lr=0.1))
    opt.protect("old", bases=acts)
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    with torch.no_grad():
        out_before = torch.nn.functional.conv2d(x, conv.weight, None, padding=1)
    opt.step()
    with torch.no_grad():
        out_after = torch.nn.functional.conv2d(x, conv.weight, None, padding=1)
    assert float((out_after - out_before).abs().max()) < 1e-4


def test_activation_energy_threshold_sets_the_rank():
    torch.manual_seed(1)
    lin = torch.nn.Linear(10, 2)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1] + [0.0] * 6)
    x = torch.randn(200, 10) * scales
    low = collect_activation_bases(lin, [x], energy=0.8)[lin.weight]
    high = collect_activation_bases(lin, [x], energy=0.9999)[lin.weight]
    assert low.rows.shape[0] < high.rows.shape[0] <= 4
    assert low.captured >= 0.8 and high.captured >= 0.9999
    capped = collect_activation_bases(lin, [x], energy=1.0, max_rank=2)[lin.weight]
    assert capped.rows.shape[0] == 2


def test_activation_bases_with_gradients_for_conflict():
    model = _mlp()
    old_x, old_y = torch.randn(32, 12), torch.randn(32, 3)
    acts = collect_activation_bases(model, [old_x])
    loss = lambda: torch.nn.functional.mse_loss(model(old_x), old_y)  # noqa: E731
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="needs gradient samples"):
        opt.protect("old", bases=acts, mode="conflict")
    with pytest.raises(ValueError, match="scope"):
        opt.protect("old", bases=acts, scope="tensor")
    obj = opt.protect("old", bases=acts, closure=loss, mode="conflict")
    assert set(obj.fixed_factors) == {0, 2}  # the two weights; biases are flat
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(), params)
    fm = obj.factors[0]
    torch.testing.assert_close(fm.reference(), factored_component(grads[0], fm.left, fm.right), rtol=1e-4, atol=1e-6)
    opt.zero_grad()
    (-loss()).backward()  # a step that would raise the protected loss
    opt.step()
    assert opt.report["old"]["predicted_change"] <= 1e-6


def test_factored_closure_refresh():
    model = _mlp()
    x, y = torch.randn(16, 12), torch.randn(16, 3)
    loss = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), scope="factored", mode="conflict", refresh_every=2)
    opt.protect("old", closure=loss)
    versions = []
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(16, 12)), torch.randn(16, 3)).backward()
        opt.step()
        versions.append(opt.objectives["old"].num_refreshes)
    assert versions == [0, 0, 1, 1]  # due after steps 2 and 4, run at the start of the next
    assert math.isfinite(opt.report["old"]["cosine"])


def test_space_update_projects_the_parameter_change():
    params, gen = _model_params([(8, 10), (8,)])
    opt = ProtectedOptimizer(torch.optim.Adam(params, lr=0.05), {"old": _samples(params, gen, 3)},
                             scope="factored", rank=2, space="update")
    fm = opt.objectives["old"].factors[0]
    for _ in range(3):
        before = params[0].detach().clone()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        delta = (params[0].detach() - before).double()
        # Adam's update is projected: no part of the weight's change lies in the factored subspace
        assert float(factored_component(delta, fm.left, fm.right).abs().max()) < 1e-6
        assert float(delta.abs().max()) > 1e-3


def test_gradient_monitor_observes_a_factored_objective():
    from gradsafe import GradientMonitor

    params, gen = _model_params([(8, 12)])
    monitor = GradientMonitor(params, {"old": _samples(params, gen, 3)}, scope="factored", rank=2)
    g = torch.randn(8, 12, generator=gen)
    params[0].grad = g.clone()
    stats = monitor.measure()["old"]
    fm = monitor._inner.objectives["old"].factors[0]
    inside = factored_component(g, fm.left, fm.right).double()
    assert stats["energy_in_subspace"] == pytest.approx(float((inside**2).sum() / (g.double() ** 2).sum()), rel=1e-4)
    torch.testing.assert_close(params[0].grad, g)  # observing changes nothing
