"""The study's methods: each one builds, and the study's monitor reports what space "update" does."""

from __future__ import annotations

import math

import pytest
import torch

from gradsafe import ProtectedOptimizer
from gradsafe.experiments import continual
from gradsafe.experiments.methods import METHODS, Hyper, Protected, build_optimizer, method_names


def test_every_method_builds():
    torch.manual_seed(0)
    model = continual.MLP(8, 6, 1, 3)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    memory = torch.arange(12)
    prot = Protected("old", model, memory, lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
    for name in METHODS:
        opt, closure = build_optimizer(name, torch.optim.AdamW(model.parameters(), lr=1e-3), [prot], Hyper(rank=4, gem_refs=3))
        if name == "plain":  # the baseline is AdamW alone
            assert type(opt) is torch.optim.AdamW and closure is None
            continue
        assert isinstance(opt, ProtectedOptimizer) and opt.objectives, name
        assert opt.space == METHODS[name].space
        live = name.startswith("agem_") and name != "agem_cached"  # A-GEM with a closure reference
        assert (closure is not None) == live, name
    assert prot.backward_passes == 12 + 3  # samples once, GEM's 3 batches once
    assert method_names(None, quick=True)[0] == "plain"
    with pytest.raises(ValueError, match="unknown methods"):
        method_names(["plain", "magic"])


def test_update_monitor_matches_space_update():
    """The study's monitor (a GradientMonitor fed the negated update) reports what a
    ProtectedOptimizer in space "update" reports for the same AdamW step."""
    from gradsafe import GradientMonitor, collect_gradients

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    xo, yo = torch.randn(16, 8), torch.randint(0, 3, (16,))
    a = continual.MLP(8, 6, 1, 3)
    b = continual.MLP(8, 6, 1, 3)
    b.load_state_dict(a.state_dict())
    ref = collect_gradients(a, lambda _: torch.nn.functional.cross_entropy(a(xo), yo), [None])

    opt = ProtectedOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2), {"old": ref}, mode="observe", space="update", rank=1)
    base = torch.optim.AdamW(b.parameters(), lr=1e-2)
    monitor = GradientMonitor(list(b.parameters()), {"old": ref}, rank=1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(a(x), y).backward()
        opt.step()
        snapshot = [p.detach().clone() for p in b.parameters()]
        base.zero_grad()
        torch.nn.functional.cross_entropy(b(x), y).backward()
        base.step()
        for p, s in zip(b.parameters(), snapshot):
            p.grad = s - p.detach()
        got = monitor.measure()["old"]
        want = opt.report["old"]
        for key in ("predicted_change", "cosine", "conflict"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-7), key
    for p, q in zip(a.parameters(), b.parameters()):  # observe changes nothing
        assert torch.allclose(p, q, atol=1e-6)

