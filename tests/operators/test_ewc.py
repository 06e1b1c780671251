"""EWC, online EWC and L2-SP against the papers' formulas (Kirkpatrick et al. 2017;
Schwarz et al. 2018; Li et al. 2018), through the real wrapper."""

import pytest
import torch

from gradsafe import ProtectedOptimizer, StateDictError


def _setup(dtype=torch.float32, n=(4, 3), samples=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in n]
    S = [[torch.randn(s, generator=g, dtype=dtype) for s in n] for _ in range(samples)]
    return params, S, g


def _fisher(S):
    """The paper's empirical Fisher from gradient samples: mean_j g_j^2 (per batch: Avalanche's)."""
    return [torch.stack([s[i].float() for s in S]).pow(2).mean(0) for i in range(len(S[0]))]


@pytest.mark.parametrize("space", ["grad", "update"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_one_sgd_step_is_the_penalty_gradient(dtype, lam, space):
    params, S, g = _setup(dtype)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), space=space)
    opt.protect("task", S, mode="observe", ewc=lam)
    anchor = [p.detach().clone() for p in params]
    F = _fisher(S)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
    grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in params]
    before = [p.detach().clone() for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()
    for p, b, gr, a, f in zip(params, before, grads, anchor, F):
        expect = b - 0.1 * (gr + lam * f.to(dtype) * (b - a))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-6)
    penalty = sum(float((f.double() * (b.double() - a.double()) ** 2).sum()) for f, b, a in zip(F, before, anchor)) * lam / 2
    assert opt.report["task"]["ewc_penalty"] == pytest.approx(penalty, rel=1e-5)


def test_adamw_reads_the_penalised_gradient():
    params, S, g = _setup()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ProtectedOptimizer(torch.optim.AdamW(params, lr=1e-2))
    ref = torch.optim.AdamW(twin, lr=1e-2)
    opt.protect("task", S, mode="observe", ewc=2.0)
    anchor = [p.detach().clone() for p in params]
    F = _fisher(S)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, gr, a, f in zip(params, twin, grads, anchor, F):
            p.grad = gr.clone()
            q.grad = gr + 2.0 * f * (q.detach() - a)
        opt.step()
        ref.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


def _train_on_quadratic(**options):
    """3000 SGD steps on the task loss 1/2 |theta - c|^2 with one protected objective; returns
    the end point, c, the parameters at registration and the samples' Fisher."""
    params, S, g = _setup(dtype=torch.float64, n=(6,))
    (p,) = params
    c = torch.randn(6, generator=g, dtype=torch.float64)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.05))
    opt.protect("task", S, mode="observe", **options)
    anchor = p.detach().clone()
    for _ in range(3000):
        p.grad = p.detach() - c
        opt.step()
    (F,) = _fisher(S)
    return p.detach(), c, anchor, F.double()


def test_converges_to_ewcs_stationary_point():
    """Task loss plus the penalty: the minimiser is (c + lam F theta*) / (1 + lam F)."""
    end, c, anchor, F = _train_on_quadratic(ewc=4.0)
    lam_f = 4.0 * F
    torch.testing.assert_close(end, (c + lam_f * anchor) / (1 + lam_f), rtol=1e-9, atol=1e-9)


def test_damping_is_not_ewc():
    """The preconditioner has no anchor: on the same problem it ends at the task's minimiser."""
    end, c, _, _ = _train_on_quadratic(damping=4.0)
    torch.testing.assert_close(end, c, rtol=1e-6, atol=1e-6)


def test_given_anchor_and_fisher_and_l2sp():
    params, S, g = _setup()
    anchor = [torch.randn(p.shape, generator=g) for p in params]
    F = [torch.rand(p.shape, generator=g) for p in params]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0))
    opt.protect("given", S, mode="observe", ewc=1.5, anchor=anchor, fisher_diagonal=F)
    opt.protect("l2sp", mode="observe", ewc=0.5, fisher="identity", anchor=[anchor[0], None])
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for i, (p, b, a, f) in enumerate(zip(params, before, anchor, F)):
        step = 1.5 * f * (b - a) + (0.5 * (b - a) if i == 0 else 0.0)
        torch.testing.assert_close(p.detach(), b - step, rtol=1e-6, atol=1e-6)
    assert opt.report["l2sp"]["ewc_penalty"] == pytest.approx(0.25 * float(((before[0] - anchor[0]) ** 2).sum()), rel=1e-5)
    assert opt.objectives["l2sp"].coverage == (0,)
    # more samples of the same task leave a given Fisher as it is
    opt.add_samples("given", S[:2])
    torch.testing.assert_close(opt.objectives["given"].fisher, torch.cat([f.reshape(-1) for f in F]))


def test_more_samples_of_a_task_average_the_fisher_over_all_of_them():
    params, S, _ = _setup(samples=6)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0))
    opt.protect("task", S[:2], mode="observe", ewc=1.0)
    opt.add_samples("task", S[2:])
    expect = torch.cat([f.reshape(-1) for f in _fisher(S)])
    torch.testing.assert_close(opt.objectives["task"].fisher, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_online_ewc_consolidate(gamma):
    """Schwarz et al. 2018: F <- gamma F_old + F_new, anchor <- the parameters at consolidation."""
    params, S, g = _setup(samples=4)
    new = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.protect("tasks", S, mode="observe", ewc=2.0, ewc_gamma=gamma)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    opt.consolidate("tasks", new)
    F = [gamma * a + b for a, b in zip(_fisher(S), _fisher(new))]
    anchor = [p.detach().clone() for p in params]
    torch.testing.assert_close(opt.objectives["tasks"].fisher, torch.cat([f.reshape(-1) for f in F]))
    assert opt.objectives["tasks"].num_samples == 7
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b, a, f in zip(params, before, anchor, F):
        torch.testing.assert_close(p.detach(), b - 0.1 * 2.0 * f * (b - a), rtol=1e-6, atol=1e-6)


def test_penalty_comes_before_the_projection():
    """With mode="project" the surgery sees g + lam F (theta - theta*)."""
    params, S, g = _setup(n=(5,), samples=2)
    (p,) = params
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0))
    opt.protect("task", S, mode="project", ewc=1.0, rank=2)
    anchor = p.detach().clone()
    U = opt.objectives["task"].basis
    with torch.no_grad():
        p.add_(torch.randn(5, generator=g))
    before = p.detach().clone()
    gr = torch.randn(5, generator=g)
    p.grad = gr.clone()
    opt.step()
    (F,) = _fisher(S)
    h = gr + F * (before - anchor)
    torch.testing.assert_close(p.detach(), before - (h - U.T @ (U @ h)), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_keeps_the_anchor():
    params, S, _ = _setup()
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.protect("task", S, mode="observe", ewc=1.0)
    state = opt.state_dict()
    anchor = [a.clone() for a in opt.objectives["task"].anchor]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    other = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    other.load_state_dict(state)
    for a, b in zip(other.objectives["task"].anchor, anchor):
        assert torch.equal(a, b)
    state["gradsafe"]["objectives"]["task"]["anchor"][0] = torch.zeros(7)
    with pytest.raises(StateDictError, match="'task'.*anchor"):
        ProtectedOptimizer(torch.optim.SGD(params, lr=0.1)).load_state_dict(state)


def test_errors_name_the_objective_and_the_field():
    params, S, _ = _setup()
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="ewc must be"):
        opt.protect("a", S, ewc=-1.0)
    with pytest.raises(ValueError, match="'b'.*anchor.*ewc > 0"):
        opt.protect("b", S, anchor=[p.detach() for p in params])
    with pytest.raises(ValueError, match="'c'.*mode 'project'"):
        opt.protect("c", ewc=1.0, fisher="identity")
    with pytest.raises(ValueError, match="'d'.*needs gradient samples"):
        opt.protect("d", ewc=1.0, mode="observe")
    with pytest.raises(ValueError, match="'e'.*fisher_diagonal"):
        opt.protect("e", S, ewc=1.0, fisher="identity", fisher_diagonal=[torch.ones(4), torch.ones(3)])
    with pytest.raises(ValueError, match="'f'.*anchor for parameter 1"):
        opt.protect("f", S, ewc=1.0, anchor=[torch.zeros(4), torch.zeros(5)])
    opt.protect("plain", S)
    with pytest.raises(ValueError, match="'plain'.*consolidate"):
        opt.consolidate("plain", S)


@pytest.mark.parametrize("scope", ["tensor", "factored"])
def test_the_penalty_is_the_same_in_every_scope(scope):
    params, S, g = _setup(n=(4, 3))
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    S = [[torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for _ in range(4)]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.protect("task", S, mode="observe", ewc=2.0, scope=scope, rank=2)
    anchor = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, a, f in zip(params, anchor, _fisher(S)):
        torch.testing.assert_close(p.detach(), a + 0.3 - 0.1 * 2.0 * f * 0.3, rtol=1e-6, atol=1e-6)
