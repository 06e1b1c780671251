"""accelerate (real library, CPU): prepare, schedulers after the state-dict round trip, accumulate."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState

import gradsafe
from gradsafe import ProtectedOptimizer
from gradsafe.integrations import find_protected_optimizer
from ._linalg import flat, orthonormal, relative_overlap, snapshot


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    xo, yo = torch.randn(32, 6), torch.randint(0, 3, (32,))
    old = lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    samples = gradsafe.collect_gradients(model, old, [(xo[i : i + 8], yo[i : i + 8]) for i in range(0, 32, 8)])
    data = torch.utils.data.TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    return model, samples, data


def test_prepare_keeps_objectives_and_scheduler_drives_base_lr():
    model, samples, data = setup()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples}, rank=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    groups_before = opt.param_groups
    accelerator = Accelerator(cpu=True)
    model, popt, psched, loader = accelerator.prepare(model, opt, sched, torch.utils.data.DataLoader(data, batch_size=8))
    assert isinstance(popt, AcceleratedOptimizer) and find_protected_optimizer(popt) is opt
    # prepare() round-tripped the state dict: param_groups is a new list, the memory was reloaded
    assert opt.param_groups is not groups_before
    assert set(opt.objectives) == {"old"}
    params = list(model.parameters())
    Q = orthonormal(samples, params)
    lrs = []
    for x, y in loader:
        before = snapshot(params)
        popt.zero_grad()
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        popt.step()
        psched.step()
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
        delta = flat([p - b for p, b in zip(params, before)], params)
        assert relative_overlap(Q, delta) < 1e-4
    assert opt.gradsafe_steps == 6
    assert lrs == pytest.approx([0.1 * 0.5 ** (i + 1) for i in range(6)])
    assert opt.base_optimizer.param_groups is opt.param_groups


def test_accumulate_runs_the_surgery_on_sync_steps_only():
    model, samples, data = setup()
    calls = []

    micro = 0

    def old_closure():
        calls.append(micro)
        return model(torch.ones(2, 6)).pow(2).mean()

    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples}, rank=4)
    opt.protect("live", closure=old_closure, mode="conflict", refresh_every=1)
    calls.clear()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model, popt, psched, loader = accelerator.prepare(model, opt, sched, torch.utils.data.DataLoader(data, batch_size=4))
    params = list(model.parameters())
    Q = orthonormal(samples, params)
    start = snapshot(params)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            popt.step()
            psched.step()
            popt.zero_grad()
        micro += 1
        assert opt.gradsafe_steps == micro // 3
    assert micro == 12 and opt.gradsafe_steps == 4
    # refresh_every=1 recomputes the closure's gradient before steps 2, 3, 4: on sync steps only
    assert calls == [5, 8, 11]
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    delta = flat([p - b for p, b in zip(params, start)], params)
    assert delta.norm() > 1e-3 and relative_overlap(Q, delta) < 1e-4


def test_closure_passed_positionally_and_zero_grad_signature():
    model, samples, data = setup()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples}, rank=4)
    accelerator = Accelerator(cpu=True)
    model, popt = accelerator.prepare(model, opt)
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    params = list(model.parameters())
    before = snapshot(params)

    def closure():
        popt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        return loss

    popt.step(closure)  # AcceleratedOptimizer forwards it positionally
    assert opt.gradsafe_steps == 1
    delta = flat([p - b for p, b in zip(params, before)], params)
    assert delta.norm() > 0 and relative_overlap(orthonormal(samples, params), delta) < 1e-4
    popt.zero_grad(set_to_none=True)  # accelerate inspects the signature for set_to_none
    assert all(p.grad is None for p in params)


def test_save_state_and_load_state_restore_the_memory(tmp_path):
    model, samples, data = setup()
    opt = ProtectedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), {"old": samples}, rank=4)
    accelerator = Accelerator(cpu=True)
    model, popt = accelerator.prepare(model, opt)
    for i in range(2):
        popt.zero_grad()
        accelerator.backward(model(data.tensors[0][:8]).sum())
        popt.step()
    accelerator.save_state(str(tmp_path / "state"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    model2, _, _ = setup(seed=1)
    opt2 = ProtectedOptimizer(torch.optim.Adam(model2.parameters(), lr=0.01))
    accelerator2 = Accelerator(cpu=True)
    model2, popt2 = accelerator2.prepare(model2, opt2)
    accelerator2.load_state(str(tmp_path / "state"))
    assert set(opt2.objectives) == {"old"} and opt2.gradsafe_steps == 2
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for opt_, popt_, model_ in ((opt, popt, model), (opt2, popt2, model2)):
        popt_.zero_grad()
        model_(data.tensors[0][8:16]).sum().backward()
        popt_.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
