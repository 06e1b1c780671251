"""The torch backend's own paths: the column split over threads, and each gradient dtype.

- ``partition_columns`` covers every column once, cuts on aligned columns and balances cost;
- a step split over 2, 3 or 4 threads matches the one-thread step and the float64 reference
  (``joint_surgery``, tests/_reference.py) on random mixtures of objectives;
- float64 gradients keep their precision: a zero-weight step and the entries the rows do not
  touch come back bit-exact, the change is the float32 correction ``rows^T w`` and nothing
  else, and the result matches the float64 reference to ~1e-7 relative;
- float16 / bfloat16 gradients match the reference to their precision; non-contiguous
  float32 and float64 gradients give what their contiguous twins give, strides kept.

The split is exercised on small problems by lowering ``MIN_CHUNK_COLUMNS`` and ``CUT_ALIGN``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _reference import all_params, flatten, reference_flat, step_capture
from gradsafe import ProtectedOptimizer
from gradsafe.backends import torch_backend
from gradsafe.backends.torch_backend import TorchBackend, partition_columns
from gradsafe.memory import Memory, pack_rows
from gradsafe.objective import ProtectedObjective
from gradsafe.options import ObjectiveConfig
from gradsafe.plan import build_plan
from gradsafe.surgery import joint_surgery

SEEDS = [0, 1, 2]
FP32_TOL = 1e-5
LOWP_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------- the column split
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_partition_covers_every_column_once(seed, parts):
    gen = torch.Generator().manual_seed(seed)
    numels = [int(n) for n in torch.randint(0, 3000, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)]
    costs = [(n, float(c)) for n, c in zip(numels, torch.randint(1, 20, (len(numels),), generator=gen))]
    out = partition_columns(costs, parts, min_columns=100, align=16)
    assert 1 <= len(out) <= parts
    seen = [torch.zeros(n, dtype=torch.int64) for n in numels]
    flat_order = []
    for ranges in out:
        for t, lo, hi in ranges:
            assert 0 <= lo < hi <= numels[t]
            seen[t][lo:hi] += 1
            flat_order.append((t, lo))
            if lo > 0:  # a cut inside a tensor: aligned, not a sliver
                assert lo % 16 == 0 and lo >= 100
            if hi < numels[t]:
                assert hi % 16 == 0 and numels[t] - hi >= 100
    assert all(bool((s == 1).all()) for s in seen)
    assert flat_order == sorted(flat_order)  # parts are contiguous runs in tensor order


def test_partition_balances_cost():
    # one big tensor and a few small ones: the parts' costs are within an aligned cut of equal
    costs = [(1_000_000, 9.0), (5000, 9.0), (3000, 20.0), (250_000, 1.0)]
    total = sum(n * c for n, c in costs)
    for parts in (2, 3, 4):
        out = partition_columns(costs, parts, min_columns=4096, align=1024)
        assert len(out) == parts
        part_costs = [sum((hi - lo) * costs[t][1] for t, lo, hi in r) for r in out]
        assert max(part_costs) - min(part_costs) <= 2 * 5000 * 9.0 + 3000 * 20.0 + 2 * 1024 * 9.0
        assert sum(part_costs) == total


# ---------------------------------------------------------------------------- helpers
def make_opt(shapes, *, dtype=torch.float32, gen=None, backend=None, **defaults):
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    base = torch.optim.SGD(params, lr=1.0)
    return ProtectedOptimizer(base, backend=backend or TorchBackend(), **defaults)


def rand_samples(opt, m, gen, cover=None):
    params = all_params(opt)
    cover = set(range(len(params))) if cover is None else set(cover)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) if i in cover else None for i, p in enumerate(params)]
            for _ in range(m)]


def rand_grads(opt, gen):
    """Random gradients; float64 ones use all of float64's bits (not float32 values widened)."""
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in all_params(opt)]


def rel_err(actual, expected, grads, params):
    a, e, g = flatten(actual, params), flatten(expected, params), flatten(grads, params)
    return float((a - e).norm() / g.norm())


def mixture(opt, gen, grads):
    """Global and tensor-scope projections, a soft one, GEM references and damping."""
    opt.protect("g", rand_samples(opt, 3, gen), mode="project", scope="global", damping=0.5)
    opt.protect("t", rand_samples(opt, 2, gen, cover=[0, 2, 3]), mode="project", scope="tensor", strength=0.5)
    opt.protect("gem", [[-0.4 * g + 0.8 * torch.randn(g.shape, generator=gen).to(g.dtype) for g in grads]
                        for _ in range(3)], mode="conflict", references="samples", rank=4)


BIG = [(80, 30), (700,), (13, 17), (5,), (300, 2)]


# ---------------------------------------------------------------------------- threads
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_split_step_matches_one_thread_and_reference(small_parts, seed, threads):
    results, reports = {}, {}
    for n in (1, threads):
        gen = torch.Generator().manual_seed(seed)
        opt = make_opt(BIG, gen=gen, backend=TorchBackend(threads=n))
        grads = rand_grads(opt, gen)
        mixture(opt, gen, grads)
        originals = [g.clone() for g in grads]
        results[n] = step_capture(opt, grads)
        reports[n] = opt.report
        plan = opt._current_plan(all_params(opt))
        if n > 1:  # the step really was split, inside tensors too
            views = plan.cache[("structure", "torch", n * torch_backend.CHUNKS_PER_THREAD)]
            assert len(views.chunks) == n * torch_backend.CHUNKS_PER_THREAD
            assert any(lo > 0 for p in views.chunks for _, lo, *_ in p.coef)
    params = all_params(opt)
    x, _ = reference_flat(opt, originals)
    expected = [t.float() for t in torch.split(x, [p.numel() for p in params])]
    change = float((x - flatten(originals, params)).norm() / flatten(originals, params).norm())
    assert change > 0.05  # the surgery is not vacuous
    assert rel_err(results[threads], expected, originals, params) <= FP32_TOL
    assert rel_err(results[threads], results[1], originals, params) <= 1e-6
    for name, rep in reports[threads].items():  # the report reads the summed coefficients and norms
        for key, value in rep.items():
            # the predicted changes are sums of terms of size ~|r| |h| (~10 here) that cancel:
            # chunked float32 partial sums round them at ~1e-4 absolute
            atol = 1e-3 if key.startswith("predicted_change") else 1e-7
            assert value == pytest.approx(reports[1][name][key], rel=1e-5, abs=atol), (name, key)


@pytest.mark.parametrize("threads", [1, 2])
def test_split_step_names_the_non_finite_tensors(small_parts, threads):
    gen = torch.Generator().manual_seed(8)
    opt = make_opt(BIG, gen=gen, backend=TorchBackend(threads=threads), nonfinite="raise")
    opt.protect("p", rand_samples(opt, 3, gen), mode="project")
    opt.protect("o", rand_samples(opt, 2, gen, cover=[1, 2]), mode="observe")
    grads = rand_grads(opt, gen)
    grads[0][5, 3] = float("nan")
    grads[3][1] = float("inf")
    originals = [g.clone() for g in grads]
    for p, g in zip(all_params(opt), grads):
        p.grad = g
    with pytest.raises(FloatingPointError) as err:
        opt.step()
    assert "parameter(s) [0, 3] is not finite" in str(err.value)
    for p, g in zip(all_params(opt), originals):  # left as they came
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


def test_small_plans_stay_on_one_thread():
    gen = torch.Generator().manual_seed(0)
    opt = make_opt(BIG, gen=gen, backend=TorchBackend(threads=4))
    opt.protect("g", rand_samples(opt, 3, gen), mode="project")
    step_capture(opt, rand_grads(opt, gen))
    plan = opt._current_plan(all_params(opt))
    assert [k for k in plan.cache if isinstance(k, tuple) and k[1:2] == ("torch",)] == [("structure", "torch", 1)]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_run_chunks_runs_each_call_once_and_raises_what_a_call_raises(threads):
    done = []
    torch_backend._run_chunks([lambda j=j: done.append(j) for j in range(9)], threads)
    assert sorted(done) == list(range(9))

    def boom():
        raise RuntimeError("chunk 3")

    calls = [lambda: None] * 3 + [boom] + [lambda: None] * 3
    with pytest.raises(RuntimeError, match="chunk 3"):
        torch_backend._run_chunks(calls, threads)


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match=r"TorchBackend\(threads=...\) must be a whole number >= 1"):
        TorchBackend(threads=0)


# ---------------------------------------------------------------------------- float64
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["observe", "conflict"])
def test_float64_zero_weight_step_is_bit_exact(small_parts, threads, mode):
    gen = torch.Generator().manual_seed(3)
    opt = make_opt(BIG, dtype=torch.float64, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    # a conflict reference aligned with the gradient: the constraint is inactive, weight 0
    opt.protect("c", [[g + 0.3 * torch.randn(g.shape, generator=gen, dtype=torch.float64) for g in grads]
                      for _ in range(2)], mode=mode)
    actual = step_capture(opt, grads)
    assert opt.report["c"]["energy_removed"] == 0.0
    for a, g in zip(actual, grads):
        assert a.dtype == torch.float64 and torch.equal(a, g)


@pytest.mark.parametrize("threads", [1, 2])
def test_zero_weights_are_not_added(small_parts, threads):
    # an inactive constraint's rows are skipped, not added with weight 0: even -0.0 entries keep their sign
    gen = torch.Generator().manual_seed(6)
    opt = make_opt(BIG, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    for g in grads:
        g.view(-1)[::7] = -0.0
    opt.protect("c", [[g + 0.3 * torch.randn(g.shape, generator=gen) for g in grads] for _ in range(2)], mode="conflict")
    actual = step_capture(opt, grads)
    for a, g in zip(actual, grads):
        assert torch.equal(a, g) and torch.equal(torch.signbit(a), torch.signbit(g))


@pytest.mark.parametrize("threads", [1, 2])
def test_float64_with_an_idle_and_an_acting_objective_on_one_tensor(small_parts, threads):
    # the idle conflict objective's rows are skipped; the projection's correction still lands whole
    gen = torch.Generator().manual_seed(7)
    opt = make_opt(BIG, dtype=torch.float64, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    opt.protect("c", [[g + 0.3 * torch.randn(g.shape, generator=gen, dtype=torch.float64) for g in grads]
                      for _ in range(2)], mode="conflict")
    opt.protect("p", rand_samples(opt, 3, gen), mode="project")
    originals = [g.clone() for g in grads]
    actual = step_capture(opt, grads)
    params = all_params(opt)
    x, _ = reference_flat(opt, originals)
    assert float((x - flatten(originals, params)).norm() / flatten(originals, params).norm()) > 0.01
    assert rel_err(actual, torch.split(x, [p.numel() for p in params]), originals, params) <= 1e-6


def plan_with_zero_columns(shapes, rank, seed, zero_every=3):
    """A global project objective whose orthonormal basis is zero on every ``zero_every``-th entry."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    obj = ProtectedObjective("z", ObjectiveConfig(rank=rank), range(len(shapes)), [p.shape for p in params])
    total = sum(p.numel() for p in params)
    keep = torch.ones(total, dtype=torch.bool)
    keep[::zero_every] = False
    basis = torch.zeros(rank, total, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(int(keep.sum()), rank, generator=gen, dtype=torch.float64))
    basis[:, keep] = q.T
    mean = torch.randn(total, generator=gen) * keep
    storage = pack_rows(basis.float(), mean, None)
    obj.replace_memory(Memory(storage=storage, n_basis=rank, energies=torch.ones(rank), fisher=torch.zeros(total),
                              num_samples=1))
    return build_plan([obj], params), obj, keep


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_float64_keeps_its_precision(small_parts, seed, threads):
    shapes = [(60, 7), (501,), (9, 9)]
    plan, obj, keep = plan_with_zero_columns(shapes, 4, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    U = obj.basis.double()  # the float32 rows, exactly
    n = U.shape[1]
    # a large part outside the basis and a small part inside: the correction is ~1e-4 of h
    big = torch.randn(n, generator=gen, dtype=torch.float64)
    big -= U.T @ torch.linalg.solve(U @ U.T, U @ big)
    h = 1e3 * big + U.T @ torch.randn(4, generator=gen, dtype=torch.float64)
    grads = [t.reshape(s).clone() for t, s in zip(torch.split(h, [torch.Size(s).numel() for s in shapes]), shapes)]
    rec = TorchBackend(threads=threads).run(plan, grads)
    x = torch.cat([g.reshape(-1) for g in grads])
    assert x.dtype == torch.float64
    # entries the rows do not touch: bit-exact
    assert torch.equal(x[~keep], h[~keep])
    # the change is the float32 correction rows^T w and nothing else (a float32 round trip
    # of h would be off by ~6e-8 |h_i| per entry, ~1e-3 of the correction here)
    W = torch.from_numpy(rec.weights)
    b = plan.blocks[0]
    correction = torch.cat([b.operand(t)[b.apply_rows()].double().T @ W[b.coef_offset + t * b.num_rows:][: b.n_basis]
                            for t in range(b.num_tensors)])
    assert float(correction.norm()) < 1e-3 * float(h.norm())
    assert float(((x - h) - correction).norm()) <= 1e-6 * float(correction.norm())
    # and the result is the float64 reference's, to ~1e-7 of |h|
    ref = joint_surgery(h, bases=[(U, 1.0)])
    assert float((x - ref).norm()) <= 2e-7 * float(h.norm())
    assert float((U @ x).norm()) <= 2e-7 * float(h.norm())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_float64_mixture_matches_reference(small_parts, seed, threads):
    gen = torch.Generator().manual_seed(seed)
    opt = make_opt(BIG, dtype=torch.float64, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    mixture(opt, gen, grads)
    originals = [g.clone() for g in grads]
    actual = step_capture(opt, grads)
    x, _ = reference_flat(opt, originals)
    params = all_params(opt)
    assert all(a.dtype == torch.float64 for a in actual)
    assert float((x - flatten(originals, params)).norm() / flatten(originals, params).norm()) > 0.05
    assert rel_err(actual, torch.split(x, [p.numel() for p in params]), originals, params) <= 1e-6


def test_float64_non_finite_gradient_is_left_alone():
    gen = torch.Generator().manual_seed(4)
    opt = make_opt([(6, 5), (11,)], dtype=torch.float64, gen=gen)
    opt.protect("d", rand_samples(opt, 3, gen), mode="project", damping=2.0)
    grads = rand_grads(opt, gen)
    grads[1][3] = float("inf")
    plan = opt._current_plan(all_params(opt))
    work = [g.clone() for g in grads]
    rec = TorchBackend().run(plan, work)
    assert not rec.finite
    for w, g in zip(work, grads):  # damping undone, to rounding
        torch.testing.assert_close(w, g, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_low_precision_matches_reference(small_parts, dtype, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = make_opt(BIG, dtype=dtype, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    mixture(opt, gen, grads)
    originals = [g.clone() for g in grads]
    actual = step_capture(opt, grads)
    params = all_params(opt)
    x, _ = reference_flat(opt, originals)
    assert all(a.dtype == dtype for a in actual)
    assert rel_err(actual, torch.split(x, [p.numel() for p in params]), originals, params) <= LOWP_TOL[dtype]


# ---------------------------------------------------------------------------- non-contiguous inputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_non_contiguous_gradients_match_their_contiguous_twins(small_parts, dtype, threads):
    gen = torch.Generator().manual_seed(5)
    opt = make_opt(BIG, dtype=dtype, gen=gen, backend=TorchBackend(threads=threads))
    grads = rand_grads(opt, gen)
    mixture(opt, gen, grads)
    plan = opt._current_plan(all_params(opt))
    strided = [g.t().contiguous().t() if g.dim() == 2 else torch.stack([g, g], -1)[..., 0] for g in grads]
    assert not any(s.is_contiguous() for s in strided)
    strides = [s.stride() for s in strided]
    twins = [g.clone() for g in grads]
    backend = TorchBackend(threads=threads)
    backend.run(plan, strided)
    backend.run(plan, twins)
    for s, t, st, g in zip(strided, twins, strides, grads):
        assert s.dtype == dtype and s.stride() == st
        assert torch.equal(s, t)
        assert not torch.equal(s, g)


# ---------------------------------------------------------------------------- subtract_from
def undamped_mixture(opt, gen, grads):
    """``mixture`` without damping: every change is a sum of rows (``can_subtract``)."""
    opt.protect("g", rand_samples(opt, 3, gen), mode="project", scope="global")
    opt.protect("t", rand_samples(opt, 2, gen, cover=[0, 2, 3]), mode="project", scope="tensor", strength=0.5)
    opt.protect("gem", [[-0.4 * g + 0.8 * torch.randn(g.shape, generator=gen).to(g.dtype) for g in grads]
                        for _ in range(3)], mode="conflict", references="samples", rank=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_subtract_from_takes_the_change_off_the_targets_and_leaves_the_tensors(small_parts, dtype, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    backend = TorchBackend(threads=threads)
    opt = make_opt(BIG, dtype=dtype, gen=gen, backend=backend)
    u = rand_grads(opt, gen)
    undamped_mixture(opt, gen, u)
    plan = opt._current_plan(all_params(opt))
    assert backend.can_subtract(plan)
    changed = [t.clone() for t in u]
    in_place = backend.run(plan, changed)
    targets = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in u]
    expected = [s - (c - t) for s, c, t in zip(targets, changed, u)]
    originals = [t.clone() for t in u]
    out = [s.clone() for s in targets]
    record = backend.run(plan, u, subtract_from=out)
    assert all(torch.equal(a, b) for a, b in zip(u, originals))  # only read
    assert torch.equal(torch.as_tensor(record.coefs), torch.as_tensor(in_place.coefs))
    assert torch.equal(torch.as_tensor(record.weights), torch.as_tensor(in_place.weights))
    params = all_params(opt)
    moved = float((flatten(changed, params) - flatten(u, params)).norm() / flatten(u, params).norm())
    assert moved > 0.05  # the surgery is not vacuous
    assert rel_err(out, expected, u, params) <= (1e-6 if dtype == torch.float32 else 1e-12)


def test_subtract_from_writes_nothing_when_the_weights_are_zero():
    gen = torch.Generator().manual_seed(3)
    backend = TorchBackend()
    opt = make_opt(BIG, gen=gen, backend=backend)
    u = rand_grads(opt, gen)
    # references that agree with u: no conflict constraint binds
    opt.protect("gem", [[0.5 * t + 0.1 * torch.randn(t.shape, generator=gen) for t in u] for _ in range(2)],
                mode="conflict", references="samples", rank=2)
    plan = opt._current_plan(all_params(opt))
    targets = [torch.randn(t.shape, generator=gen) for t in u]
    out = [s.clone() for s in targets]
    record = backend.run(plan, u, subtract_from=out)
    assert not torch.as_tensor(record.weights).any()
    assert all(torch.equal(a, b) for a, b in zip(out, targets))


def test_subtract_from_is_refused_where_the_change_is_not_a_sum_of_rows():
    gen = torch.Generator().manual_seed(4)
    backend = TorchBackend()
    opt = make_opt(BIG, gen=gen, backend=backend)
    u = rand_grads(opt, gen)
    opt.protect("g", rand_samples(opt, 3, gen), mode="project", damping=0.5)
    plan = opt._current_plan(all_params(opt))
    assert not backend.can_subtract(plan)
    with pytest.raises(ValueError, match="can_subtract"):
        backend.run(plan, u, subtract_from=[t.clone() for t in u])


def test_subtract_from_checks_its_targets():
    gen = torch.Generator().manual_seed(5)
    backend = TorchBackend()
    opt = make_opt(BIG, gen=gen, backend=backend)
    u = rand_grads(opt, gen)
    opt.protect("g", rand_samples(opt, 3, gen), mode="project")
    plan = opt._current_plan(all_params(opt))
    with pytest.raises(ValueError, match="tensor 0's target"):
        backend.run(plan, u, subtract_from=[t.double() for t in u])
    with pytest.raises(ValueError, match="contiguous"):
        backend.run(plan, u, subtract_from=[torch.empty(t.shape[::-1]).T if t.dim() == 2 else t.clone() for t in u])
    with pytest.raises(ValueError, match="has 1 tensors"):
        backend.run(plan, u, subtract_from=u[:1])
