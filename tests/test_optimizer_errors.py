"""Bad input to ProtectedOptimizer gets a clear error that names what is wrong."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gradsafe import ProtectedOptimizer, collect_gradients


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 5, generator=g), torch.randn(12, 2, generator=g)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def samples_for(model, m: int = 2, seed: int = 100):
    return collect_gradients(model, lambda b: mse(model, b), [make_batch(seed + i) for i in range(m)])


def wrapper(model=None, **kwargs):
    model = model or make_model()
    return model, ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


# ----------------------------------------------------------------------------- samples


def test_sample_shape_mismatch_names_index_and_shapes():
    model, opt = wrapper()
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[2] = torch.randn(3, 7)  # parameter 2 is the second Linear's weight, (2, 7)
    with pytest.raises(ValueError, match=r"parameter 2.*\(3, 7\).*\(2, 7\)"):
        opt.protect("s", sample)
    assert "s" not in opt.objectives


def test_sample_shape_mismatch_via_add_samples():
    model, opt = wrapper()
    opt.protect("s", samples_for(model))
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[1] = torch.randn(8)
    with pytest.raises(ValueError, match=r"parameter 1.*\(8,\).*\(7,\)"):
        opt.add_samples("s", sample)


def test_sample_wrong_number_of_entries():
    model, opt = wrapper()
    sample = [torch.randn_like(p) for p in model.parameters()][:-1]
    with pytest.raises(ValueError, match=r"3 entries.*4 parameters"):
        opt.protect("s", sample)


def test_sample_wrong_number_of_entries_in_constructor():
    model = make_model()
    sample = [torch.randn_like(p) for p in model.parameters()] + [torch.randn(2)]
    with pytest.raises(ValueError, match=r"5 entries.*4 parameters"):
        ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"s": sample})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_protected_gradients_name_the_objective(bad):
    model, opt = wrapper()
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[0][1, 1] = bad
    with pytest.raises(ValueError, match=r"'safety'.*(inf|nan)"):
        opt.protect("safety", sample)
    assert "safety" not in opt.objectives


def test_non_finite_samples_added_later_are_rejected_and_memory_kept():
    model, opt = wrapper()
    obj = opt.protect("safety", samples_for(model))
    mem = [t.clone() for t in (obj.basis, obj.mean_ref, obj.fisher)]
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[3][0] = float("nan")
    with pytest.raises(ValueError, match=r"'safety'.*(inf|nan)"):
        opt.add_samples("safety", sample)
    assert all(torch.equal(a, b) for a, b in zip(mem, (obj.basis, obj.mean_ref, obj.fisher)))


def test_non_finite_closure_gradient_names_the_objective():
    model, opt = wrapper()

    def bad_loss():
        return mse(model, make_batch(0)) * float("nan")

    with pytest.raises(ValueError, match=r"'bad'.*(inf|nan)"):
        opt.protect("bad", closure=bad_loss)


def test_zero_norm_sample():
    model, opt = wrapper()
    sample = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"zero norm"):
        opt.protect("s", sample)


def test_all_none_sample():
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"'s'"):
        opt.protect("s", [None] * len(list(model.parameters())))


def test_sparse_gradient_sample():
    model, opt = wrapper()
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[0] = sample[0].to_sparse()
    with pytest.raises(TypeError, match=r"sparse"):
        opt.protect("s", sample)


def test_complex_gradient_sample():
    model, opt = wrapper()
    sample = [torch.randn_like(p) for p in model.parameters()]
    sample[2] = torch.randn(sample[2].shape, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"complex"):
        opt.protect("s", sample)


def test_sample_entry_not_a_tensor():
    model, opt = wrapper()
    sample = [p.detach().numpy().copy() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"ndarray"):
        opt.protect("s", [sample])


def test_samples_not_a_sequence():
    model, opt = wrapper()
    with pytest.raises(TypeError, match=r"'s'.*sequence"):
        opt.protect("s", torch.randn(3))


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "option, value, pattern",
    [
        ("mode", "protectify", r"unknown mode 'protectify'"),
        ("scope", "layer", r"unknown scope 'layer'"),
        ("references", "median", r"unknown references 'median'"),
    ],
)
def test_unknown_choice_in_protect(option, value, pattern):
    model, opt = wrapper()
    with pytest.raises(ValueError, match=pattern):
        opt.protect("s", samples_for(model), **{option: value})
    assert "s" not in opt.objectives


@pytest.mark.parametrize(
    "option, value, pattern",
    [
        ("mode", "protectify", r"unknown mode"),
        ("scope", "layer", r"unknown scope"),
        ("space", "params", r"unknown space 'params'"),
        ("references", "median", r"unknown references"),
    ],
)
def test_unknown_choice_in_constructor(option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        wrapper(**{option: value})


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one(rank):
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"rank must be >= 1"):
        opt.protect("s", samples_for(model), rank=rank)
    with pytest.raises(ValueError, match=r"rank must be >= 1"):
        wrapper(rank=rank)


@pytest.mark.parametrize("rank", [2.0, "4", True])
def test_rank_not_int(rank):
    model, opt = wrapper()
    with pytest.raises(TypeError, match=r"rank must be an int"):
        opt.protect("s", samples_for(model), rank=rank)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_unit_interval(strength):
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"strength"):
        opt.protect("s", samples_for(model), strength=strength)


@pytest.mark.parametrize("damping", [-1.0, -1e-9, float("inf")])
def test_negative_or_infinite_damping(damping):
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"damping"):
        opt.protect("s", samples_for(model), damping=damping)
    with pytest.raises(ValueError, match=r"damping"):
        wrapper(damping=damping)


# ----------------------------------------------------------------------------- registry


def test_duplicate_objective_name():
    model, opt = wrapper()
    obj = opt.protect("safety", samples_for(model))
    with pytest.raises(ValueError, match=r"'safety'.*already"):
        opt.protect("safety", samples_for(model, seed=7))
    assert opt.objectives["safety"] is obj


def test_unprotect_unknown_name():
    model, opt = wrapper()
    opt.protect("safety", samples_for(model))
    with pytest.raises(KeyError, match=r"'task'"):
        opt.unprotect("task")
    assert "safety" in opt.objectives


def test_add_samples_unknown_name():
    model, opt = wrapper()
    with pytest.raises(KeyError, match=r"'ghost'"):
        opt.add_samples("ghost", samples_for(model))


def test_attach_closure_unknown_name():
    model, opt = wrapper()
    with pytest.raises(KeyError, match=r"'ghost'"):
        opt.attach_closure("ghost", lambda: mse(model, make_batch(0)))


def test_grads_and_closure_both():
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"'s'.*not both"):
        opt.protect("s", samples_for(model), closure=lambda: mse(model, make_batch(0)))


def test_grads_and_closure_neither():
    model, opt = wrapper()
    with pytest.raises(ValueError, match=r"'s'.*(samples|closure)"):
        opt.protect("s")


@pytest.mark.parametrize("name", [3, None, ("a",)])
def test_non_string_name(name):
    model, opt = wrapper()
    with pytest.raises(TypeError, match=r"name must be a string"):
        opt.protect(name, samples_for(model))


def test_non_string_name_in_constructor():
    model = make_model()
    with pytest.raises(TypeError, match=r"name must be a string"):
        ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {7: samples_for(model)})


def test_objectives_mapping_is_read_only():
    model, opt = wrapper()
    opt.protect("s", samples_for(model))
    with pytest.raises(TypeError):
        opt.objectives["t"] = opt.objectives["s"]  # type: ignore[index]


def test_closure_returning_non_scalar():
    model, opt = wrapper()
    with pytest.raises(TypeError, match=r"'s'.*scalar"):
        opt.protect("s", closure=lambda: model(make_batch(0)[0]))


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("base", [None, "SGD", [torch.zeros(2, requires_grad=True)], object()])
def test_base_not_an_optimizer(base):
    with pytest.raises(TypeError, match=r"base_optimizer must be a torch.optim.Optimizer"):
        ProtectedOptimizer(base)


def test_base_already_wrapped():
    _, opt = wrapper()
    with pytest.raises(TypeError, match=r"already a ProtectedOptimizer"):
        ProtectedOptimizer(opt)


@pytest.mark.parametrize("bad", [[("s", None)], "safety", 3])
def test_protected_grads_not_a_mapping(bad):
    model = make_model()
    with pytest.raises(TypeError, match=r"protected_grads must be a mapping"):
        ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), bad)


# ----------------------------------------------------------------------------- at step time


def test_sparse_training_gradient_at_step():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ProtectedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1))
    opt.protect("s", [torch.randn(10, 4)])
    idx = torch.tensor([1, 3, 3, 7])
    emb(idx).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match=r"parameter 0.*sparse"):
        opt.step()
    assert torch.equal(emb.weight, before), "a rejected step must not move the parameters"
    assert opt.gradsafe_steps == 0


def test_objective_no_longer_matching_parameters_at_step():
    model, opt = wrapper()
    opt.protect("s", samples_for(model))
    # replace a parameter with one of another shape behind the optimizer's back
    opt.param_groups[0]["params"][2] = nn.Parameter(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"'s'.*parameter 2.*\(2, 7\).*\(4, 7\)"):
        opt.step()


def _memory(obj):
    return [t.clone() for t in (obj.basis, obj.mean_ref, obj.fisher, obj.energies)]


NON_FINITE_CASES = {
    "project": dict(mode="project", rank=3),
    "project-tensor": dict(mode="project", rank=3, scope="tensor"),
    "soft": dict(mode="project", rank=3, strength=0.5),
    "conflict": dict(mode="conflict"),
    "damping": dict(mode="project", rank=2, damping=1.0),
    "observe": dict(mode="observe"),
}


@pytest.mark.parametrize("space", ["grad", "update"])
@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_gradient_never_touches_memory(case, space, bad):
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), space=space)
    obj = opt.protect("s", samples_for(model, m=3), **NON_FINITE_CASES[case])
    opt.zero_grad()
    mse(model, make_batch(0)).backward()
    opt.step()  # one finite step first, so a plan and a record exist
    mem = _memory(obj)
    version = obj.version

    opt.zero_grad()
    mse(model, make_batch(1)).backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(mem, _memory(obj)))
    assert obj.version == version
    assert obj.num_samples == 3


@pytest.mark.parametrize("space", ["grad", "update"])
def test_non_finite_training_gradient_conflict_samples_clear_behaviour(space):
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), space=space)
    obj = opt.protect("s", samples_for(model, m=3), mode="conflict", references="samples")
    mem = _memory(obj)
    opt.zero_grad()
    mse(model, make_batch(1)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    try:
        opt.step()
    except Exception as e:  # acceptable only if the message says what is wrong
        assert re.search(r"non-finite|nan|inf", str(e), re.I), f"obscure error: {e!r}"
    finally:
        assert all(torch.equal(a, b) for a, b in zip(mem, _memory(obj)))
