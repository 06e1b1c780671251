"""torch.compile and ProtectedOptimizer: what compiles today, and what core must change.

Backends "eager"/"aot_eager" keep the tests fast on CPU: graph breaks and recompilations are
decided by Dynamo, before any backend; inductor's C++ compile of even a tiny model takes
tens of seconds on a small CPU and is not needed to observe them.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import gradsafe
from gradsafe import ProtectedOptimizer
from gradsafe.integrations import flatten_report

warnings.filterwarnings("ignore", ".*Profiler function.*")

GRADSAFE_DIR = os.path.dirname(gradsafe.__file__)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def setup(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    samples = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples}, rank=3, **kw)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(8)]
    return model, opt, data


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def eager_run(**kw):
    model, opt, data = setup(**kw)
    reports = []
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        reports.append(opt.report)
    return [p.detach().clone() for p in model.parameters()], reports


def explain_step(model, opt, x, y) -> tuple[list[str], int]:
    """Run one step under torch._dynamo.explain: the graph breaks whose innermost user frame is
    gradsafe code (as "file:line"), and the number of all graph breaks."""
    opt.zero_grad()
    loss_of(model, x, y).backward()
    explained = dynamo.explain(opt.step)()
    ours = []
    for b in explained.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        if frame is not None and frame.filename.startswith(GRADSAFE_DIR):
            ours.append(f"{os.path.relpath(frame.filename, GRADSAFE_DIR)}:{frame.lineno}")
    return ours, explained.graph_break_count


def test_compiled_model_with_eager_step_matches_eager():
    ref, _ = eager_run(mode="conflict")
    model, opt, data = setup(mode="conflict")
    compiled = torch.compile(model, backend="aot_eager")
    for x, y in data:
        opt.zero_grad()
        loss_of(compiled, x, y).backward()
        opt.step()
    assert opt.gradsafe_steps == len(data)
    for a, b in zip(ref, model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


WARMUP_KW = [
    dict(mode="conflict"),
    dict(mode="project", space="update", scope="tensor", damping=1.0),
    dict(mode="conflict", references="samples"),  # GEM: the branch-free dual solver
]
WARMUP_IDS = ["conflict", "update-tensor-damping", "gem"]


def compiled_run_after_warmup(kw):
    """One eager step (it builds the plan), then torch.compile(opt.step) for the rest; after
    two compiled calls any recompilation raises (set_stance "fail_on_recompile")."""
    model, opt, data = setup(**kw)
    x, y = data[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    step = torch.compile(opt.step, backend="eager")
    for i, (x, y) in enumerate(data[1:]):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if i < 2:
            step()
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                step()
    return model, opt, data


@pytest.mark.parametrize("kw", WARMUP_KW, ids=WARMUP_IDS)
def test_compiled_step_after_an_eager_warmup_applies_the_surgery(kw):
    """After a warm-up, Dynamo traces the whole surgery, the numpy host rule included (Dynamo
    turns numpy into torch ops), into the step's graph: the only graph breaks are torch's own
    (Optimizer.step), the parameters are bit-identical to eager, nothing recompiles."""
    ref, _ = eager_run(**kw)
    model, opt, data = compiled_run_after_warmup(kw)
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a, b)
    # where the graph breaks are: torch's deliberate one in Optimizer.step, none in gradsafe
    ours, total = explain_step(model, opt, *data[0])
    assert ours == [] and total >= 1


def test_compiled_step_keeps_counters_and_report():
    kw = WARMUP_KW[0]
    _, ref_reports = eager_run(**kw)
    model, opt, data = compiled_run_after_warmup(kw)
    assert opt.gradsafe_steps == len(data)
    assert flatten_report(opt.report) == pytest.approx(flatten_report(ref_reports[-1]))


def test_compiled_training_step_function():
    ref, _ = eager_run(mode="conflict")
    model, opt, data = setup(mode="conflict")

    def train_step(x, y):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        return loss

    train_step(*data[0])  # eager warm-up (see the xfail below)
    compiled = torch.compile(train_step, backend="eager")
    for x, y in data[1:3]:
        compiled(x, y)
    with torch.compiler.set_stance("fail_on_recompile"):
        for x, y in data[3:]:
            compiled(x, y)
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a, b)


def test_compiled_step_from_the_first_step():
    ref, _ = eager_run(mode="conflict")
    model, opt, data = setup(mode="conflict")
    step = torch.compile(opt.step, backend="eager")
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        step()
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a, b)


def test_compiled_step_with_a_refreshing_closure_objective():
    model, opt, data = setup(mode="project")
    xo = torch.randn(4, 6)
    opt.protect("live", closure=lambda: model(xo).pow(2).mean(), mode="conflict", refresh_every=1)
    x, y = data[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    step = torch.compile(opt.step, backend="eager")
    for x, y in data[1:]:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        step()
    assert opt.gradsafe_steps == len(data)


def test_gem_rule_has_no_graph_break_in_gradsafe():
    model, opt, data = setup(mode="conflict", references="samples")
    x, y = data[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()  # warm-up: builds the plan
    ours, _ = explain_step(model, opt, *data[1])
    assert ours == []
