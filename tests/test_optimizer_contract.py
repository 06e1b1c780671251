"""ProtectedOptimizer against the torch.optim contract (see shared COMPAT notes).

Every test uses tiny MLPs on CPU. "Bit-identical" means ``torch.equal``.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch
from torch import nn

import gradsafe
from gradsafe import ProtectedOptimizer, collect_gradients
from gradsafe.surgery import conflict_project, project_out

# ----------------------------------------------------------------------------- helpers


def make_model(seed: int = 0, din: int = 6, dh: int = 12, dout: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, dh), nn.Tanh(), nn.Linear(dh, dout))


def make_batch(seed: int, n: int = 16, din: int = 6, dout: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, din, generator=g), torch.randn(n, dout, generator=g)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def protected_samples(model: nn.Module, m: int = 3, seed: int = 1000) -> list:
    batches = [make_batch(seed + i) for i in range(m)]
    return collect_gradients(model, lambda b: mse(model, b), batches)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def params_of(opt_or_model) -> list[torch.Tensor]:
    if isinstance(opt_or_model, nn.Module):
        return list(opt_or_model.parameters())
    return [p for g in opt_or_model.param_groups for p in g["params"]]


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def all_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def train_step(model: nn.Module, opt, seed: int) -> torch.Tensor:
    opt.zero_grad()
    loss = mse(model, make_batch(seed))
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------- basics


def test_is_a_torch_optimizer():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)})
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.base_optimizer is base


def test_param_groups_state_defaults_are_live_base_objects():
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)})
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    for i in range(2):
        train_step(model, opt, i)
    assert len(base.state) > 0 and opt.state is base.state

    old_groups = base.param_groups
    opt.load_state_dict(opt.state_dict())
    assert base.param_groups is not old_groups  # torch replaced the list...
    assert opt.param_groups is base.param_groups  # ...and the wrapper follows it
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.123
    assert base.param_groups[0]["lr"] == 0.123


def test_add_param_group_trains_new_params_and_later_objective_covers_them():
    model = make_model()
    extra = nn.Linear(3, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)})
    n_before = len(params_of(opt))
    opt.add_param_group({"params": list(extra.parameters()), "lr": 0.05})
    assert len(base.param_groups) == 2 and opt.param_groups is base.param_groups
    assert len(params_of(base)) == n_before + 2

    def full_loss(batch):
        x, y = batch
        out = model(x)
        return ((out - y) ** 2).mean() + (extra(out) ** 2).mean()

    def step(seed):
        opt.zero_grad()
        full_loss(make_batch(seed)).backward()
        opt.step()

    w0 = extra.weight.detach().clone()
    step(0)
    assert not torch.equal(extra.weight, w0), "the added group was not trained"

    # an objective registered after add_param_group covers the new parameters
    all_params = list(model.parameters()) + list(extra.parameters())
    batches = [make_batch(500 + i) for i in range(2)]
    samples = collect_gradients(all_params, full_loss, batches)
    late = opt.protect("late", samples, rank=4)
    assert set(late.coverage) >= {n_before, n_before + 1}

    w1 = [p.detach().clone() for p in all_params]
    step(1)
    # coverage spans every parameter here, so the basis lives over the full flat vector
    assert late.coverage == tuple(range(len(all_params)))
    # SGD: each group's update is -lr_group * (surgered grad); undo the per-group lr
    lrs = [0.1] * n_before + [0.05, 0.05]
    delta = flat([(b - p.detach()) / lr for b, p, lr in zip(w1, all_params, lrs)])
    torch.testing.assert_close(delta, flat(p.grad for p in all_params), rtol=1e-4, atol=1e-6)
    assert delta.norm() > 0
    rel = (late.basis @ delta).norm() / delta.norm()
    assert rel < 1e-4, f"step leaked {rel:.3e} into the late objective's subspace"


def test_zero_grad_set_to_none_and_signature():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)})
    assert "set_to_none" in inspect.signature(opt.zero_grad).parameters

    mse(model, make_batch(0)).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0

    mse(model, make_batch(0)).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- schedulers


def _build_scheduler(kind: str, opt, steps: int):
    S = torch.optim.lr_scheduler
    if kind == "StepLR":
        return S.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "LambdaLR":
        return S.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    if kind == "OneCycleLR":
        return S.OneCycleLR(opt, max_lr=0.2, total_steps=steps + 1)
    if kind == "CyclicLR":
        return S.CyclicLR(
            opt, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=True, base_momentum=0.7, max_momentum=0.9
        )
    if kind == "ReduceLROnPlateau":
        return S.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    raise AssertionError(kind)


def _run_scheduled(kind: str, wrap: bool, steps: int = 6):
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = base
    if wrap:
        # an observe objective: the wrapper runs its full step path but changes nothing
        opt = ProtectedOptimizer(base, {"s": protected_samples(model)}, mode="observe")
    sched = _build_scheduler(kind, opt, steps)
    lrs, moms = [], []
    for i in range(steps):
        lrs.append(base.param_groups[0]["lr"])
        moms.append(base.param_groups[0]["momentum"])
        train_step(model, opt, i)
        if kind == "ReduceLROnPlateau":
            sched.step(1.0)  # never improves: lr halves every step after the first
        else:
            sched.step()
    return lrs, moms, snapshot(model)


@pytest.mark.parametrize("kind", ["StepLR", "LambdaLR", "OneCycleLR", "CyclicLR", "ReduceLROnPlateau"])
def test_scheduler_drives_base_lr(kind):
    lrs_w, moms_w, params_w = _run_scheduled(kind, wrap=True)
    lrs_b, moms_b, params_b = _run_scheduled(kind, wrap=False)
    assert len(set(lrs_b)) > 1, "the schedule should change the lr"
    assert lrs_w == lrs_b
    assert moms_w == moms_b
    if kind == "CyclicLR":
        assert len(set(moms_b)) > 1, "cycle_momentum should move the base's momentum"
    assert all_equal(params_w, params_b), "the lr the base used differs from the bare schedule"


def test_scheduler_lr_is_the_one_used_with_active_surgery():
    """SGD without momentum: delta = -lr * (surgered grad), with lr the scheduled one."""
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)}, rank=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(4):
        lr = base.param_groups[0]["lr"]
        assert lr == pytest.approx(0.1 * 0.5**i)
        before = snapshot(model)
        train_step(model, opt, i)
        for b, p in zip(before, model.parameters()):
            torch.testing.assert_close(p.detach(), b - lr * p.grad, rtol=0, atol=1e-7)
        sched.step()


@pytest.mark.parametrize("kind", ["StepLR", "CyclicLR"])
def test_scheduler_still_drives_base_after_load_state_dict(kind):
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)}, mode="observe")
    sched = _build_scheduler(kind, opt, 10)
    train_step(model, opt, 0)
    sched.step()
    old_groups = base.param_groups
    opt.load_state_dict(opt.state_dict())
    assert base.param_groups is not old_groups
    seen = []
    for i in range(1, 6):
        seen.append(base.param_groups[0]["lr"])
        train_step(model, opt, i)
        sched.step()
    assert len(set(seen)) > 1, f"after load the scheduler no longer changes the base's lr: {seen}"
    assert opt.param_groups[0]["lr"] == base.param_groups[0]["lr"]


def test_scheduler_lr_change_after_load_reaches_parameters():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ProtectedOptimizer(base, {"s": protected_samples(model)}, rank=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    train_step(model, opt, 0)
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01)
    before = snapshot(model)
    train_step(model, opt, 1)
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.01 * p.grad, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- step(closure)


@pytest.mark.parametrize("positional", [False, True])
def test_step_closure_runs_once_under_grad_before_surgery(positional):
    model = make_model()
    samples = protected_samples(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ProtectedOptimizer(base, {"s": samples}, rank=2)
    U = opt.objectives["s"].basis.clone()
    batch = make_batch(7)
    expected_g = flat(torch.autograd.grad(mse(model, batch), list(model.parameters())))
    before = snapshot(model)

    calls = {"n": 0, "grad_enabled": None}
    the_loss = {}

    def closure():
        calls["n"] += 1
        calls["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        the_loss["v"] = loss
        return loss

    # a stale gradient that the closure must replace before the surgery
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    with torch.no_grad():
        out = opt.step(closure) if positional else opt.step(closure=closure)
    assert calls["n"] == 1
    assert calls["grad_enabled"] is True
    assert out is the_loss["v"]

    expected = project_out(expected_g, U)
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, rtol=0, atol=1e-6)
    delta = flat(before) - flat(model.parameters())
    torch.testing.assert_close(delta, 0.1 * expected, rtol=0, atol=1e-6)
    assert (U.double() @ delta.double()).abs().max() < 1e-6


def test_step_closure_without_objectives_returns_loss():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = mse(model, make_batch(0))
        loss.backward()
        return loss

    with torch.no_grad():
        out = opt.step(closure)
    assert calls == [True]
    assert isinstance(out, torch.Tensor) and out.requires_grad


# ----------------------------------------------------------------------------- bit-identity


OPTIMIZERS = {
    "SGD": lambda ps, fe: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=fe),
    "Adam": lambda ps, fe: torch.optim.Adam(ps, lr=1e-2, foreach=fe),
    "AdamW": lambda ps, fe: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=fe),
}


def _run(make_opt, wrap, steps=5, mode=None):
    model = make_model()
    base = make_opt(model.parameters())
    opt = base
    if wrap:
        objs = {"s": protected_samples(model)} if mode is not None else None
        opt = ProtectedOptimizer(base, objs, mode=mode or "project")
    for i in range(steps):
        train_step(model, opt, i)
    return snapshot(model), opt


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_objectives_is_bit_identical_to_base(name, foreach):
    mk = lambda ps: OPTIMIZERS[name](ps, foreach)  # noqa: E731
    ref, _ = _run(mk, wrap=False)
    got, opt = _run(mk, wrap=True)
    assert all_equal(ref, got)
    assert opt.report == {}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_observe_mode_is_bit_identical_and_reports(name, foreach):
    mk = lambda ps: OPTIMIZERS[name](ps, foreach)  # noqa: E731
    ref, _ = _run(mk, wrap=False)
    got, opt = _run(mk, wrap=True, mode="observe")
    assert all_equal(ref, got)
    rep = opt.report
    assert set(rep) == {"s"}
    assert set(rep["s"]) == {"cosine", "conflict", "energy_in_subspace", "energy_removed", "predicted_change", "predicted_change_unprotected", "grad_norm"}
    for k, v in rep["s"].items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
    assert rep["s"]["energy_removed"] == 0.0
    assert -1.0 - 1e-6 <= rep["s"]["cosine"] <= 1.0 + 1e-6
    assert 0.0 < rep["s"]["energy_in_subspace"] <= 1.0


# ----------------------------------------------------------------------------- where the surgery acts


def _adamw_protected_run(space: str, scope: str, steps: int = 20):
    model = make_model(seed=3, din=10, dh=20, dout=4)  # 304 parameters
    samples = collect_gradients(
        model, lambda b: mse(model, b), [make_batch(900 + i, din=10, dout=4) for i in range(6)]
    )
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = ProtectedOptimizer(base, {"s": samples}, mode="project", rank=4, scope=scope, space=space)
    theta0 = flat(model.parameters()).clone()
    for i in range(steps):
        opt.zero_grad()
        mse(model, make_batch(i, din=10, dout=4)).backward()
        opt.step()
    delta = (flat(model.parameters()) - theta0).double()
    obj = opt.objectives["s"]
    assert obj.coverage == tuple(range(len(list(model.parameters()))))
    U = obj.basis.double()
    if scope == "global":
        leak = (U @ delta).norm()
    else:
        leak = torch.stack([(U[:, sl] @ delta[sl]).norm() for sl in obj.slices()]).norm()
    return float(leak / delta.norm()), float(delta.norm())


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_space_update_keeps_adamw_out_of_subspace(scope):
    rel_update, n_update = _adamw_protected_run("update", scope)
    rel_grad, n_grad = _adamw_protected_run("grad", scope)
    assert n_update > 1e-3 and n_grad > 1e-3
    assert rel_update < 1e-4, f"space='update' leaked {rel_update:.3e}"
    assert rel_grad > 1e-2, f"space='grad' with AdamW unexpectedly stayed out of the subspace ({rel_grad:.3e})"


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_space_grad_sgd_step_is_theta_minus_lr_surgery(scope):
    model = make_model()
    samples = protected_samples(model, m=4)
    lr = 0.07
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), {"s": samples}, rank=3, scope=scope)
    obj = opt.objectives["s"]
    for i in range(3):
        theta = flat(model.parameters()).clone()
        opt.zero_grad()
        mse(model, make_batch(i)).backward()
        g = flat(p.grad for p in model.parameters()).clone()
        opt.step()
        if scope == "global":
            expected = project_out(g, obj.basis)
        else:
            expected = torch.cat([project_out(g[sl], obj.basis[:, sl]) for sl in obj.slices()])
        assert (expected - g).norm() > 1e-4 * g.norm(), "the surgery should change this gradient"
        torch.testing.assert_close(flat(model.parameters()), theta - lr * expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- GradScaler


def _scaler_setup():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)}, rank=2)
    return model, opt


def test_step_supports_amp_scaling_not_claimed():
    model, opt = _scaler_setup()
    assert getattr(opt, "_step_supports_amp_scaling", False) is not True
    fused = torch.optim.Adam(make_model().parameters(), lr=1e-3, fused=True)
    opt2 = ProtectedOptimizer(fused)
    assert getattr(opt2, "_step_supports_amp_scaling", False) is not True


def test_grad_scaler_surgery_sees_unscaled_gradients():
    model_a, opt_a = _scaler_setup()
    model_b, opt_b = _scaler_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    batch = make_batch(3)

    opt_a.zero_grad()
    scaler.scale(mse(model_a, batch)).backward()
    assert flat(p.grad for p in model_a.parameters()).abs().max() > 0
    scaler.unscale_(opt_a)
    scaler.step(opt_a)
    scaler.update()

    opt_b.zero_grad()
    mse(model_b, batch).backward()
    opt_b.step()

    # the surgery wrote the same (unscaled) gradient in place, and the same step followed
    grads_a = flat(p.grad for p in model_a.parameters())
    grads_b = flat(p.grad for p in model_b.parameters())
    torch.testing.assert_close(grads_a, grads_b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(flat(model_a.parameters()), flat(model_b.parameters()), rtol=0, atol=1e-7)
    assert opt_a.gradsafe_steps == 1


def test_grad_scaler_inf_skips_step_and_keeps_memory():
    model, opt = _scaler_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    train_step(model, opt, 0)  # one real step first
    obj = opt.objectives["s"]
    mem = [t.clone() for t in (obj.basis, obj.mean_ref, obj.fisher)]
    steps = opt.gradsafe_steps
    before = snapshot(model)

    opt.zero_grad()
    scaler.scale(mse(model, make_batch(1))).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()

    assert all_equal(before, snapshot(model))
    assert opt.gradsafe_steps == steps
    assert all_equal(mem, [obj.basis, obj.mean_ref, obj.fisher])
    assert scaler.get_scale() < 2.0**10  # the scaler saw the inf


# ----------------------------------------------------------------------------- hooks


def test_step_hooks_fire_once_per_step():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)})
    events = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", o is opt)))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", o is opt)))
    for i in range(3):
        train_step(model, opt, i)
    assert events == [("pre", True), ("post", True)] * 3
    h1.remove()
    h2.remove()
    train_step(model, opt, 4)
    assert len(events) == 6


def test_state_dict_hooks_fire():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)})
    events = []
    opt.register_state_dict_pre_hook(lambda o: events.append("sd_pre"))

    def sd_post(o, sd):
        events.append("sd_post")
        sd["marker"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        events.append("load_pre")
        sd = dict(sd)
        sd.pop("marker", None)
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
    train_step(model, opt, 0)
    sd = opt.state_dict()
    assert sd["marker"] == 1
    assert events == ["sd_pre", "sd_post"]
    opt.load_state_dict(sd)
    assert events == ["sd_pre", "sd_post", "load_pre", "load_post"]


# ----------------------------------------------------------------------------- pickle / deepcopy


def _two_objective_opt(model):
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = ProtectedOptimizer(base, {"p": protected_samples(model, seed=10)}, rank=3)
    opt.protect("c", protected_samples(model, seed=20), mode="conflict")
    return opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_gives_working_optimizer(how):
    model = make_model()
    opt = _two_objective_opt(model)
    train_step(model, opt, 0)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert isinstance(opt2, ProtectedOptimizer)
    assert params_of(opt2)[0] is next(model2.parameters())
    assert set(opt2.objectives) == {"p", "c"}
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    fired = []
    opt2.register_step_pre_hook(lambda o, a, k: fired.append(1))
    for i in range(1, 4):
        train_step(model, opt, i)
        train_step(model2, opt2, i)
    assert fired == [1, 1, 1]
    assert all_equal(snapshot(model), snapshot(model2))
    assert opt2.gradsafe_steps == opt.gradsafe_steps == 4
    assert opt2.report.keys() == opt.report.keys()


# ----------------------------------------------------------------------------- state dict


def test_state_dict_loads_with_weights_only_and_carries_memory():
    model = make_model()
    opt = _two_objective_opt(model)
    opt.protect("d", protected_samples(model, seed=30), mode="observe", damping=0.5, scope="tensor")
    for i in range(2):
        train_step(model, opt, i)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    saved = sd["gradsafe"]["objectives"]
    assert set(saved) == {"p", "c", "d"}
    for name, obj in opt.objectives.items():
        s = saved[name]
        assert s["config"]["mode"] == obj.config.mode
        assert s["config"]["rank"] == obj.config.rank
        assert s["config"]["scope"] == obj.config.scope
        assert s["config"]["damping"] == obj.config.damping
        assert torch.equal(s["basis"], obj.basis)
        assert torch.equal(s["mean_ref"], obj.mean_ref)
        assert torch.equal(s["fisher"], obj.fisher)

    fresh_model = make_model()
    fresh = ProtectedOptimizer(torch.optim.AdamW(fresh_model.parameters(), lr=1e-2))
    fresh.load_state_dict(sd)
    assert set(fresh.objectives) == {"p", "c", "d"}
    for name, obj in opt.objectives.items():
        got = fresh.objectives[name]
        assert got.config == obj.config
        assert got.coverage == obj.coverage
        assert torch.equal(got.basis, obj.basis)
        assert torch.equal(got.energies, obj.energies)
    assert fresh.gradsafe_steps == 2


def test_state_dict_bf16_parameters_keep_fp32_memory():
    model = make_model().to(torch.bfloat16)
    samples = [[g.to(torch.bfloat16) for g in s] for s in protected_samples(make_model())]
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), {"s": samples}, rank=3)
    for i in range(2):
        x, y = make_batch(i)
        opt.zero_grad()
        ((model(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = make_model().to(torch.bfloat16)
    opt2 = ProtectedOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    opt2.load_state_dict(sd)
    a, b = opt.objectives["s"], opt2.objectives["s"]
    for name in ("basis", "mean_ref", "fisher", "energies"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert tb.dtype == torch.float32, name
        assert torch.equal(ta, tb), name
    # and the base's own state was cast as torch does
    st = next(iter(opt2.base_optimizer.state.values()))
    assert st["exp_avg"].dtype == torch.bfloat16


RESUME_CASES = {
    "project": dict(mode="project", rank=3),
    "conflict": dict(mode="conflict"),
    "damping": dict(mode="project", rank=2, damping=2.0),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical(case):
    K, M = 3, 4
    kwargs = RESUME_CASES[case]

    def build(model, register=True):
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt = ProtectedOptimizer(base)
        if register:
            opt.protect("s", protected_samples(model, seed=40), **kwargs)
            opt.protect("t", protected_samples(model, seed=50), mode="conflict", references="samples")
        return opt

    model_full = make_model()
    opt_full = build(model_full)
    for i in range(K + M):
        train_step(model_full, opt_full, i)

    model_a = make_model()
    opt_a = build(model_a)
    for i in range(K):
        train_step(model_a, opt_a, i)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = make_model(seed=123)
    model_b.load_state_dict(ckpt["model"])
    opt_b = build(model_b, register=False)
    opt_b.load_state_dict(ckpt["opt"])
    for i in range(K, K + M):
        train_step(model_b, opt_b, i)

    assert all_equal(snapshot(model_full), snapshot(model_b))
    assert opt_b.gradsafe_steps == opt_full.gradsafe_steps == K + M


def test_resume_with_closure_objective_is_bit_identical():
    pbatch = make_batch(77)

    def build(model, register=True):
        opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        if register:
            opt.protect("s", closure=lambda: mse(model, pbatch), mode="conflict", refresh_every=2, damping=0.5)
        return opt

    model_full = make_model()
    opt_full = build(model_full)
    for i in range(7):
        train_step(model_full, opt_full, i)

    model_a = make_model()
    opt_a = build(model_a)
    for i in range(3):
        train_step(model_a, opt_a, i)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = make_model(seed=9)
    model_b.load_state_dict(ckpt["model"])
    opt_b = build(model_b, register=False)
    opt_b.load_state_dict(ckpt["opt"])
    opt_b.attach_closure("s", lambda: mse(model_b, pbatch))
    for i in range(3, 7):
        train_step(model_b, opt_b, i)
    assert all_equal(snapshot(model_full), snapshot(model_b))
    assert opt_b.objectives["s"].num_refreshes == opt_full.objectives["s"].num_refreshes == 3


# ----------------------------------------------------------------------------- closure objectives


def _closure_setup(refresh_every):
    model = make_model()
    calls = {"n": 0}
    pbatch = make_batch(77)

    def prot():
        calls["n"] += 1
        return mse(model, pbatch)

    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2))
    opt.protect("s", closure=prot, mode="conflict", refresh_every=refresh_every)
    return model, opt, calls, pbatch


def test_closure_objective_refreshes_each_step_at_current_params():
    model, opt, calls, pbatch = _closure_setup(1)
    assert calls["n"] == 1  # evaluated once on registration
    obj = opt.objectives["s"]
    lr = 0.2
    n_conflicts = 0
    for i in range(5):
        # the protected gradient at the parameters before this step's update
        ref_now = flat(torch.autograd.grad(mse(model, pbatch), list(model.parameters())))
        theta = flat(model.parameters()).clone()
        opt.zero_grad()
        mse(model, make_batch(i)).backward()
        g = flat(p.grad for p in model.parameters()).clone()
        opt.step()
        assert calls["n"] == 1 + i  # registration, then one refresh before each later step
        assert torch.equal(obj.mean_ref, ref_now), f"step {i}: reference is not the gradient at the current params"
        # training grads were not disturbed by the closure: the step is exactly the
        # conflict projection of the training gradient against that reference
        expected = conflict_project(g, ref_now[None])
        n_conflicts += int(torch.dot(g.double(), ref_now.double()) < 0)
        torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat(model.parameters()), theta - lr * expected, rtol=0, atol=1e-6)
    assert calls["n"] == 5


def test_closure_objective_refresh_every_3():
    model, opt, calls, _ = _closure_setup(3)
    counts = []
    for i in range(10):
        train_step(model, opt, i)
        counts.append(calls["n"])
    # registration at step 0, refreshes before steps 3, 6, 9
    assert counts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert opt.objectives["s"].num_refreshes == 3


def test_closure_must_be_reattached_after_load():
    model, opt, calls, pbatch = _closure_setup(2)
    train_step(model, opt, 0)
    sd = opt.state_dict()

    model2 = copy.deepcopy(model)
    fresh = ProtectedOptimizer(torch.optim.SGD(model2.parameters(), lr=0.2))
    fresh.load_state_dict(sd)
    assert fresh.objectives["s"].closure is None
    before = snapshot(model2)
    fresh.zero_grad()
    mse(model2, make_batch(1)).backward()
    # step 1 is not due (last refresh at 0, every 2): fine without a closure
    fresh.step()
    assert not all_equal(before, snapshot(model2))
    fresh.zero_grad()
    mse(model2, make_batch(2)).backward()
    before = snapshot(model2)
    with pytest.raises(RuntimeError, match="attach_closure"):
        fresh.step()
    assert all_equal(before, snapshot(model2)), "a failed refresh must not move the parameters"

    n2 = {"n": 0}

    def prot2():
        n2["n"] += 1
        return mse(model2, pbatch)

    fresh.attach_closure("s", prot2)
    fresh.step()
    assert n2["n"] == 1
    assert not all_equal(before, snapshot(model2))
    ref = flat(torch.autograd.grad(mse(model2, pbatch), list(model2.parameters())))
    assert not torch.equal(fresh.objectives["s"].mean_ref, ref)  # refreshed at the pre-step params
    assert fresh.objectives["s"].num_refreshes == 1


def test_gradsafe_package_exports():
    assert gradsafe.ProtectedOptimizer is ProtectedOptimizer


# ----------------------------------------------------------------------------- regressions (bugs found and fixed)


def _two_head_model():
    torch.manual_seed(0)
    return nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)])


def _two_head_loss(m, batch, head):
    x, y = batch
    return ((m[head](torch.tanh(m[0](x))) - y) ** 2).mean()


def _two_head_run(wrap: bool):
    m = _two_head_model()
    base = torch.optim.Adam(m.parameters(), lr=1e-2)
    opt = base
    if wrap:
        s = collect_gradients(m, lambda b: _two_head_loss(m, b, 1) + _two_head_loss(m, b, 2), [make_batch(50)])
        opt = ProtectedOptimizer(base, {"s": s}, mode="observe")
    for i, head in enumerate([1, 2]):  # each step leaves the other head with grad None
        opt.zero_grad(set_to_none=True)
        _two_head_loss(m, make_batch(i), head).backward()
        opt.step()
    return snapshot(m), base


def test_observe_mode_bit_identical_when_a_param_has_no_grad():
    ref, base_ref = _two_head_run(wrap=False)
    got, base_got = _two_head_run(wrap=True)
    assert all_equal(ref, got)


def test_report_forgets_unprotected_objective_after_step():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)})
    train_step(model, opt, 0)
    assert "s" in opt.report
    opt.unprotect("s")
    train_step(model, opt, 1)
    assert "s" not in opt.report


def _with_scheduler():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": protected_samples(model)})
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step on the instance
    return model, opt


def test_deepcopy_after_scheduler_steps_the_copy():
    model, opt = _with_scheduler()
    model2, opt2 = copy.deepcopy((model, opt))
    before = snapshot(model2)
    train_step(model2, opt2, 0)
    assert opt2.gradsafe_steps == 1
    assert not all_equal(before, snapshot(model2)), "the copy's step did not move the copy's parameters"


def test_pickle_after_scheduler():
    model, opt = _with_scheduler()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    before = snapshot(model2)
    train_step(model2, opt2, 0)
    assert not all_equal(before, snapshot(model2))


def test_memory_rides_in_the_first_param_group_too():
    """torch.distributed.checkpoint keeps only state and param_groups: the memory is there too,
    loads from there alone, and never lands in the base optimizer's param groups."""
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.protect("s", protected_samples(model))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["gradsafe"] is sd["gradsafe"]
    only_groups = {"state": sd["state"], "param_groups": sd["param_groups"]}
    fresh = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    fresh.load_state_dict(only_groups)
    assert set(fresh.objectives) == {"s"}
    assert torch.equal(fresh.objectives["s"].basis, opt.objectives["s"].basis)
    assert all("gradsafe" not in g for g in fresh.base_optimizer.param_groups)
    assert "gradsafe" in sd["param_groups"][0]  # the caller's dict is not modified


# ------------------------------------------------------------------ space "update": two ways to write u'
class _HoldsUInTheParameters:
    """The torch backend without ``can_subtract``: the optimizer's other update-space path."""

    name = "torch-in-place"

    def __init__(self):
        self._torch = gradsafe.backends.TorchBackend()

    def run(self, plan, tensors):
        return self._torch.run(plan, tensors)


def _update_space_run(backend, dtype, steps=5, agree=False):
    model = make_model(3).to(dtype)
    x, y = make_batch(0)
    # the task's own loss (its reference never conflicts with u), or the task's inputs with
    # the opposite targets (it conflicts at once)
    align_batch = (x, y) if agree else (x, -y)
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), backend=backend, space="update")
    opt.protect("align", closure=lambda: mse(model, tuple(t.to(dtype) for t in align_batch)),
                mode="conflict", refresh_every=1)
    active = 0
    for s in range(steps):
        opt.zero_grad()
        mse(model, tuple(t.to(dtype) for t in make_batch(0 if agree else s % 2))).backward()
        opt.step()
        active += opt.report["align"]["conflict"] > 0
    return [p.detach().clone() for p in model.parameters()], active


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_space_subtracting_from_the_parameters_matches_holding_u_in_them(dtype, monkeypatch):
    calls = []
    run = gradsafe.backends.TorchBackend.run

    def counted(self, plan, tensors, subtract_from=None):
        calls.append(subtract_from is not None)
        return run(self, plan, tensors, subtract_from=subtract_from)

    monkeypatch.setattr(gradsafe.backends.TorchBackend, "run", counted)
    subtracted, active = _update_space_run("torch", dtype)
    assert calls and all(calls)
    calls.clear()
    held, _ = _update_space_run(_HoldsUInTheParameters(), dtype)
    assert calls and not any(calls)
    assert active > 0  # the conflict bound in some steps
    start = [p.detach().to(dtype) for p in make_model(3).parameters()]
    moved = sum(float((h - s).norm() ** 2) for h, s in zip(held, start)) ** 0.5
    diff = sum(float((a - b).norm() ** 2) for a, b in zip(subtracted, held)) ** 0.5
    assert diff <= (1e-6 if dtype == torch.float32 else 1e-13) * moved


def test_update_space_step_whose_rule_leaves_u_alone_is_the_base_step_bit_for_bit():
    protected, active = _update_space_run("torch", torch.float32, agree=True)
    assert active == 0
    model = make_model(3)
    plain = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(5):
        plain.zero_grad()
        mse(model, make_batch(0)).backward()
        plain.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(protected, model.parameters()))
