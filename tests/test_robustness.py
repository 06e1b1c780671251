"""Nothing silent, nothing surprising: the optimizer's answers to bad inputs and faults.

A test whose docstring names a case failed on main at 8285a62 (checked by running this file
against that commit); the others guard what must keep holding.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gradsafe import ProtectedOptimizer


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def _samples(model: nn.Module, m: int = 3, scale: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(m)]


# ----------------------------------------------------------------------------- memory overflow
@pytest.mark.parametrize("mode", ["project", "conflict", "observe"])
def test_samples_whose_square_overflows_are_refused(mode):
    """Samples of 1e20 passed the finiteness check; the squared Fisher was inf and with
    damping the parameters were NaN after one step."""
    model = _linear()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), damping=1.0)
    with pytest.raises(ValueError, match=r"objective 'big': the Fisher diagonal overflowed float32.*scale the protected loss down"):
        opt.protect("big", _samples(model, scale=1e20), mode=mode)
    assert "big" not in opt.objectives
    opt.protect("fine", _samples(model, scale=1e15), mode=mode)  # squares below float32's max


# ----------------------------------------------------------------------------- closures
def test_closure_that_calls_backward_is_caught_and_grad_untouched():
    """It failed with torch's 'backward through the graph a second time' after .grad changed."""
    model = _linear()
    x = torch.randn(8, 4)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]

    def wrong():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"the closure of 'safety' called backward\(\).*return loss"):
        opt.protect("safety", closure=wrong)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert not opt.objectives


@pytest.mark.parametrize("make_loss", ["detach", "no_grad", "constant"])
def test_closure_whose_loss_does_not_depend_on_the_parameters(make_loss):
    """It failed with 'element 0 of tensors does not require grad'."""
    model = _linear()
    x = torch.randn(8, 4)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure():
        if make_loss == "detach":
            return model(x).sum().detach()
        if make_loss == "constant":
            return torch.tensor(1.0)
        with torch.no_grad():
            return model(x).sum()

    with pytest.raises(ValueError, match="does not depend on the parameters"):
        opt.protect("safety", closure=closure)


# ----------------------------------------------------------------------------- base optimizers, devices
def test_closure_driven_base_optimizer_is_refused_at_construction():
    """ProtectedOptimizer(LBFGS(...)).step(closure) raised a TypeError deep in the step."""
    model = _linear()
    with pytest.raises(TypeError, match=r"LBFGS.step requires a closure.*steps from .grad"):
        ProtectedOptimizer(torch.optim.LBFGS(model.parameters()))


def test_meta_device_is_a_clear_error_at_protect():
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="meta device"):
        opt.protect("a", [[torch.randn(2, 4), torch.randn(2)]])
    with pytest.raises(ValueError, match="meta device"):
        opt.protect("b", [[torch.randn(2, 4, device="meta"), None]])


# ----------------------------------------------------------------------------- report
def test_report_before_the_first_step_says_why():
    """opt.report['safety'] before a step was a bare KeyError."""
    model = _linear()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"safety": _samples(model)})
    assert opt.report == {}
    with pytest.raises(KeyError, match="no report for objective 'safety' yet"):
        opt.report["safety"]
    with pytest.raises(KeyError, match="no protected objective named 'other'"):
        opt.report["other"]
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert set(opt.report) == {"safety"}
    opt.protect("late", _samples(model, seed=5))
    with pytest.raises(KeyError, match="no report for objective 'late' yet"):
        opt.report["late"]


# ----------------------------------------------------------------------------- threads
def test_concurrent_wrappers_leave_the_blas_thread_count_as_it_was():
    """After four threads each stepped their own wrapper, OpenBLAS stayed at 1 thread."""
    code = textwrap.dedent(
        """
        import threading
        import threadpoolctl
        import torch
        import gradsafe

        def blas():
            return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

        before = blas()

        def work(seed):
            torch.manual_seed(seed)
            model = torch.nn.Linear(8, 4)
            ps = list(model.parameters())
            samples = [[torch.randn_like(p) for p in ps] for _ in range(3)]
            opt = gradsafe.ProtectedOptimizer(torch.optim.SGD(ps, lr=0.1), {"a": samples},
                                              mode="conflict", references="samples")
            for _ in range(200):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(before == blas(), before, blas())
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "True", res.stdout


def test_single_threaded_blas_limits_a_single_threaded_loop_and_restores():
    code = textwrap.dedent(
        """
        import threadpoolctl
        from gradsafe.numerics import single_threaded_blas

        def blas():
            return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

        threadpoolctl.threadpool_limits(limits=2, user_api="blas")
        before = blas()
        with single_threaded_blas():
            with single_threaded_blas():  # nested
                inside = blas()
            still = blas()
        print(before == blas() == [2] * len(before), inside == still == [1] * len(before), len(before) > 0)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "True"]


def test_state_dict_while_another_thread_protects():
    """state_dict() while another thread called protect raised 'dictionary changed size during iteration'."""
    import threading

    model = _linear()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for i in range(20):
        opt.protect(f"base{i}", _samples(model, m=1, seed=i))
    errors: list[BaseException] = []
    done = threading.Event()

    def churn():
        try:
            for i in range(300):
                opt.protect(f"t{i}", _samples(model, m=1, seed=100 + i))
                if i % 2:
                    opt.unprotect(f"t{i - 1}")
        except BaseException as exc:  # pragma: no cover - the failure is the point
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=churn)
    thread.start()
    saved = 0
    while not done.is_set():
        state = opt.state_dict()
        assert all(name in state["gradsafe"]["objectives"] for name in (f"base{i}" for i in range(20)))
        saved += 1
    thread.join()
    assert not errors, errors
    assert saved > 0
    live = opt.objectives
    opt.protect("after", _samples(model, m=1, seed=999))
    assert "after" in live  # opt.objectives is a live view


# ----------------------------------------------------------------------------- report shares
@pytest.mark.parametrize("per_tensor", [False, True])
def test_every_share_in_the_report_lies_in_0_1(per_tensor):
    """energy_removed came out > 1 for an objective over p1 only, when another objective over
    p0 and p1 moved p1 more than p1's own gradient energy (a joint change read per objective)."""
    p0, p1 = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    opt = ProtectedOptimizer(torch.optim.SGD([p0, p1], lr=0.1), per_tensor=per_tensor)
    opt.protect("A", [torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 0])], mode="conflict")
    opt.protect("B", [None, torch.tensor([0.0, 1.0])], mode="observe")
    p0.grad = torch.tensor([-1.0, 0.3, 0, 0])
    p1.grad = torch.tensor([0.01, 0.02])
    opt.step()
    rep = opt.report
    for name, stats in rep.items():
        for key, value in stats.items():
            if key.startswith(("energy_removed", "energy_in_subspace")):
                assert 0.0 <= value <= 1.0 + 1e-9, (name, key, value)
    # the joint share is |h - x|^2 / |h|^2 over everything the step covers, the same for both
    h = torch.tensor([-1.0, 0.3, 0, 0, 0.01, 0.02])
    r = torch.tensor([1.0, 0, 0, 0, 1.0, 0])
    removed = float((h @ r) ** 2 / (r @ r)) / float(h @ h)
    assert rep["A"]["energy_removed"] == pytest.approx(removed, rel=1e-5)
    assert rep["B"]["energy_removed"] == pytest.approx(removed, rel=1e-5)
    if per_tensor:
        assert rep["A"]["energy_removed/0"] + rep["A"]["energy_removed/1"] == pytest.approx(removed, rel=1e-5)


# ----------------------------------------------------------------------------- non-finite gradients
NONFINITE_CASES = [
    dict(mode="project"),
    dict(mode="conflict"),
    dict(mode="conflict", references="samples"),  # GEM
    dict(mode="project", scope="tensor"),
    dict(mode="project", damping=1.0),
    dict(mode="project", scope="factored"),
    dict(mode="conflict", scope="factored"),
    dict(mode="project", space="update"),
]


def _nan_step(base: str, nonfinite: str = "pass", backend: str = "torch", **kw):
    space = kw.pop("space", "grad")
    model = _linear()
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1)}[base]
    opt = ProtectedOptimizer(make(model.parameters()), space=space, nonfinite=nonfinite, backend=backend)
    opt.protect("old", _samples(model), **kw)
    torch.manual_seed(3)
    model(torch.randn(5, 4)).square().sum().backward()
    model.weight.grad[0, 0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    return model, opt, grads, before


def _plain_step(base: str, grads, before):
    """What the base optimizer alone does with the same gradient."""
    params = [nn.Parameter(b.clone()) for b in before]
    opt = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1)}[base](params)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return params


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kw", NONFINITE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_one_nan_spreads_no_further_than_without_gradsafe(base, kw):
    """One NaN in weight.grad[0, 0] made every parameter entry NaN after step()."""
    model, opt, grads, before = _nan_step(base, **kw)
    with pytest.warns(RuntimeWarning, match=r"parameter\(s\) \[0\] is not finite.*surgery was left out"):
        opt.step()
    plain = _plain_step(base, grads, before)
    for p, q in zip(model.parameters(), plain):
        assert torch.equal(torch.isnan(p), torch.isnan(q))  # the same entries, and only those
        assert torch.allclose(p.nan_to_num(0.0), q.nan_to_num(0.0), rtol=1e-6, atol=1e-7)
    assert int(torch.isnan(model.weight).sum()) <= 1
    assert opt.nonfinite_steps == 1 and opt.gradsafe_steps == 1
    assert opt.report["old"]["nonfinite_steps"] == 1.0
    if base != "sgd":
        return  # AdamW's moments of that entry stay NaN, as without gradsafe
    # a finite step afterwards is a normal step with the surgery on
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.weight.data.nan_to_num_(0.0)
    opt.step()
    assert opt.nonfinite_steps == 1 and opt.gradsafe_steps == 2


@pytest.mark.parametrize("space", ["grad", "update"])
def test_nonfinite_skip_leaves_everything_as_it_was(space):
    model, opt, grads, before = _nan_step("adamw", nonfinite="skip", mode="conflict", space=space)
    with pytest.warns(RuntimeWarning, match="the step was skipped"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad.nan_to_num(7.0), g.nan_to_num(7.0))
    assert opt.state == {} or all(not s for s in opt.state.values())  # AdamW never stepped
    assert opt.gradsafe_steps == 0 and opt.nonfinite_steps == 1


@pytest.mark.parametrize("space", ["grad", "update"])
def test_nonfinite_raise_names_the_parameter_and_steps_nothing(space):
    model, opt, _, before = _nan_step("sgd", nonfinite="raise", space=space)
    with pytest.raises(FloatingPointError, match=r"parameter\(s\) \[0\] is not finite"):
        with pytest.warns(RuntimeWarning):
            opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_nonfinite_is_validated():
    with pytest.raises(ValueError, match="unknown nonfinite"):
        ProtectedOptimizer(torch.optim.SGD(_linear().parameters(), lr=0.1), nonfinite="ignore")


def test_huge_finite_gradient_whose_square_overflows_is_passed_through():
    model, opt, grads, before = _nan_step("sgd", mode="conflict")
    model.weight.grad[0, 0] = 3e38  # finite, but |g|^2 overflows float32
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert bool(torch.isfinite(model.bias).all())
    assert int((~torch.isfinite(model.weight)).sum()) <= 1


@pytest.mark.parametrize("force_host_rule", [False, True])
def test_triton_backend_contains_a_nan(force_host_rule):
    """On CUDA the device rule decides without a synchronisation (weights zeroed on the
    device, the count added up there); here the kernels run under the interpreter on CPU."""
    from gradsafe.backends.triton_backend import TritonBackend

    model, opt, grads, before = _nan_step("sgd", backend=TritonBackend(force_host_rule=force_host_rule), mode="conflict")
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    plain = _plain_step("sgd", grads, before)
    for p, q in zip(model.parameters(), plain):
        assert torch.equal(torch.isnan(p), torch.isnan(q))
        assert torch.allclose(p.nan_to_num(0.0), q.nan_to_num(0.0), rtol=1e-6, atol=1e-7)
    assert opt.nonfinite_steps == 1
