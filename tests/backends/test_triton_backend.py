"""The Triton backend (``TritonBackend``) against the reference operators and the torch backend.

Each parity test builds parameters, a ``ProtectedOptimizer(SGD(lr=1))`` with objectives from
random samples, steps once with the Triton backend and once with the torch backend on the
same gradients, and compares what the base optimizer received with the float64 reference
``joint_surgery`` (tests/_reference.py) and with the torch backend: every mode and scope,
mixtures, the copy path, ``space="update"``, the host-rule fallback, and that a step runs
the kernels. The kernels' own tests (shapes x dtypes, layouts, the device rule, the compile
check) are in tests/kernels/test_kernels.py; the helpers in tests/_triton_helpers.py.

On CPU (CI) the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set
here, before ``gradsafe.kernels`` is first imported. With ``GRADSAFE_TRITON_NATIVE=1`` (set
by benchmarks/gpu_check.sh) the same tests run the compiled kernels on CUDA tensors; a few
tests are for that mode only (they need CUDA) and skip without it.
"""

from __future__ import annotations

import os

NATIVE = os.environ.get("GRADSAFE_TRITON_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _reference import all_params, constraint_rows, flatten, reference_flat, step_capture  # noqa: E402
from _triton_helpers import (  # noqa: E402
    DEVICE,
    FP32_TOL,
    LOWP_TOL,
    SHAPES,
    SMALL,
    _CpuView,
    _problem,
    check,
    make_opt,
    rand_grads,
    rand_samples,
)
from gradsafe import ProtectedOptimizer  # noqa: E402
from gradsafe import kernels  # noqa: E402
from gradsafe.backends import TorchBackend, get_backend  # noqa: E402
from gradsafe.backends.triton_backend import TritonBackend  # noqa: E402
from gradsafe.kernels import KernelConfig  # noqa: E402

if NATIVE and not torch.cuda.is_available():
    pytest.skip("GRADSAFE_TRITON_NATIVE=1 needs a CUDA device", allow_module_level=True)


# ---------------------------------------------------------------------------- a step runs the kernels
def test_step_runs_the_kernels_not_the_torch_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the torch backend ran")

    monkeypatch.setattr(TorchBackend, "run", boom)
    monkeypatch.setattr("gradsafe.rule.HostRule.solve", boom)
    gen = torch.Generator().manual_seed(0)
    opt = make_opt(SHAPES, backend=TritonBackend(), gen=gen)
    opt.protect("p", rand_samples(opt, 3, gen), mode="project")
    opt.protect("c", rand_samples(opt, 2, gen), mode="conflict", scope="tensor")
    kernels.launches.reset()
    step_capture(opt, rand_grads(opt, gen))
    assert kernels.launches.by_kernel == {"reduce": 1, "finalize": 1, "apply": 1}
    assert not opt._backend.last_host_rule


# ---------------------------------------------------------------------------- parity: modes and scopes
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_project(scope):
    gen = torch.Generator().manual_seed(1)

    def build(backend):
        g = torch.Generator().manual_seed(11)
        opt = make_opt(SHAPES, backend=backend, gen=g)
        opt.protect("a", rand_samples(opt, 4, g), mode="project", scope=scope, rank=3)
        return opt

    check(build, lambda o: rand_grads(o, gen), min_change=0.05)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_conflict_mean_active(scope):
    def build(backend):
        g = torch.Generator().manual_seed(12)
        opt = make_opt(SHAPES, backend=backend, gen=g)
        grads = rand_grads(opt, g)
        opt._test_grads = grads
        samples = [[-x + 0.3 * torch.randn(x.shape, generator=g).to(DEVICE) for x in grads] for _ in range(3)]
        opt.protect("c", samples, mode="conflict", scope=scope)
        return opt

    opt, _, actual, _, grads = check(build, lambda o: o._test_grads, min_change=0.05)
    assert opt.report["c"]["conflict"] == 1.0


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_gem_several_active_constraints(scope):
    def build(backend):
        g = torch.Generator().manual_seed(13)
        opt = make_opt([(6, 5), (11,), (3, 4)], backend=backend, gen=g)
        grads = rand_grads(opt, g)
        opt._test_grads = grads
        samples = [[-0.4 * x + 0.8 * torch.randn(x.shape, generator=g).to(DEVICE) for x in grads] for _ in range(4)]
        opt.protect("gem", samples, mode="conflict", scope=scope, references="samples", rank=8)
        return opt

    opt, _, actual, _, grads = check(build, lambda o: o._test_grads, min_change=0.05)
    # several constraints are active at the solution, and the device solution satisfies them all
    params = [p.detach().cpu() for p in all_params(opt)]
    x, _ = reference_flat(_CpuView(opt), [g.cpu() for g in grads])
    R = constraint_rows(_CpuView(opt))[0]
    slack = (R @ x) / (R.norm(dim=1) * x.norm())
    assert int((slack.abs() < 1e-9).sum()) >= 2
    xa = flatten([a.cpu() for a in actual], params)
    assert float(((R @ xa) / (R.norm(dim=1) * xa.norm())).min()) >= -1e-5


def test_observe_leaves_gradient_bitwise_and_reports():
    gen = torch.Generator().manual_seed(3)
    opt = make_opt(SHAPES, backend=TritonBackend(), gen=gen)
    opt.protect("o", rand_samples(opt, 3, gen), mode="observe")
    grads = rand_grads(opt, gen)
    kernels.launches.reset()
    actual = step_capture(opt, grads)
    for a, g in zip(actual, grads):
        assert torch.equal(a, g)
    assert "apply" not in kernels.launches.by_kernel  # nothing changes: no apply launch
    assert opt.report["o"]["energy_removed"] == 0.0


def test_mixture_soft_hard_conflict_damping_many_tensors_groups():
    """60 small tensors in 3 groups; global + tensor scopes, soft + hard, conflict, damping."""
    shapes = [((i % 5) + 1,) if i % 3 else ((i % 4) + 1, 2) for i in range(60)]
    gen = torch.Generator().manual_seed(4)

    def build(backend):
        g = torch.Generator().manual_seed(14)
        opt = make_opt(shapes, backend=backend, groups=3, gen=g)
        opt.protect("p", rand_samples(opt, 3, g, cover=range(0, 60, 2)), mode="project", scope="tensor")
        opt.protect("q", rand_samples(opt, 2, g, cover=range(1, 45)), mode="project", strength=0.5, damping=0.5)
        opt.protect("c", rand_samples(opt, 2, g, cover=range(30, 60)), mode="conflict", scope="tensor")
        opt.protect("d", rand_samples(opt, 2, g, cover=range(50, 60)), mode="observe", damping=2.0)
        return opt

    opt_t, opt_r, *_ = check(build, lambda o: rand_grads(o, gen), min_change=0.05)
    # the report is computed from the kernels' coefficients and weights: same as torch's
    for name, rep in opt_r.report.items():
        for key, v in rep.items():
            assert opt_t.report[name][key] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, key)


# ---------------------------------------------------------------------------- the copy path, space="update"
def test_non_contiguous_and_float64_gradients_copy_path():
    gen = torch.Generator().manual_seed(8)

    def grads_fn(opt):
        return [
            torch.randn(5, 3, generator=gen).to(DEVICE).t(),
            torch.randn(7, generator=gen).to(DEVICE),
            torch.randn(4, 3, 2, generator=gen).to(DEVICE).permute(2, 1, 0),
            torch.randn(4, 12, generator=gen).to(DEVICE)[:, ::2],
        ]

    def build(backend):
        g = torch.Generator().manual_seed(18)
        opt = make_opt([(3, 5), (7,), (2, 3, 4), (4, 6)], backend=backend, gen=g)
        opt.protect("a", rand_samples(opt, 3, g), mode="project")
        opt.protect("b", rand_samples(opt, 2, g, cover=[0, 2]), mode="project", scope="tensor", damping=1.0)
        return opt

    check(build, grads_fn, min_change=0.05)
    # a float64 tensor is worked on in float32 and written back, strides kept
    gen2 = torch.Generator().manual_seed(9)
    opt = build(TritonBackend())
    plan = opt._current_plan(all_params(opt))
    g64 = [torch.randn(p.shape, generator=gen2, dtype=torch.float64).to(DEVICE).transpose(0, -1) if p.dim() > 1
           else torch.randn(p.shape, generator=gen2, dtype=torch.float64).to(DEVICE) for p in all_params(opt)]
    g64 = [g.transpose(0, -1) if g.dim() > 1 else g for g in g64]  # back to the parameter's shape, strided
    ref = [g.clone().float() for g in g64]
    strides = [g.stride() for g in g64]
    TritonBackend().run(plan, g64)
    TorchBackend().run(plan, ref)
    for a, b, s in zip(g64, ref, strides):
        assert a.dtype == torch.float64 and a.stride() == s
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["observe", "conflict"])
def test_float64_zero_weight_step_is_bit_exact(mode):
    # a float64 gradient keeps its float64 bits where the step changes nothing (here: all of it)
    gen = torch.Generator().manual_seed(11)
    opt = make_opt([(3, 5), (7,), (2, 3, 4)], backend=TritonBackend(), gen=gen)
    params = all_params(opt)
    g64 = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE) for p in params]
    # references aligned with the gradient: the constraint is inactive, its weight 0
    opt.protect("c", [[g.float() + 0.3 * torch.randn(g.shape, generator=gen).to(DEVICE) for g in g64]
                      for _ in range(2)], mode=mode)
    plan = opt._current_plan(params)
    work = [g.clone() for g in g64]
    TritonBackend().run(plan, work)
    for a, g in zip(work, g64):
        assert a.dtype == torch.float64 and torch.equal(a, g)
    # a step that changes the gradient changes it by the float32 correction only
    opt2 = make_opt([(3, 5), (7,), (2, 3, 4)], backend=TritonBackend(), gen=gen)
    opt2.protect("p", rand_samples(opt2, 2, gen), mode="project", rank=2)
    plan2 = opt2._current_plan(all_params(opt2))
    work = [g.clone() for g in g64]
    twins = [g.float() for g in g64]
    TritonBackend().run(plan2, work)
    TorchBackend().run(plan2, twins)
    for a, g, t in zip(work, g64, twins):
        torch.testing.assert_close(a - g, (t - g.float()).double(), rtol=1e-4, atol=1e-5)


def test_space_update_with_adamw():
    gen = torch.Generator().manual_seed(10)

    def build(backend):
        g = torch.Generator().manual_seed(20)
        params = [nn.Parameter(torch.randn(s, generator=g).to(DEVICE)) for s in SHAPES]
        opt = ProtectedOptimizer(torch.optim.AdamW(params, lr=1e-2), backend=backend, space="update")
        opt.protect("a", rand_samples(opt, 3, g), mode="project", rank=3)
        opt.protect("c", rand_samples(opt, 2, g), mode="conflict", scope="tensor")
        return opt

    opt_t, opt_r = build(TritonBackend()), build("torch")
    for _ in range(2):
        grads = rand_grads(opt_t, gen)
        before = torch.cat([p.detach().reshape(-1).double() for p in all_params(opt_t)])
        for o in (opt_t, opt_r):
            for p, g in zip(all_params(o), grads):
                p.grad = g.clone()
            o.step()
        for a, b in zip(all_params(opt_t), all_params(opt_r)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        # the parameter change AdamW made, after surgery, is orthogonal to the protected basis
        delta = torch.cat([p.detach().reshape(-1).double() for p in all_params(opt_t)]) - before
        U = opt_t.objectives["a"].basis.double()
        assert float(delta.norm()) > 0
        assert float((U @ delta).norm() / delta.norm()) <= 1e-4


# ---------------------------------------------------------------------------- a live reference
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
def test_live_reference_refreshed_every_step_steps_like_the_torch_backend(basis_dtype):
    """A-GEM with a closure refreshed every step beside a project objective: on CPU tensors the
    refresh lends its gradient (``lent_rows``), which the kernels' stored rows take from the plan."""

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DEVICE)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(3)
        align = torch.Generator().manual_seed(4)  # a new alignment batch at every refresh
        opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), backend=backend)
        opt.protect("old", [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in params] for _ in range(2)],
                    mode="project", rank=2)
        opt.protect("live", closure=lambda: model(torch.randn(6, 5, generator=align).to(DEVICE)).pow(2).mean(),
                    mode="conflict", refresh_every=1)
        for _ in range(4):
            opt.zero_grad()
            (-model(torch.randn(6, 5, generator=gen).to(DEVICE)).pow(2).mean()).backward()
            opt.step()
        return opt, [p.detach().cpu() for p in params]

    tri, a = run(TritonBackend(basis_dtype=basis_dtype, config=SMALL))
    _, b = run(TorchBackend())
    assert tri.objectives["live"].rows_version == 3 and not tri._backend.last_host_rule
    assert (tri.objectives["live"].lent_rows is not None) == (DEVICE.type == "cpu")
    tol = FP32_TOL if basis_dtype == torch.float32 else LOWP_TOL
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- the host-rule fallback
def test_host_rule_fallback_when_a_component_is_too_big():
    gen = torch.Generator().manual_seed(24)
    plan, grads = _problem(gen, k=6)
    small = KernelConfig(chunk=1024, tile_elems=512, max_rule_columns=4)
    be = TritonBackend(config=small)
    lay = be.layout(plan)
    assert not lay.device_rule and "basis columns" in lay.host_reason
    a, b, c = ([x.clone() for x in grads] for _ in range(3))
    rec = be.run(plan, a)
    assert be.last_host_rule
    TorchBackend().run(plan, b)
    forced = TritonBackend(config=SMALL, force_host_rule=True)
    forced.run(plan, c)
    assert forced.last_host_rule
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, y, rtol=1e-5, atol=1e-5)
    assert rec.weights.shape[0] == plan.weight_numel


# ---------------------------------------------------------------------------- native only (run by benchmarks/gpu_check.sh)
@pytest.mark.skipif(not NATIVE, reason="needs CUDA")
def test_native_auto_backend_picks_triton_on_cuda():
    gen = torch.Generator().manual_seed(41)
    params = [nn.Parameter(torch.randn(50, generator=gen).to(DEVICE))]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), backend=None)
    opt.protect("a", [[torch.randn(50, generator=gen).to(DEVICE)]])
    params[0].grad = torch.randn(50, device=DEVICE)
    opt.step()
    assert opt._backend.last == "triton"


def test_get_backend_triton_gives_a_triton_backend():
    be = get_backend("triton")
    assert isinstance(be, TritonBackend) and be.basis_dtype == torch.float32
