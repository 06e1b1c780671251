"""The library-free helpers of gradsafe.integrations, and what importing them pulls in."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gradsafe import ProtectedOptimizer
from gradsafe.integrations import (
    ProtectedOptimizerFromParams,
    ReportAccumulator,
    align_samples,
    find_protected_optimizer,
    flatten_report,
)


def test_import_gradsafe_imports_no_integration_library():
    code = (
        "import sys, gradsafe, gradsafe.integrations\n"
        "heavy = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def model_and_samples():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    samples = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    return model, samples


def test_align_samples_reorders_by_identity_and_drops_nothing():
    model, samples = model_and_samples()
    params = list(model.parameters())
    target = [params[3], params[0], params[2]]  # a different order, one parameter missing
    samples[0][1] = None
    samples[1][1] = None
    out = align_samples(samples, model, target)
    assert [[t is s[3], u is s[0], v is s[2]] for (t, u, v), s in zip(out, samples)] == [[True] * 3] * 2
    single = align_samples(samples[0], params, target)
    assert single[0] is samples[0][3] and len(single) == 3
    extra = torch.nn.Parameter(torch.zeros(5))
    assert align_samples(samples[0], params, target + [extra])[-1] is None
    with pytest.raises(ValueError, match="does not hold"):
        align_samples(model_and_samples()[1], model, target)  # parameter 1 has a gradient
    with pytest.raises(ValueError, match="entries"):
        align_samples([samples[0][:2]], model, target)
    fn = lambda: torch.zeros(())  # noqa: E731
    assert align_samples(fn, model, target) is fn


def test_from_params_builds_the_base_and_realigns():
    model, samples = model_and_samples()
    params = list(model.parameters())
    groups = [{"params": [params[2], params[3]], "weight_decay": 0.1}, {"params": [params[0], params[1]]}]
    opt = ProtectedOptimizerFromParams(groups, torch.optim.AdamW, {"lr": 1e-3}, {"old": samples},
                                       samples_from=model, rank=2)
    assert isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["lr"] == 1e-3
    assert sorted(opt.objectives["old"].coverage) == [0, 1, 2, 3]
    # the objective's first covered tensor is model parameter 2 (optimizer position 0)
    assert tuple(opt.objectives["old"].shapes[opt.objectives["old"].coverage.index(0)]) == tuple(params[2].shape)
    with pytest.raises(TypeError, match="base_cls"):
        ProtectedOptimizerFromParams(params, ProtectedOptimizer)
    with pytest.raises(TypeError, match="base_cls"):
        ProtectedOptimizerFromParams(params, object)


def test_find_protected_optimizer_through_wrappers():
    model, samples = model_and_samples()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples})

    class Outer:
        def __init__(self, inner, attr):
            setattr(self, attr, inner)

    assert find_protected_optimizer(opt) is opt
    assert find_protected_optimizer(Outer(Outer(opt, "_optimizer"), "optimizer")) is opt
    assert find_protected_optimizer(opt.base_optimizer) is None
    assert find_protected_optimizer(None) is None


def test_flatten_report_and_accumulator():
    assert flatten_report({"a": {"cosine": 0.5, "conflict": True, "note": "x"}}) == {
        "gradsafe/a/cosine": 0.5, "gradsafe/a/conflict": 1.0}
    model, samples = model_and_samples()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {"old": samples}, mode="conflict")
    acc = ReportAccumulator()
    assert not acc.update(opt)  # no step yet
    seen = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        assert acc.update(opt)
        assert not acc.update(opt)  # the same step is recorded once
        seen.append(opt.report["old"]["cosine"])
    out = acc.pop()
    assert out["gradsafe/old/cosine"] == pytest.approx(sum(seen) / 3)
    assert acc.pop() == {}
