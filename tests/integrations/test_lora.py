"""PEFT/LoRA-like training: protecting only a subset of the parameters (hand-written LoRA on GPT-2)."""

from __future__ import annotations

import pytest
import torch

import gradsafe
from gradsafe import ProtectedOptimizer
from gradsafe.integrations import align_samples
from ._linalg import flat, orthonormal, relative_overlap, snapshot
from ._tiny import lm_batches, lm_loss, tiny_gpt2


class LoRA(torch.nn.Module):
    """y = base(x) + scale * x A^T B^T around GPT-2's Conv1D (weight: in x out)."""

    def __init__(self, base, r: int = 4, scale: float = 2.0):
        super().__init__()
        self.base = base
        n_in, n_out = base.weight.shape
        self.A = torch.nn.Parameter(torch.randn(r, n_in) / n_in**0.5)
        self.B = torch.nn.Parameter(torch.randn(n_out, r) * 0.01)  # not 0, so A has a gradient
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)


def lora_gpt2(seed: int = 0):
    model = tiny_gpt2(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed + 10)
    for block in model.transformer.h:
        block.attn.c_attn = LoRA(block.attn.c_attn)
    adapters = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    assert all(p.requires_grad for p in adapters) and len(adapters) == 4
    return model, adapters


def train(model, opt, steps: int = 3, seed: int = 7):
    for ids in lm_batches(steps, seed=seed, low=32, high=64):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_optimizer_over_adapters_only_frozen_base_untouched():
    model, adapters = lora_gpt2()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # samples collected over the whole model: None for every frozen parameter ...
    samples = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, low=0, high=32))
    assert all(s[i] is None for s in samples for i, p in enumerate(model.parameters()) if not p.requires_grad)
    # ... re-aligned to an optimizer that holds only the adapters
    aligned = align_samples(samples, model, adapters)
    opt = ProtectedOptimizer(torch.optim.SGD(adapters, lr=0.5), {"old": aligned}, rank=3)
    frozen_before, before = snapshot(frozen), snapshot(adapters)
    train(model, opt)
    assert opt.gradsafe_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(frozen, frozen_before))
    assert all(p.grad is None for p in frozen)
    delta = flat([p - b for p, b in zip(adapters, before)], adapters)
    assert delta.norm() > 1e-4
    assert relative_overlap(orthonormal(aligned, adapters), delta) < 1e-4


def test_alignment_refuses_a_gradient_the_optimizer_does_not_hold():
    model, adapters = lora_gpt2()
    params = list(model.parameters())
    sample = [torch.zeros_like(p) if p.requires_grad else None for p in params]
    first_frozen = next(i for i, p in enumerate(params) if not p.requires_grad)
    sample[first_frozen] = torch.ones_like(params[first_frozen])
    with pytest.raises(ValueError, match="does not hold"):
        align_samples(sample, model, adapters)


def test_objective_covering_adapters_while_optimizer_holds_everything():
    """Base weights trainable and in the optimizer, but only the adapters are protected."""
    model, adapters = lora_gpt2()
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    adapter_ids = {id(p) for p in adapters}
    full = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, low=0, high=32))
    # cover the adapters only: None for every other parameter
    samples = [[g if id(p) in adapter_ids else None for p, g in zip(params, s)] for s in full]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=0.5), {"adapters": samples}, rank=3)
    assert len(opt.objectives["adapters"].coverage) == len(adapters)

    ids = lm_batches(1, seed=7, low=32, high=64)[0]
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {id(p): p.grad.clone() for p in params}
    before = snapshot(params)
    opt.step()
    for p, b in zip(params, before):
        if id(p) not in adapter_ids:  # uncovered: the plain SGD step, untouched by the surgery
            assert torch.allclose(p - b, -0.5 * grads[id(p)], atol=1e-7)
    delta = flat([p - b for p, b in zip(adapters, [b for p, b in zip(params, before) if id(p) in adapter_ids])], adapters)
    cov = [[g for p, g in zip(params, s) if id(p) in adapter_ids] for s in samples]
    assert delta.norm() > 1e-5
    assert relative_overlap(orthonormal(cov, adapters), delta) < 1e-4


def test_closure_objective_on_adapters_only():
    model, adapters = lora_gpt2()
    old = lm_batches(1, seed=3, low=0, high=32)[0]
    old_loss = lambda: model(input_ids=old, labels=old).loss  # noqa: E731
    opt = ProtectedOptimizer(torch.optim.SGD(adapters, lr=0.5), {"old": old_loss}, mode="conflict", refresh_every=1)
    assert len(opt.objectives["old"].coverage) == len(adapters)
    conflicts = 0
    for ids in lm_batches(4, seed=7, low=32, high=64):
        r = flat(torch.autograd.grad(old_loss(), adapters), adapters)  # what the refresh sees
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        g = flat([p.grad for p in adapters], adapters)
        before = snapshot(adapters)
        opt.step()
        delta = flat([p - b for p, b in zip(adapters, before)], adapters)
        conflicts += int(float(g @ r) < 0)  # the plain step -lr*g would raise the old loss
        # first order, the step never raises the protected loss: <delta, r> <= 0
        assert float(delta @ r) <= 1e-6 * float(delta.norm() * r.norm())
    assert opt.gradsafe_steps == 4
    assert conflicts > 0  # the constraint was active at least once
