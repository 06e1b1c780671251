"""The Triton kernels (``gradsafe.kernels``, the top-level kernels/ folder): shapes x dtypes
against the float64 reference and the torch backend, the coefficient and weight layouts,
determinism, the bf16 basis, the device rule (dual, degenerate references, non-finite
gradients), launch counts, and a compile of every variant for sm_90.

On CPU (CI) the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set
here, before ``gradsafe.kernels`` is first imported. With ``GRADSAFE_TRITON_NATIVE=1`` (set
by benchmarks/gpu_check.sh) the same tests run the compiled kernels on CUDA tensors; a few
tests are for that mode only (they need CUDA) and skip without it. Sizes stay small: the
interpreter runs about a millisecond per operation. Helpers: tests/_triton_helpers.py.
"""

from __future__ import annotations

import os

NATIVE = os.environ.get("GRADSAFE_TRITON_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _reference import reference_grads, step_capture  # noqa: E402
from _triton_helpers import (  # noqa: E402
    DEVICE,
    LOWP_TOL,
    SMALL,
    _CpuView,
    _problem,
    check,
    make_opt,
    rand_grads,
    rand_samples,
    rel,
)
from gradsafe import ProtectedOptimizer  # noqa: E402
from gradsafe import kernels  # noqa: E402
from gradsafe.backends import TorchBackend  # noqa: E402
from gradsafe.backends.triton_backend import TritonBackend  # noqa: E402
from gradsafe.kernels import KernelConfig  # noqa: E402

if NATIVE and not torch.cuda.is_available():
    pytest.skip("GRADSAFE_TRITON_NATIVE=1 needs a CUDA device", allow_module_level=True)


# ---------------------------------------------------------------------------- the interpreter is the Triton code
def test_kernels_are_triton_kernels_in_this_mode():
    from triton.runtime.interpreter import InterpretedFunction

    assert kernels.INTERPRETED is (not NATIVE)
    for k in (kernels.reduce.reduce_kernel, kernels.finalize.finalize_kernel, kernels.apply.apply_kernel):
        assert isinstance(k, InterpretedFunction) is (not NATIVE)


# ---------------------------------------------------------------------------- shapes and dtypes
# one tensor of one element; odd sizes within a tile; several tiles with a tail (SMALL: 1024)
GRID_SHAPES = {"one": [(1,)], "odd": [(7,), (3, 5)], "tiles": [(4097,), (33, 65)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shapes", list(GRID_SHAPES.values()), ids=list(GRID_SHAPES))
def test_shape_dtype_parity_with_reference(shapes, dtype):
    """Each shape set x gradient dtype: hard projection (global, damped) and a conflict
    reference per tensor, against the float64 reference and the torch backend."""
    gen = torch.Generator().manual_seed(50)

    def build(backend):
        g = torch.Generator().manual_seed(51)
        opt = make_opt(shapes, backend=backend, dtype=dtype, gen=g)
        opt.protect("a", rand_samples(opt, 3, g), mode="project", rank=3, damping=0.5)
        opt.protect("c", rand_samples(opt, 1, g), mode="conflict", scope="tensor")
        return opt

    _, _, actual, _, _ = check(build, lambda o: rand_grads(o, gen), backend=TritonBackend(config=SMALL), min_change=0.01)
    assert all(a.dtype == dtype for a in actual)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_awkward_sizes_several_tiles_unaligned(scope):
    """Sizes 1, 7, 4097 with 1024-element tiles; one gradient a misaligned contiguous view."""
    gen = torch.Generator().manual_seed(5)

    def grads_fn(opt):
        grads = rand_grads(opt, gen)
        buf = torch.zeros(4097 + 1, device=DEVICE)
        view = buf[1:]  # contiguous, 4 bytes off a 16-byte boundary
        view.copy_(grads[2])
        grads[2] = view
        return grads

    def build(backend):
        g = torch.Generator().manual_seed(15)
        opt = make_opt([(1,), (7,), (4097,), (1, 1)], backend=backend, gen=g)
        opt.protect("a", rand_samples(opt, 3, g), mode="project", scope=scope, rank=3, damping=0.5)
        opt.protect("c", rand_samples(opt, 1, g), mode="conflict", scope=scope)
        return opt

    check(build, grads_fn, backend=TritonBackend(config=SMALL), min_change=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype):
    gen = torch.Generator().manual_seed(6)

    def build(backend):
        g = torch.Generator().manual_seed(16)
        opt = make_opt([(5, 3), (7,), (1,), (129,)], backend=backend, dtype=dtype, gen=g)
        opt.protect("a", rand_samples(opt, 3, g, cover=[0, 3]), mode="project", strength=0.5)
        opt.protect("b", rand_samples(opt, 2, g), mode="project", scope="tensor", damping=1.0)
        return opt

    _, _, actual, _, _ = check(build, lambda o: rand_grads(o, gen), min_change=0.05, torch_tol=1e-2)
    assert all(a.dtype == dtype for a in actual)


def test_mixed_dtypes_one_reduce_and_apply_per_dtype():
    gen = torch.Generator().manual_seed(7)
    params = [
        nn.Parameter(torch.randn(6, generator=gen).to(DEVICE)),
        nn.Parameter(torch.randn(9, generator=gen).to(torch.bfloat16).to(DEVICE)),
        nn.Parameter(torch.randn(4, generator=gen).to(torch.float16).to(DEVICE)),
    ]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), backend=TritonBackend())
    opt.protect("a", rand_samples(opt, 3, gen), mode="project")
    grads = rand_grads(opt, gen)
    kernels.launches.reset()
    actual = step_capture(opt, grads)
    assert kernels.launches.by_kernel == {"reduce": 3, "finalize": 1, "apply": 3}
    expected = reference_grads(_CpuView(opt), [g.cpu() for g in grads])
    assert rel(actual, expected, grads, [p.detach().cpu() for p in params]) <= LOWP_TOL


# ---------------------------------------------------------------------------- coefficients, determinism, bf16 basis
# a deliberately tiny geometry: 17 tiles in the 4097-element tensor, sums over several steps
# of 2 partials, rule matrix products over several chunks of 2 columns
TINY = KernelConfig(chunk=256, tile_elems=256, sum_block=2, finalize_tile=32, col_block=2)


@pytest.mark.parametrize("config", [SMALL, TINY], ids=["small", "tiny"])
def test_coefficients_and_weights_match_torch_backend_layouts(config):
    gen = torch.Generator().manual_seed(21)
    plan, grads = _problem(gen)
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    be = TritonBackend(config=config)
    lay = be.layout(plan)
    if config is TINY:
        assert lay.jb == 2 and max(lay.ntiles) == 17 and lay.n_inst == 1
    rec_t = be.run(plan, a)
    rec_r = TorchBackend().run(plan, b)
    assert isinstance(rec_t.coefs, torch.Tensor) and rec_t.coefs.device.type == DEVICE.type
    ct, wt = rec_t.host()
    cr, wr = rec_r.host()
    assert ct.shape == cr.shape and wt.shape == wr.shape
    np.testing.assert_allclose(ct, cr, rtol=1e-5, atol=1e-5 * np.abs(cr).max())
    np.testing.assert_allclose(wt, wr, rtol=1e-5, atol=1e-6 * np.abs(wr).max())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_deterministic_bits():
    gen = torch.Generator().manual_seed(22)
    plan, grads = _problem(gen, scope="tensor")
    outs = []
    for _ in range(2):
        g = [x.clone() for x in grads]
        rec = TritonBackend(config=SMALL).run(plan, g)
        outs.append((g, rec.coefs.clone(), rec.weights.clone()))
    (g1, c1, w1), (g2, c2, w2) = outs
    assert torch.equal(c1, c2) and torch.equal(w1, w2)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_bf16_basis_result_orthogonal_to_stored_basis(scope):
    gen = torch.Generator().manual_seed(23)
    plan, grads = _problem(gen, scope=scope, k=6)
    be = TritonBackend(basis_dtype=torch.bfloat16, config=SMALL)
    g = [x.clone() for x in grads]
    be.run(plan, g)
    blk = plan.blocks[0]
    stored = blk.rows[: blk.n_basis].to(torch.bfloat16).double()
    x = torch.cat([t.reshape(-1) for t in g]).double()
    h = torch.cat([t.reshape(-1) for t in grads]).double()
    if scope == "global":
        leak = float((stored @ x).norm() / h.norm())
        leak32 = float((blk.rows[: blk.n_basis].double() @ x).norm() / h.norm())
    else:
        leak = max(float((stored[:, sl] @ x[sl]).norm()) for sl in blk.slices) / float(h.norm())
        leak32 = max(float((blk.rows[: blk.n_basis, sl].double() @ x[sl]).norm()) for sl in blk.slices) / float(h.norm())
    assert leak <= 1e-4, leak
    assert leak32 > leak  # it is the stored (rounded) basis the result is orthogonal to
    # and the result is the fp32-basis result up to bf16 rounding of the basis
    g32 = [t.clone() for t in grads]
    TritonBackend(config=SMALL).run(plan, g32)
    x32 = torch.cat([t.reshape(-1) for t in g32]).double()
    assert float((x - x32).norm() / h.norm()) <= 2e-2


# ---------------------------------------------------------------------------- the device rule
def _gem_plan(gen, m, refs_scale=1.0, dependent=False, with_basis=True):
    from gradsafe.objective import ProtectedObjective
    from gradsafe.options import ObjectiveConfig
    from gradsafe.plan import build_plan

    n = 64
    params = [torch.randn(n, generator=gen).to(DEVICE)]
    objs = []
    if with_basis:
        p = ProtectedObjective("p", ObjectiveConfig(rank=3), [0], [params[0].shape])
        p.add_samples(torch.randn(3, n, generator=gen).to(DEVICE))
        objs.append(p)
    c = ProtectedObjective("c", ObjectiveConfig(mode="conflict", references="samples", rank=m), [0], [params[0].shape])
    S = torch.randn(m, n, generator=gen)
    if dependent:  # the last reference a combination of two others
        S[-1] = 0.5 * S[0] + 0.5 * S[1]
    c.add_samples((refs_scale * S).to(DEVICE))
    objs.append(c)
    return build_plan(objs, params), params


@pytest.mark.parametrize("m,dependent", [(2, False), (5, False), (8, False), (4, True)])
def test_device_dual_matches_exact_host_solver(m, dependent):
    """The device's sweeps + active-set polish reach the host's exact active-set solution.

    The host rule is solved on the kernels' own coefficients, so the comparison isolates the
    device rule (float64 on both sides). Tolerance: the change ``rows^T w`` it makes within
    1e-9 relative of the host's, with at least two active constraints (measured ~1e-15:
    the polish is exact once the sweeps have found the active set), and, when the references
    are independent (unique multipliers), the weights themselves. With dependent references
    the multipliers are not unique (H has a null space), the float32-measured q has a small
    component in that null space (the host projects it out with an eigendecomposition), the
    exact solve is rejected and the device keeps its sweeps' iterate: the change is then
    within 1e-6 relative (measured <= 5e-8, far below float32 rounding of the result), the
    weights a different point of the solution set (up to 0.25 apart).
    """
    worst = 0.0
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        plan, _ = _gem_plan(gen, m, dependent=dependent)
        c = plan.blocks[-1]
        # a gradient that conflicts with several references
        g = [(-0.6 * c.rows[1:].sum(0) + 0.3 * torch.randn(64, generator=gen).to(DEVICE)).clone()]
        a, b = [g[0].clone()], [g[0].clone()]
        rt = TritonBackend().run(plan, a)
        TorchBackend().run(plan, b)
        ct, wt = rt.host()
        wh = plan.rule.solve(ct)
        lam = wh[c.coef_offset + 1 : c.coef_offset + c.num_rows]
        assert int((lam > 0).sum()) >= 2
        dt, dh = _change(plan, wt), _change(plan, wh)
        worst = max(worst, float((dt - dh).norm() / dh.norm()))
        if not dependent:
            np.testing.assert_allclose(wt, wh, rtol=1e-9, atol=1e-9 * np.abs(wh).max())
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert worst <= (1e-6 if dependent else 1e-9), worst


def _change(plan, w):
    """sum over blocks and tensors of rows_t^T w_t, float64, the flat change the weights make."""
    n = sum(sl.stop - sl.start for sl in (t[0][1] for t in plan.touching))
    offs = np.concatenate([[0], np.cumsum([t[0][1].stop - t[0][1].start for t in plan.touching])])
    out = torch.zeros(n, dtype=torch.float64)
    for b in plan.blocks:
        W = torch.from_numpy(w[b.coef_offset : b.coef_offset + b.coef_numel].reshape(b.num_tensors, b.num_rows))
        for t, (p, sl) in enumerate(zip(b.positions, b.slices)):
            out[offs[p] : offs[p + 1]] += b.rows[:, sl].double().cpu().T @ W[t]
    return out


def test_degenerate_reference_inside_projected_subspace_gets_zero_weight():
    from gradsafe.objective import ProtectedObjective
    from gradsafe.options import ObjectiveConfig
    from gradsafe.plan import build_plan

    gen = torch.Generator().manual_seed(31)
    n = 40
    params = [torch.randn(n, generator=gen).to(DEVICE)]
    p = ProtectedObjective("p", ObjectiveConfig(rank=2), [0], [params[0].shape])
    S = torch.randn(2, n, generator=gen).to(DEVICE)
    p.add_samples(S)
    c = ProtectedObjective("c", ObjectiveConfig(mode="conflict"), [0], [params[0].shape])
    c.add_samples((S[:1] * -1.0))  # the reference lies in the hard-projected subspace
    plan = build_plan([p, c], params)
    g = [S[0].clone() * 3 + 0.1 * torch.randn(n, generator=gen).to(DEVICE)]
    a, b = [g[0].clone()], [g[0].clone()]
    rt = TritonBackend().run(plan, a)
    TorchBackend().run(plan, b)
    wt = rt.host()[1]
    cb = plan.blocks[1]
    assert wt[cb.coef_offset + cb.mean_row()] == 0.0
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)


def test_non_finite_gradient_passes_through():
    gen = torch.Generator().manual_seed(32)
    plan, grads = _problem(gen)
    grads[0][3] = float("nan")
    a = [x.clone() for x in grads]
    TritonBackend(config=SMALL).run(plan, a)
    assert bool(torch.isnan(a[0]).any())


# ---------------------------------------------------------------------------- compiled for a GPU (no GPU needed)
def test_kernels_compile_for_sm90_with_vectorised_loads():
    """The interpreter does not type-check like the compiler: compile every kernel variant for
    sm_90 (Triton ships ptxas) in a subprocess without TRITON_INTERPRET, and check that the
    reduce and apply passes load 16 bytes at a time on their aligned paths."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    code = "import json; from gradsafe.kernels.compile_check import compile_variants; print(json.dumps(compile_variants(90)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(kernels_variants())
    for res in results:
        assert res["cubin_bytes"] > 0, res
        if res["kernel"] != "finalize_kernel":
            assert res["v4_loads"] >= 2, res


def kernels_variants():
    from gradsafe.kernels.compile_check import VARIANTS

    return VARIANTS


# ---------------------------------------------------------------------------- native only (run by benchmarks/gpu_check.sh)
@pytest.mark.skipif(not NATIVE, reason="needs CUDA: the no-synchronisation check is for the compiled kernels")
def test_native_step_does_not_synchronise():
    gen = torch.Generator().manual_seed(40)
    plan, grads = _problem(gen, k=8, sizes=(100_000, 3, 70_000))
    be = TritonBackend()
    be.run(plan, [g.clone() for g in grads])  # build the layout and compile first
    g = [x.clone() for x in grads]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.launches.reset()
        be.run(plan, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kernels.launches.total <= 4
