"""What the Triton kernel and backend tests share: the optimizer twins, the comparison with
the float64 reference (tests/_reference.py), small problems and tile geometries.

Importing this module sets ``TRITON_INTERPRET=1`` (unless ``GRADSAFE_TRITON_NATIVE=1``) before
``gradsafe.kernels`` is first imported, as tests/conftest.py does.
"""

from __future__ import annotations

import os

NATIVE = os.environ.get("GRADSAFE_TRITON_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _reference import all_params, flatten, reference_grads, step_capture  # noqa: E402
from gradsafe import ProtectedOptimizer  # noqa: E402
from gradsafe.backends.triton_backend import TritonBackend  # noqa: E402
from gradsafe.kernels import KernelConfig  # noqa: E402

DEVICE = torch.device("cuda" if NATIVE else "cpu")
FP32_TOL = 2e-5
LOWP_TOL = 1e-2
# small tiles so that a 4097-element tensor spans several tiles (and the tail path runs)
SMALL = KernelConfig(chunk=1024, tile_elems=512)


# ---------------------------------------------------------------------------- helpers
def make_opt(shapes, *, backend, dtype=torch.float32, groups=1, gen=None, **defaults):
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in shapes]
    if groups == 1:
        base = torch.optim.SGD(params, lr=1.0)
    else:
        base = torch.optim.SGD([{"params": params[i::groups], "lr": 1.0} for i in range(groups)], lr=1.0)
    return ProtectedOptimizer(base, backend=backend, **defaults)


def rand_samples(opt, m, gen, cover=None):
    params = all_params(opt)
    cover = set(range(len(params))) if cover is None else set(cover)
    return [
        [torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE) if i in cover else None for i, p in enumerate(params)]
        for _ in range(m)
    ]


def rand_grads(opt, gen):
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE) for p in all_params(opt)]




def rel(actual, expected, grads, params):
    a, e = flatten([x.cpu() for x in actual], params), flatten([x.cpu() for x in expected], params)
    scale = flatten([g.cpu() for g in grads], params).norm().clamp_min(1e-30)
    return float((a - e).norm() / scale)


def twin(build, backend):
    """The same optimizer (same seeds) with the Triton backend and with the torch backend."""
    return build(backend), build("torch")


def check(build, grads_fn, *, backend=None, tol=None, min_change=None, torch_tol=None):
    """Step both twins on the same gradients; compare with the reference and with torch."""
    backend = backend if backend is not None else TritonBackend()
    opt_t, opt_r = twin(build, backend)
    grads = grads_fn(opt_t)
    params = all_params(opt_t)
    lowp = any(p.dtype != torch.float32 for p in params)
    tol = tol if tol is not None else (LOWP_TOL if lowp else FP32_TOL)
    actual = step_capture(opt_t, [g.clone() for g in grads])
    via_torch = step_capture(opt_r, [g.clone() for g in grads])
    cpu_params = [p.detach().cpu() for p in params]
    expected = reference_grads(_CpuView(opt_t), [g.cpu() for g in grads])
    for a, p in zip(actual, params):
        assert a.dtype == p.dtype and a.shape == p.shape and a.device == p.device
    err = rel(actual, expected, grads, cpu_params)
    assert err <= tol, f"vs reference: relative error {err:.3e} > {tol:.1e}"
    err_t = rel(actual, via_torch, grads, cpu_params)
    assert err_t <= (torch_tol if torch_tol is not None else tol), f"vs torch backend: {err_t:.3e}"
    if min_change is not None:
        change = rel(expected, [g.cpu() for g in grads], grads, cpu_params)
        assert change >= min_change, f"the reference changed the gradient by only {change:.3e}"
    return opt_t, opt_r, actual, expected, grads


class _CpuView:
    """What tests/_reference.py reads from an optimizer, on the host (for CUDA runs)."""

    def __init__(self, opt):
        self.param_groups = [{"params": [p.detach().cpu() for p in g["params"]]} for g in opt.param_groups]
        self.objectives = {name: _CpuObjective(o) for name, o in opt.objectives.items()}


class _CpuObjective:
    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        v = getattr(self._obj, name)
        return v.cpu() if isinstance(v, torch.Tensor) else v


SHAPES = [(5, 3), (7,), (1,), (4, 2, 3)]


def _problem(gen, scope="global", k=4, sizes=(300, 7, 1, 4097)):
    from gradsafe.objective import ProtectedObjective
    from gradsafe.options import ObjectiveConfig
    from gradsafe.plan import build_plan

    params = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    obj = ProtectedObjective("p", ObjectiveConfig(rank=k, scope=scope), range(len(sizes)), [p.shape for p in params])
    S = torch.randn(k + 2, sum(sizes), generator=gen).to(DEVICE)
    obj.add_samples(S)
    con = ProtectedObjective("c", ObjectiveConfig(mode="conflict", references="samples", rank=3), [0, 3],
                             [params[0].shape, params[3].shape])
    con.add_samples(-torch.randn(3, sizes[0] + sizes[3], generator=gen).to(DEVICE))
    plan = build_plan([obj, con], params)
    return plan, [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
