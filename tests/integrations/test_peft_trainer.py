"""The real ``peft`` library under Hugging Face Trainer, and an objective added in the middle of a run.

Tiny random GPT-2 (built from a config, nothing downloaded) with peft's LoRA on ``c_attn``;
Trainer builds the optimizer over the trainable (LoRA) parameters only.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradsafe
from gradsafe.integrations import align_samples, find_protected_optimizer
from gradsafe.integrations.hf import (
    add_gradsafe_callback,
    protected_optimizer_cls_and_kwargs,
    protected_optimizer_from_kwargs,
)
from ._linalg import flat, orthonormal, relative_overlap, snapshot
from ._tiny import TokenDataset, lm_batches, lm_loss, tiny_gpt2

LR = 0.5


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def lora_gpt2(seed: int = 0):
    """peft LoRA (r=4) on both blocks' ``c_attn``; the base weights are frozen by peft."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_gpt2(seed), config)
    torch.manual_seed(seed + 10)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, where A has no gradient yet
            torch.nn.init.normal_(p, std=0.02)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    return model, list(trainable.values())


class CaptureStep(TrainerCallback):
    """Per optimizer step: the gradients handed to optimizer.step(), the parameters around it, the report."""

    def __init__(self, params):
        self.params = params
        self.grads, self.before, self.after, self.reports = [], [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])
        self.before.append(snapshot(self.params))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.after.append(snapshot(self.params))
        self.reports.append({k: dict(v) for k, v in find_protected_optimizer(optimizer).report.items()})

    def deltas(self):
        return [flat([a - b for a, b in zip(after, before)], self.params) for before, after in zip(self.before, self.after)]


def test_peft_lora_trainer_conflict_objective_keeps_the_old_loss_from_rising(tmp_path):
    model, lora = lora_gpt2()
    # samples over the whole peft model: None for every frozen base weight
    samples = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, low=0, high=32))
    params = list(model.parameters())
    assert all(s[i] is None for s in samples for i, p in enumerate(params) if not p.requires_grad)
    cls, kwargs = protected_optimizer_cls_and_kwargs(torch.optim.SGD, {"lr": LR}, {"old": samples},
                                                     samples_from=model, mode="conflict")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = snapshot(lora)
    capture = CaptureStep(lora)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(low=32, high=64),
                      optimizer_cls_and_kwargs=(cls, kwargs), callbacks=[capture])
    add_gradsafe_callback(trainer)
    trainer.train()

    opt = find_protected_optimizer(trainer.optimizer)
    assert opt.gradsafe_steps == 6 and len(capture.deltas()) == 6
    # Trainer gave the optimizer exactly the LoRA parameters
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in lora)
    # only the LoRA parameters changed
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(p, b) for p, b in zip(lora, lora_before))
    # the report is in Trainer's logs, one entry per step (logging_steps=1)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    for h in logs:
        assert h["gradsafe/old/conflict"] in (0.0, 1.0)
        assert math.isfinite(h["gradsafe/old/cosine"])

    # the surgery: A-GEM against r = the mean of the LoRA samples
    r = torch.stack([flat(s, lora) for s in align_samples(samples, model, lora)]).mean(0)
    conflicts = 0
    for grads, delta, h in zip(capture.grads, capture.deltas(), logs):
        g = flat(grads, lora)
        conflict = float(g @ r) < 0
        conflicts += conflict
        assert h["gradsafe/old/conflict"] == float(conflict)
        # first order, the update never raises the old loss: <-delta, r> >= 0
        assert float(-delta @ r) >= -1e-6 * float(delta.norm() * r.norm())
        # and it is exactly SGD on the A-GEM gradient g - min(0, <g, r>) / |r|^2 r
        expected = -LR * (g - min(0.0, float(g @ r)) / float(r @ r) * r)
        assert torch.allclose(delta, expected, atol=1e-7, rtol=1e-4), float((delta - expected).abs().max())
    assert conflicts > 0  # the constraint was active: without it those steps would raise the old loss


class ProtectAtStep(TrainerCallback):
    """At the end of optimizer step ``step``, protect ``samples`` (aligned with ``model``) as ``name``."""

    def __init__(self, step: int, name: str, samples, model, **options):
        self.step, self.name, self.samples, self.model, self.options = step, name, samples, model, options
        self.objective = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            opt = protected_optimizer_from_kwargs(kwargs)
            self.objective = opt.protect(self.name, align_samples(self.samples, self.model, opt), **self.options)


def test_objective_added_by_a_callback_acts_from_the_next_step(tmp_path):
    model, lora = lora_gpt2()
    old = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, seed=100, low=0, high=32))
    late = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, seed=200, low=16, high=48))
    N = 2
    cls, kwargs = protected_optimizer_cls_and_kwargs(torch.optim.SGD, {"lr": LR}, {"old": old},
                                                     samples_from=model, mode="project", rank=3)
    capture, adder = CaptureStep(lora), ProtectAtStep(N, "late", late, model, mode="project", rank=3)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(low=32, high=64),
                      optimizer_cls_and_kwargs=(cls, kwargs), callbacks=[capture, adder])
    add_gradsafe_callback(trainer)
    trainer.train()

    opt = find_protected_optimizer(trainer.optimizer)
    assert adder.objective is not None and opt.objectives["late"] is adder.objective
    assert opt.gradsafe_steps == 6
    # the report: "late" from step N+1 on, "old" throughout
    assert [set(r) for r in capture.reports] == [{"old"}] * N + [{"old", "late"}] * (6 - N)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [("gradsafe/late/energy_removed" in h) for h in logs] == [False] * N + [True] * (6 - N)
    assert all(h["gradsafe/late/energy_removed"] > 0 for h in logs[N:])
    # it acts: every step is orthogonal to the old span, and to the late span exactly from step N+1
    Q_old = orthonormal(align_samples(old, model, lora), lora)
    Q_late = orthonormal(align_samples(late, model, lora), lora)
    for i, delta in enumerate(capture.deltas()):
        assert delta.norm() > 1e-5
        assert relative_overlap(Q_old, delta) < 1e-4
        if i < N:
            assert relative_overlap(Q_late, delta) > 1e-2  # not protected yet: the step moves along it
        else:
            assert relative_overlap(Q_late, delta) < 1e-4, i


def test_protected_optimizer_from_kwargs_refuses_what_is_not_there():
    with pytest.raises(LookupError, match="no optimizer"):
        protected_optimizer_from_kwargs({"optimizer": None})
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(LookupError, match="not a ProtectedOptimizer"):
        protected_optimizer_from_kwargs({"optimizer": plain})
