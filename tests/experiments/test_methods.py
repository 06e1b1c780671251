"""The study's methods: each one builds and trains; what each registers and counts."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gradsafe import ProtectedOptimizer
from gradsafe.experiments import continual
from gradsafe.experiments.methods import (
    METHODS,
    Protected,
    build,
    kl_rows,
    method_names,
)
from gradsafe.experiments.runner import Stage, initial_cosine, run_stage


def _toy(seed: int = 0, n: int = 12):
    torch.manual_seed(seed)
    model = continual.MLP(8, 6, 1, 3)
    x, y = torch.randn(60, 8), torch.randint(0, 3, (60,))

    def logits(m, idx):
        return m(x[idx])

    def protected(name: str, lo: int) -> Protected:
        return Protected(name, model, torch.arange(lo, lo + n), loss=lambda m, i: F.cross_entropy(logits(m, i), y[i]),
                         logits=logits, target_logit=lambda m, i: logits(m, i).gather(1, y[i, None]).mean(),
                         forward=logits, pool=torch.arange(lo, lo + 2 * n))

    return model, x, y, logits, [protected("a", 0), protected("b", 2 * n)]


def _knobs(name: str) -> dict[str, float]:
    return {k: v[0] for k, v in METHODS[name].knobs.items()}


def test_every_method_builds_with_the_right_base_and_objectives():
    for name, m in METHODS.items():
        model, _, _, _, prot = _toy()
        built = build(name, model, prot, 1e-3, _knobs(name))
        base = built.optimizer.base_optimizer if isinstance(built.optimizer, ProtectedOptimizer) else built.optimizer
        assert isinstance(base, torch.optim.SGD if m.base == "sgd" else torch.optim.AdamW), name
        assert isinstance(built.optimizer, ProtectedOptimizer) == (m.register is not None), name
        if name in ("ewc", "gem", "ogd", "gpm", "sgp", "ewc_ogd", "damping"):  # one objective per protected set
            assert list(built.optimizer.objectives) == ["a", "b"], name
        if name in ("online_ewc", "agem", "safegrad", "l2sp", "replay_agem"):  # one objective for all
            assert len(built.optimizer.objectives) == 1, name
        live = name in ("agem", "gem", "safegrad", "replay_agem")
        assert bool(built.closures) == live, name
    with pytest.raises(ValueError, match="knobs"):
        build("ewc", _toy()[0], _toy()[4], 1e-3, {})
    assert method_names(None, quick=True)[0] == "plain"
    with pytest.raises(ValueError, match="unknown methods"):
        method_names(["plain", "magic"])


def test_ogd_basis_is_the_ground_truth_logit_gradient():
    model, x, y, logits, prot = _toy()
    sample = prot[0].samples("logit")[0]
    model.zero_grad()
    i = prot[0].memory[:1]
    logits(model, i)[0, y[i[0]]].backward()
    for g, p in zip(sample, model.parameters()):
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g if g is not None else torch.zeros_like(p), want, atol=1e-6)
    assert prot[0].example_grads == len(prot[0])


def test_kl_rows_matches_the_formula():
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    p, q = a.softmax(-1), b.softmax(-1)
    want = (p * (p / q).log()).sum(-1).mean()
    assert torch.allclose(kl_rows(a, b), want)
    assert float(kl_rows(a, a)) == pytest.approx(0.0, abs=1e-12)
    pt, qt = (a / 2).softmax(-1), (b / 2).softmax(-1)
    assert torch.allclose(kl_rows(a, b, 2.0), (pt * (pt / qt).log()).sum(-1).mean())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_stage_and_counts_its_cost(name):
    model, x, y, logits, prot = _toy()
    new = torch.arange(48, 60)
    batches = [new[torch.randperm(12, generator=torch.Generator().manual_seed(s))[:8]] for s in range(6)]
    stage = Stage(batches=batches, loss=lambda m, i: F.cross_entropy(m(x[i]), y[i]), logits=lambda m, i: m(x[i]),
                  protected=prot, evaluate=lambda: {"protected": 0.0, "new": 0.0,
                                                    "protected_loss": float(prot[0].loss().detach())},
                  eval_every=3, seed=0, monitor=name == "plain")
    before = [p.detach().clone() for p in model.parameters()]
    res = run_stage(model, name, _knobs(name), 1e-2, stage)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
    assert res["curve"]["step"] == [0, 3, 6]
    cost = res["cost"]["example_grads"]
    floor = 6 * 8 + (6 * 16 if name == "kl" else 0)  # the batches (and the KL's memory rows)
    live = {"agem": 24, "replay_agem": 24, "gem": 24, "safegrad": 24}.get(name, 0)  # rows per refresh
    samples = 24 if name in ("ewc", "online_ewc", "damping", "ogd", "sgp", "ewc_ogd") else 0
    # a live reference: computed at registration (it serves step 1), recomputed before steps 2..6
    assert cost == floor + samples + live * 6, (name, cost)
    if name == "plain":
        assert len(res["windows"]["predicted"]) == 2


def test_initial_cosine_matches_a_direct_computation():
    model, x, y, logits, prot = _toy()
    batches = [torch.arange(28, 36), torch.arange(30, 38)]
    stage = Stage(batches=batches, loss=lambda m, i: F.cross_entropy(m(x[i]), y[i]), logits=lambda m, i: m(x[i]),
                  protected=prot, evaluate=dict, eval_every=1, seed=0)
    got = initial_cosine(model, stage)
    params = list(model.parameters())
    g_new = torch.autograd.grad(torch.stack([F.cross_entropy(model(x[b]), y[b]) for b in batches]).mean(), params)
    g_mem = torch.autograd.grad(torch.stack([p.loss() for p in prot]).mean(), params)
    a, b = torch.cat([g.reshape(-1) for g in g_new]), torch.cat([g.reshape(-1) for g in g_mem])
    assert got == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-5)
