"""Live references refreshed in place: the rows are rewritten, the plan updates only their numbers.

A closure objective whose memory keeps its shape across a refresh (a conflict reference,
A-GEM / GEM / SafeGrad with ``refresh_every=1``) gets the fresh gradient written into its
rows; the plan then updates the Gram entries of those rows (``Plan.update_rows``) instead
of being rebuilt. Each test here compares that with what a freshly built plan does.
"""

from __future__ import annotations

import copy

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradsafe.registry
import gradsafe.report
import gradsafe.rule
from gradsafe import ProtectedOptimizer
from gradsafe.backends import TorchBackend
from gradsafe.plan import build_plan
from gradsafe.report import ReportConstants
from gradsafe.samples import pack_samples


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def random_samples(model: nn.Module, m: int, seed: int, cover: set[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    return [
        [torch.randn(p.shape, generator=gen) if cover is None or i in cover else None for i, p in enumerate(params)]
        for _ in range(m)
    ]


def build(seed: int, space: str, mix: int) -> tuple[nn.Module, ProtectedOptimizer, list]:
    """A random problem: sample objectives (project global / tensor / scaled, observe, static
    conflict) and live conflict closures (mean and samples, global and tensor scope) that share
    tensors with them. ``mix`` picks which ones."""
    model = make_model(seed)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    xs = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.05), space=space, backend="torch")
    rng = np.random.default_rng(seed)
    n = len(params)
    statics = [
        dict(mode="project", rank=3, scope="global"),
        dict(mode="project", rank=2, scope="tensor"),
        dict(mode="project", rank=2, scope="global", strength=0.5),
        dict(mode="observe", rank=2, scope="global"),
        dict(mode="conflict", references="samples", rank=2, scope="global"),
    ]
    for j, kw in enumerate(statics):
        if (mix >> j) & 1:
            cover = set(rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False).tolist())
            opt.protect(f"static{j}", random_samples(model, 3, seed=100 * seed + j, cover=cover), **kw)
    lives = [
        (dict(references="mean", scope="global"), lambda: model(xs[0]).pow(2).mean()),
        (dict(references="samples", rank=2, scope="global"), lambda: (model[2](torch.tanh(model[0](xs[1])))).sin().mean()),
        (dict(references="mean", scope="tensor"), lambda: model(xs[2]).tanh().sum()),
    ]
    for j, (kw, loss) in enumerate(lives):
        if j == 0 or (mix >> (5 + j)) & 1:
            opt.protect(f"live{j}", closure=loss, mode="conflict", refresh_every=1, **kw)
    data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(5)]
    return model, opt, data


def train_step(model, opt, batch, rebuild: bool) -> None:
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if rebuild:
        opt._registry.invalidate()  # the reference: every step on a freshly built plan
    opt.step()


CASES = [(seed, space, mix) for seed, mix in ((0, 0b11111111), (1, 0b10100011), (2, 0b01011100), (3, 0b11010110))
         for space in ("grad", "update")]


@pytest.mark.parametrize("seed,space,mix", CASES)
def test_in_place_refresh_steps_like_a_freshly_built_plan(seed, space, mix):
    model_a, opt_a, data = build(seed, space, mix)
    model_b, opt_b, _ = build(seed, space, mix)
    live = [o for o in opt_a.objectives.values() if o.had_closure]
    assert live and all(o.refreshes_in_place for o in live)
    for i, batch in enumerate(data):
        train_step(model_a, opt_a, batch, rebuild=False)
        train_step(model_b, opt_b, batch, rebuild=True)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ra, rb = opt_a.report, opt_b.report
        assert ra.keys() == rb.keys()
        for name in ra:
            for stat, v in ra[name].items():
                # staleness is |actual - predicted| / (|actual| + |predicted|), with the actual
                # change a difference of two float32 losses one small step apart: parameters
                # equal to 1e-6 move it by ~1e-4 (predicted_change itself is compared tightly)
                tol = dict(abs=1e-3) if stat == "staleness" else dict(rel=1e-4, abs=1e-6)
                assert v == pytest.approx(rb[name][stat], **tol), (i, name, stat)
    # one plan over all steps, updated in place (built at the first step only)
    assert all(o.version == 1 for o in opt_a.objectives.values())
    assert all(o.rows_version == len(data) - 1 for o in live)
    plan = opt_a._plan
    params = list(model_a.parameters())
    fresh = build_plan(list(opt_a.objectives.values()), params, plan.active)
    for g, h in zip(plan.rule.tensor_grams, fresh.rule.tensor_grams):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    for a, b in zip(plan.rule.batches, fresh.rule.batches):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    ca, cb = ReportConstants.of(plan), ReportConstants.of(fresh)
    for x, y in zip(ca.mean_norm2, cb.mean_norm2):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    for x, y in zip(ca.constraint_pinv, cb.constraint_pinv):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    for xs, ys in zip(ca.cross, cb.cross):
        for x, y in zip(xs, ys):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # and one more gradient through both plans gives the same surgery
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(params[i].shape, generator=gen) for i in plan.param_indices]
    out_a, out_b = [g.clone() for g in grads], [g.clone() for g in grads]
    TorchBackend().run(plan, out_a)
    TorchBackend().run(fresh, out_b)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Counter:
    """Wraps the inner-product functions of the rule and the report: which storages each call read."""

    def __init__(self, monkeypatch):
        self.calls: list[set[int]] = []
        for module in (gradsafe.rule, gradsafe.report):
            for fname in ("operand_inner", "operand_gram"):
                if hasattr(module, fname):
                    monkeypatch.setattr(module, fname, self._wrap(getattr(module, fname)))
        self.builds = 0
        real_build = gradsafe.registry.build_plan

        def counted_build(*args, **kwargs):
            self.builds += 1
            return real_build(*args, **kwargs)

        monkeypatch.setattr(gradsafe.registry, "build_plan", counted_build)

    def _wrap(self, fn):
        def wrapped(*ops):
            flat = ops[0] if len(ops) == 1 and isinstance(ops[0], list) else list(ops)
            self.calls.append({op.untyped_storage().data_ptr() for op in flat if isinstance(op, torch.Tensor)})
            return fn(*ops)

        return wrapped


@pytest.mark.parametrize("space", ["grad", "update"])
def test_a_refresh_computes_no_gram_of_the_other_objectives(monkeypatch, space):
    model, opt, data = build(0, space, 0b11111111)
    train_step(model, opt, data[0], rebuild=False)  # builds the plan
    _ = opt.report
    counter = _Counter(monkeypatch)
    lives = [o for o in opt.objectives.values() if o.had_closure]
    live = {o.memory.storage.untyped_storage().data_ptr() for o in lives}
    for batch in data[1:3]:
        train_step(model, opt, batch, rebuild=False)
        _ = opt.report
        # a refreshed objective's rows: its storage, or the gradient it lent the step
        live |= {g.untyped_storage().data_ptr() for o in lives for g in (o.lent_rows or ())}
    assert counter.builds == 0  # the plan was updated, not rebuilt
    assert counter.calls, "the refreshed rows' Gram entries were not recomputed"
    # every inner product the update took reads a refreshed objective's rows
    assert all(c & live for c in counter.calls), counter.calls
    # a step after a structural change rebuilds, as before
    opt.add_samples("static0", random_samples(model, 1, seed=5, cover=set(opt.objectives["static0"].coverage)))
    train_step(model, opt, data[3], rebuild=False)
    assert counter.builds == 1


def test_one_live_reference_alone_takes_no_pass_for_its_gram(monkeypatch):
    """A-GEM alone: the refresh knows |r_t|^2 from the finiteness check, the rule reads it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backend="torch")
    opt.protect("live", closure=lambda: model(x).pow(2).mean(), mode="conflict", refresh_every=1)
    batch = (torch.randn(5, 4), torch.randn(5, 2))
    train_step(model, opt, batch, rebuild=False)
    counter = _Counter(monkeypatch)
    for _ in range(3):
        train_step(model, opt, batch, rebuild=False)
        _ = opt.report
    assert counter.builds == 0 and counter.calls == []
    obj = opt.objectives["live"]
    plan = opt._plan
    fresh = build_plan([obj], list(model.parameters()), plan.active)
    for g, h in zip(plan.rule.tensor_grams, fresh.rule.tensor_grams):
        np.testing.assert_allclose(g, h, rtol=1e-5)


def _live_objective(references: str = "mean", fisher_metrics: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    state = {"scale": 1.0, "first_layer_only": False}

    def loss():
        h = model[0](x)
        if state["first_layer_only"]:
            return state["scale"] * h.pow(2).mean()
        return state["scale"] * model(x).pow(2).mean()

    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backend="torch", fisher_metrics=fisher_metrics)
    obj = opt.protect("live", closure=loss, mode="conflict", refresh_every=1, references=references, rank=3)
    return model, opt, obj, state


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("references", ["mean", "samples"])
def test_in_place_refresh_gives_the_memory_a_merge_gives(references):
    model, opt, obj, _ = _live_objective(references)
    _step(model, opt)
    storage = obj.memory.storage
    _step(model, opt)  # refreshed in place
    assert obj.memory.storage is storage and obj.version == 1 and obj.rows_version == 1
    assert obj.num_refreshes == 1 and obj.num_samples == 1
    assert obj.basis.shape[0] == 0  # a conflict objective keeps no basis
    # the same memory a merge of the packed gradient gives, from the fisher before this refresh
    before = obj.fisher.clone()
    live_rows = obj.memory.storage.clone()
    params = list(model.parameters())
    grad = list(torch.autograd.grad(opt.objectives["live"].closure(), params))
    _step(model, opt)
    S = pack_samples([grad], params, "live", coverage=obj.coverage)[1]
    torch.testing.assert_close(obj.mean_ref, S[0])
    if references == "samples":
        torch.testing.assert_close(obj.sample_refs, S)
    decay = obj.config.fisher_decay
    torch.testing.assert_close(obj.fisher, decay * before + (1 - decay) * S[0] ** 2)
    assert not torch.equal(live_rows, obj.memory.storage)


def test_covered_entries_the_loss_no_longer_reaches_are_zero_after_an_in_place_refresh():
    model, opt, obj, state = _live_objective()
    _step(model, opt)
    state["first_layer_only"] = True
    _step(model, opt)
    assert obj.version == 1 and obj.rows_version == 1
    sl = obj.slices()
    assert bool(obj.mean_ref[sl[0]].any())
    for t in (2, 3):  # the second layer's weight and bias
        assert not bool(obj.mean_ref[sl[t]].any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_live_gradient_is_refused_and_the_memory_kept(bad):
    model, opt, obj, state = _live_objective()
    _step(model, opt)
    rows, fisher, version = obj.memory.storage.clone(), obj.fisher.clone(), obj.rows_version
    state["scale"] = bad
    with pytest.raises(ValueError, match=r"'live'.*(inf|nan)"):
        _step(model, opt)
    assert torch.equal(obj.memory.storage, rows) and torch.equal(obj.fisher, fisher)
    assert obj.rows_version == version


def test_live_gradient_whose_square_overflows_is_refused():
    model, opt, obj, state = _live_objective()
    _step(model, opt)
    rows = obj.memory.storage.clone()
    state["scale"] = 1e30
    with pytest.raises(ValueError, match=r"objective 'live': the Fisher diagonal overflowed float32.*scale the protected loss down"):
        _step(model, opt)
    assert torch.equal(obj.memory.storage, rows)


def test_zero_live_gradient_warns_and_keeps_the_memory():
    model, opt, obj, state = _live_objective()
    _step(model, opt)
    rows, version = obj.memory.storage.clone(), obj.rows_version
    state["scale"] = 0.0
    with pytest.warns(RuntimeWarning, match=r"'live' is exactly zero"):
        _step(model, opt)
    assert torch.equal(obj.memory.storage, rows) and obj.rows_version == version


def test_rank_zero_basis_round_trips_through_the_state_dict():
    model, opt, obj, _ = _live_objective("samples")
    _step(model, opt)
    _step(model, opt)
    sd = opt.state_dict()
    fresh = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict(sd)
    restored = fresh.objectives["live"]
    assert restored.basis.shape[0] == 0
    assert torch.equal(restored.memory.storage, obj.memory.storage)
    report = opt.memory_report(quiet=True)
    assert all(row.basis == 0 for row in report.rows)


def test_a_budgeted_conflict_objective_keeps_no_basis_row():
    model, opt, obj, _ = _live_objective()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    x = torch.randn(5, 4)
    opt.protect("budgeted", closure=lambda: model(x).sum(), mode="conflict", refresh_every=1,
                memory_budget=4 * n * 2)  # the reference and the Fisher: no basis row is needed
    b = opt.objectives["budgeted"]
    assert b.basis.shape[0] == 0 and b.refreshes_in_place
    _step(model, opt)
    _step(model, opt)
    assert b.version == 1 and b.rows_version == 1


@pytest.mark.parametrize("decay,scale", [(0.5, 1.0), (0.9, 1.0), (0.0, 1.0), (0.5, 1e17)])
def test_the_fisher_of_many_in_place_refreshes_is_the_online_average(decay, scale):
    """In-place refreshes keep the Fisher's decay as a host factor, folded in when read and
    before the stored entries could leave float32's range (``scale``: squares near 1e34)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    params = list(model.parameters())
    x = torch.randn(5, 4)

    def loss():
        return scale * model(x).pow(2).mean()

    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.05), backend="torch", fisher_metrics=True)
    obj = opt.protect("live", closure=loss, mode="conflict", refresh_every=1, fisher_decay=decay)
    expected = obj.fisher.double().clone()
    for i in range(130):
        grad = torch.autograd.grad(loss(), params)
        g = torch.cat([t.reshape(-1) for t in grad]).double()
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        if i > 0:  # the first step's refresh is not due (registered at step 0)
            expected = decay * expected + (1 - decay) * g**2
        if i % 40 == 3:  # reading the memory folds the factor in; later refreshes go on from there
            torch.testing.assert_close(obj.fisher.double(), expected, rtol=1e-5, atol=0)
    assert obj.version == 1 and obj.rows_version == 129
    assert bool(torch.isfinite(obj.memory.fisher).all())
    saved = opt.state_dict()["gradsafe"]["objectives"]["live"]["fisher"]
    torch.testing.assert_close(saved.double(), expected, rtol=1e-5, atol=0)
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()  # a later refresh leaves the saved Fisher as it was saved
    torch.testing.assert_close(saved.double(), expected, rtol=1e-5, atol=0)


def test_a_compiled_step_sees_the_rows_refreshed_in_place():
    """torch.compile must not bake the rule's numbers of the first step into its graph."""
    import torch._dynamo as dynamo

    def run(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        xo = torch.randn(5, 4)
        opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), backend="torch")
        opt.protect("old", random_samples(model, 2, seed=3), mode="project", rank=2)
        opt.protect("live", closure=lambda: model(xo).pow(2).mean(), mode="conflict", refresh_every=1)
        opt.protect("gem", closure=lambda: model(xo).sin().sum(), mode="conflict", references="samples", refresh_every=1)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            (-model(torch.randn(5, 4, generator=gen)).pow(2).mean()).backward()
            step()
        assert opt.objectives["live"].rows_version == 4
        return [p.detach().clone() for p in model.parameters()]

    dynamo.reset()
    try:
        for a, b in zip(run(False), run(True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        dynamo.reset()


# ------------------------------------------------- the gradient lent to the step (CPU)


def test_a_live_reference_lends_its_gradient_and_the_memory_gets_it_when_read():
    """On the CPU the refresh keeps the closure's gradient tensors as the rows (no copy): the step
    reads them, the record's row is stale until the memory is read, a reading writes them in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    params = list(model.parameters())
    align = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 4, generator=align) for _ in range(4)]
    calls = iter(batches)
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.1), backend="torch")
    opt.protect("live", closure=lambda: model(next(calls)).pow(2).mean(), mode="conflict", refresh_every=1)
    opt.protect("gem", closure=lambda: model(batches[0]).sin().sum(), mode="conflict", references="samples",
                rank=2, refresh_every=1)
    live, gem = opt.objectives["live"], opt.objectives["gem"]
    registered = live._memory.storage.clone()
    for k in range(2):  # the first step reads the reference of protect(); the second refreshes it
        if k == 1:
            expected = torch.autograd.grad(model(batches[1]).pow(2).mean(), params)  # before the step moves them
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert live.rows_version == 1
    lent = live.lent_rows
    assert lent is not None and gem.lent_rows is None  # a kept sample is a second row: copied
    for g, e in zip(lent, expected):
        torch.testing.assert_close(g, e.reshape(-1), rtol=1e-6, atol=1e-7)
    block = next(b for b in opt._plan.blocks if b.name == "live")
    assert [op.data_ptr() for op in block.operands] == [g.data_ptr() for g in lent]  # read where it lies
    assert torch.equal(live._memory.storage, registered)  # the record's row: not written
    torch.testing.assert_close(live.mean_ref, torch.cat([e.reshape(-1) for e in expected]), rtol=1e-6, atol=1e-7)
    assert live.lent_rows is None  # reading the memory wrote them in
    # the next refresh lends again; the plan's block reads the new tensors
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert live.lent_rows is not None and live.lent_rows[0] is not lent[0]
    assert [op.data_ptr() for op in block.operands] == [g.data_ptr() for g in live.lent_rows]


def test_lent_rows_in_a_step_cut_into_chunks_for_threads():
    """The torch backend cuts a large plan into column chunks for its threads; each chunk's views
    follow the lent rows from step to step (``Plan.operands_version``) as the one-chunk step does."""
    from gradsafe.backends.torch_backend import _views

    def run(threads):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4))
        gen = torch.Generator().manual_seed(1)
        align = torch.Generator().manual_seed(2)
        opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), backend=TorchBackend(threads=threads))
        opt.protect("live", closure=lambda: model(torch.randn(8, 512, generator=align)).pow(2).mean(),
                    mode="conflict", refresh_every=1)
        conflicts = 0
        for _ in range(4):
            opt.zero_grad()
            (-model(torch.randn(8, 512, generator=gen)).pow(2).mean()).backward()
            opt.step()
            conflicts += opt.report["live"]["conflict"]
        chunks = len(_views(opt._plan, opt._backend._split(opt._plan, False)[0]).chunks)
        return [p.detach().clone() for p in model.parameters()], opt, conflicts, chunks

    a, opt_a, conflicts, chunks = run(2)
    b, _, _, one = run(1)
    assert chunks > 1 and one == 1 and conflicts >= 2
    assert opt_a.objectives["live"].lent_rows is not None and opt_a._plan.operands_version >= 3
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------- a Fisher that nothing reads is not kept


def _train(fisher_metrics: bool, space: str = "grad", switch_on_at: int | None = None, steps: int = 6):
    """A live A-GEM objective and a GEM one next to a project objective; returns the
    parameters, the reports and the optimizer after ``steps`` steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    xo = torch.randn(5, 4)
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), backend="torch", space=space,
                             fisher_metrics=fisher_metrics)
    opt.protect("old", random_samples(model, 2, seed=3), mode="project", rank=2)
    opt.protect("live", closure=lambda: model(xo).pow(2).mean(), mode="conflict", refresh_every=1)
    opt.protect("gem", closure=lambda: model(xo).sin().sum(), mode="conflict", references="samples", rank=2,
                refresh_every=1)
    gen = torch.Generator().manual_seed(1)
    reports = []
    for k in range(steps):
        if switch_on_at is not None and k == switch_on_at:
            opt.fisher_metrics = True
        opt.zero_grad()
        (-model(torch.randn(5, 4, generator=gen)).pow(2).mean()).backward()
        opt.step()
        reports.append({name: dict(stats) for name, stats in opt.report.items()})
    return [p.detach().clone() for p in model.parameters()], reports, opt


@pytest.mark.parametrize("space", ["grad", "update"])
def test_without_fisher_metrics_a_live_objective_keeps_no_fisher_and_every_other_number_is_the_same(space):
    params_on, reports_on, opt_on = _train(True, space)
    params_off, reports_off, opt_off = _train(False, space)
    # equal to float32 rounding, not bit for bit: without a Fisher the A-GEM objective lends its
    # gradient to the step (lent_rows), whose float32 sums then run over the gradient where it
    # lies instead of over its copy in the storage, at another alignment
    assert opt_off.objectives["live"].lent_rows is not None and opt_on.objectives["live"].lent_rows is None
    for a, b in zip(params_on, params_off):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for on, off in zip(reports_on, reports_off):
        for name in on:
            assert "fisher_step" in on[name] and "fisher_step" not in off[name]
            assert on[name].keys() - {"fisher_step"} == off[name].keys()
            for k, v in off[name].items():
                assert on[name][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, k)
    for name in ("live", "gem"):
        on, off = opt_on.objectives[name], opt_off.objectives[name]
        assert on.tracks_fisher and on.fisher is not None
        assert not off.tracks_fisher and off.fisher is None  # visible, never a stale number
        torch.testing.assert_close(on.memory.storage, off.memory.storage, rtol=1e-6, atol=1e-7)
    # the project objective (rebuilt, not refreshed in place) keeps its Fisher either way
    assert opt_off.objectives["old"].tracks_fisher
    sd = opt_off.state_dict()
    assert sd["gradsafe"]["objectives"]["live"]["fisher"] is None
    fresh = ProtectedOptimizer(torch.optim.AdamW(opt_off.base_optimizer.param_groups[0]["params"], lr=0.05),
                               backend="torch", space=space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict(sd)
    assert fresh.objectives["live"].fisher is None
    assert torch.equal(fresh.objectives["live"].memory.storage, opt_off.objectives["live"].memory.storage)


def test_turning_fisher_metrics_on_restarts_the_fisher_at_the_next_refresh():
    """The Fisher restarts as a fresh memory's does (g^2 of that refresh) and is the online
    average from there; fisher_step reads it."""
    switch = 3
    _, reports, opt = _train(False, switch_on_at=switch, steps=switch + 3)
    for k, rep in enumerate(reports):
        assert ("fisher_step" in rep["live"]) == (k >= switch)
    # the same from a run that kept the Fisher all along, restarted by hand: compare with the
    # live gradients of steps switch.. (registration is step 0; step k refreshes from theta_k)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    xo = torch.randn(5, 4)
    ref = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), backend="torch", fisher_metrics=True)
    ref.protect("old", random_samples(model, 2, seed=3), mode="project", rank=2)
    ref.protect("live", closure=lambda: model(xo).pow(2).mean(), mode="conflict", refresh_every=1)
    ref.protect("gem", closure=lambda: model(xo).sin().sum(), mode="conflict", references="samples", rank=2,
                refresh_every=1)
    gen = torch.Generator().manual_seed(1)
    decay = ref.objectives["live"].config.fisher_decay
    params = list(model.parameters())
    expected = None
    for k in range(switch + 3):
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(model(xo).pow(2).mean(), params)])
        if k == switch:
            expected = g.double() ** 2
        elif k > switch:
            expected = decay * expected + (1 - decay) * g.double() ** 2
        ref.zero_grad()
        (-model(torch.randn(5, 4, generator=gen)).pow(2).mean()).backward()
        ref.step()
    torch.testing.assert_close(opt.objectives["live"].fisher.double(), expected, rtol=1e-5, atol=0)
    assert opt.objectives["live"].tracks_fisher


def test_an_ewc_objective_refreshed_in_place_keeps_its_fisher_without_fisher_metrics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    xo = torch.randn(5, 4)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backend="torch")
    obj = opt.protect("live", closure=lambda: model(xo).pow(2).mean(), mode="conflict", refresh_every=1, ewc=0.5)
    fisher = obj.fisher.clone()
    for _ in range(3):
        _step(model, opt)
    if obj.refreshes_in_place:
        assert obj.rows_version > 0
    assert obj.tracks_fisher and torch.equal(obj.fisher, fisher)  # EWC's is the task's: a refresh leaves it


class _InterruptedBackend:
    """A backend object (no ``can_subtract``) interrupted half-way through its in-place work."""

    name = "interrupted"

    def run(self, plan, tensors):
        for t in tensors:
            t.mul_(7.0)
        raise KeyboardInterrupt


def test_a_surgery_that_raises_in_update_space_leaves_the_parameters_at_theta_before():
    """Where a parameter holds u while the surgery runs (a backend object), an exception must not leave u there."""
    model = make_model(3)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.AdamW(params, lr=0.05), backend=_InterruptedBackend(), space="update")
    opt.protect("old", random_samples(model, 3, seed=1), mode="project")
    x = torch.randn(8, 5)
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in params]
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_a_surgery_that_raises_before_writing_leaves_the_base_step_when_the_backend_subtracts(monkeypatch):
    """The torch backend's path reads u from the snapshot and writes the parameters last: an
    exception before that write leaves exactly the base optimizer's step."""
    model = make_model(3)
    params = list(model.parameters())
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.05)
    opt = ProtectedOptimizer(torch.optim.AdamW(params, lr=0.05), backend="torch", space="update")
    opt.protect("old", random_samples(model, 3, seed=1), mode="project")
    x = torch.randn(8, 5)
    model(x).square().mean().backward()
    plain_model(x).square().mean().backward()
    plain.step()
    calls = []

    def fail(plan, tensors, subtract_from=None):
        calls.append(subtract_from is not None)
        raise KeyboardInterrupt

    monkeypatch.setattr(opt._backend, "run", fail)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert calls == [True]
    for p, q in zip(params, plain_model.parameters()):
        assert torch.equal(p.detach(), q.detach())
