"""torch.distributed.checkpoint (single process, no process group): what survives, and the fake step."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from gradsafe import ProtectedOptimizer
from gradsafe.integrations.checkpoint import GradsafeAppState, GradsafeMemory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    samples = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(3)]
    xo = torch.randn(6, 5, generator=g)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]
    return model, samples, (lambda: model(xo).pow(2).mean()), data


def make_opt(model, samples, closure, base: str, objectives: bool = True) -> ProtectedOptimizer:
    if base == "sgd":  # stateless: DCP's fake step runs whenever the gradients are None
        b = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        b = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = ProtectedOptimizer(b, rank=3)
    if objectives:
        opt.protect("old", samples, mode="project")
        opt.protect("live", closure=closure, mode="conflict", refresh_every=2)
    return opt


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory_tensors(opt):
    sd = opt.state_dict()["gradsafe"]
    return {(n, k): v.clone() for n, o in sd["objectives"].items() for k, v in o.items() if isinstance(v, torch.Tensor)}


def test_base_state_round_trips_without_a_process_group():
    model, samples, closure, data = setup()
    opt = make_opt(model, samples, closure, "adam")
    train(model, opt, data[:2])
    assert not dist.is_initialized()
    sd = get_optimizer_state_dict(model, opt)
    assert set(sd) == {"state", "param_groups"}  # keyed by parameter name ...
    assert set(sd["state"]) == {n for n, _ in model.named_parameters()}
    model2, _, closure2, _ = setup()
    model2.load_state_dict(model.state_dict())
    opt2 = make_opt(model2, samples, closure2, "adam", objectives=False)
    set_optimizer_state_dict(model2, opt2, sd)
    for p, q in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_memory_round_trips_through_get_and_set_optimizer_state_dict():
    model, samples, closure, data = setup()
    opt = make_opt(model, samples, closure, "adam")
    train(model, opt, data[:3])
    sd = get_optimizer_state_dict(model, opt)
    model2, _, closure2, _ = setup()
    opt2 = make_opt(model2, samples, closure2, "adam", objectives=False)
    set_optimizer_state_dict(model2, opt2, sd)
    assert set(opt2.objectives) == {"old", "live"}
    assert opt2.gradsafe_steps == opt.gradsafe_steps
    a, b = memory_tensors(opt), memory_tensors(opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_fake_zero_gradient_step_leaves_finite_state_and_parameters(base):
    model, samples, closure, _ = setup()
    opt = make_opt(model, samples, closure, base)
    params = [p.detach().clone() for p in model.parameters()]
    memory = memory_tensors(opt)
    sd = get_optimizer_state_dict(model, opt)  # fresh optimizer: DCP runs its fake step
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())
    for state in sd["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))
    after = memory_tensors(opt)
    assert after.keys() == memory.keys()
    assert all(torch.isfinite(v).all() for v in after.values())
    for name, stats in opt.report.items():
        assert all(v == v and abs(v) != float("inf") for v in stats.values()), name


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_fake_zero_gradient_step_does_not_advance_gradsafe(base):
    model, samples, closure, data = setup()
    opt = make_opt(model, samples, closure, base)
    if base == "sgd":  # stateless: the fake step runs mid-training, whenever grads are None
        train(model, opt, data[:3])
    steps, report = opt.gradsafe_steps, opt.report
    get_optimizer_state_dict(model, opt)
    assert opt.gradsafe_steps == steps
    assert opt.report == report


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_app_state_save_load_continues_the_uninterrupted_run(tmp_path, base):
    model, samples, closure, data = setup()
    opt = make_opt(model, samples, closure, base)
    train(model, opt, data)

    model1, samples1, closure1, data1 = setup()
    opt1 = make_opt(model1, samples1, closure1, base)
    train(model1, opt1, data1[:3])
    dcp.save({"app": GradsafeAppState(model1, opt1)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert opt1.gradsafe_steps == 3  # the fake step DCP ran for the stateless SGD did not count
    train(model1, opt1, data1[3:])
    for p, q in zip(model.parameters(), model1.parameters()):
        assert torch.equal(p, q)  # saving did not disturb the run

    model2, _, closure2, data2 = setup(seed=5)  # other weights: they come from the checkpoint
    opt2 = make_opt(model2, samples, closure2, base, objectives=False)
    dcp.load({"app": GradsafeAppState(model2, opt2)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert set(opt2.objectives) == {"old", "live"} and opt2.gradsafe_steps == 3
    opt2.attach_closure("live", closure2)  # closures are not saved
    train(model2, opt2, data2[3:])
    assert opt2.gradsafe_steps == opt.gradsafe_steps == 6
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_gradsafe_memory_next_to_the_optimizer_state(tmp_path):
    model, samples, closure, data = setup()
    opt = make_opt(model, samples, closure, "adam")
    train(model, opt, data[:3])
    dcp.save({"optim": get_optimizer_state_dict(model, opt), "gradsafe": GradsafeMemory(opt)},
             checkpoint_id=str(tmp_path / "ckpt"))

    model2, _, closure2, _ = setup()
    model2.load_state_dict(model.state_dict())
    opt2 = make_opt(model2, samples, closure2, "adam", objectives=False)
    state = {"optim": get_optimizer_state_dict(model2, opt2), "gradsafe": GradsafeMemory(opt2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # restores the memory ...
    set_optimizer_state_dict(model2, opt2, state["optim"])  # ... and then the base state
    assert set(opt2.objectives) == {"old", "live"} and opt2.gradsafe_steps == 3
    a, b = memory_tensors(opt), memory_tensors(opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
