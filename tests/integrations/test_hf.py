"""Hugging Face Trainer with the real transformers library, on a tiny random GPT-2 (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from ._linalg import flat, orthonormal, relative_overlap, snapshot
from ._tiny import TokenDataset, lm_batches, lm_loss, tiny_gpt2

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import gradsafe
from gradsafe import ProtectedOptimizer
from gradsafe.integrations import ProtectedOptimizerFromParams, find_protected_optimizer
from gradsafe.integrations.hf import GradsafeCallback, add_gradsafe_callback, protected_optimizer_cls_and_kwargs

STATS = ("cosine", "conflict", "energy_in_subspace", "energy_removed")


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        learning_rate=1e-2,
        max_grad_norm=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


@pytest.fixture(scope="module")
def protected():
    """A model and the gradient samples of an 'old' objective (tokens from the lower half)."""
    model = tiny_gpt2(0)
    samples = gradsafe.collect_gradients(model, lm_loss(model), lm_batches(3, low=0, high=32))
    return model.state_dict(), samples


def fresh_model(protected):
    state, samples = protected
    model = tiny_gpt2(1)
    model.load_state_dict(state)
    return model, samples


def test_optimizers_tuple_projects_and_scheduler_drives_base(tmp_path, protected):
    model, samples = fresh_model(protected)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1e-2), {"old": samples}, mode="project", rank=3)
    before = snapshot(params)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(),
                      optimizers=(opt, None), callbacks=[GradsafeCallback()])
    trainer.train()
    assert opt.gradsafe_steps == 3
    # Trainer built its (linear) scheduler on the wrapper; it drove the base optimizer's lr
    assert find_protected_optimizer(trainer.lr_scheduler.optimizer) is opt
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    assert opt.base_optimizer.param_groups[0]["lr"] < 1e-2
    delta = flat([p - b for p, b in zip(params, before)], params)
    Q = orthonormal(samples, params)
    assert delta.norm() > 1e-4
    assert relative_overlap(Q, delta) < 1e-4
    # the logs carry the report
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for stat in STATS:
            assert math.isfinite(h[f"gradsafe/old/{stat}"])
        assert h["gradsafe/old/energy_removed"] > 0


def test_optimizer_cls_and_kwargs_realigns_samples(tmp_path, protected):
    model, samples = fresh_model(protected)
    params = list(model.parameters())
    cls, kwargs = protected_optimizer_cls_and_kwargs(
        torch.optim.SGD, {"lr": 1e-2}, {"old": samples}, samples_from=model, mode="project", rank=3
    )
    assert cls is ProtectedOptimizerFromParams
    before = snapshot(params)
    trainer = Trainer(model=model, args=make_args(tmp_path, weight_decay=0.0), train_dataset=TokenDataset(),
                      optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    opt = find_protected_optimizer(trainer.optimizer)
    assert isinstance(opt, ProtectedOptimizerFromParams)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    # Trainer's own grouping (weight decay / no decay) is kept, so its order is not the model's
    groups = [g["params"] for g in opt.param_groups]
    assert len(groups) == 2
    order = [p for g in groups for p in g]
    assert [id(p) for p in order] != [id(p) for p in params]
    assert opt.gradsafe_steps == 3
    delta = flat([p - b for p, b in zip(params, before)], params)
    assert delta.norm() > 1e-4
    assert relative_overlap(orthonormal(samples, params), delta) < 1e-4


def test_samples_without_alignment_source_are_refused(protected):
    model, samples = fresh_model(protected)
    cls, kwargs = protected_optimizer_cls_and_kwargs(torch.optim.SGD, {"lr": 1e-2}, {"old": samples})
    with pytest.raises(TypeError, match="samples_from"):
        cls([{"params": list(model.parameters())}], **kwargs)
    with pytest.raises(TypeError, match="model"):
        protected_optimizer_cls_and_kwargs(torch.optim.SGD, {"lr": 1e-2}, {"old": samples}, model=model)


class CaptureStep(TrainerCallback):
    """Records, per optimizer step, the gradients Trainer hands to optimizer.step() and the lr."""

    def __init__(self, params):
        self.params = params
        self.grads, self.lrs, self.before, self.after, self.backwards = [], [], [], [], 0
        for p in params:
            p.register_hook(self._count)

    def _count(self, g):
        self.backwards += 1
        return g

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])
        self.lrs.append(find_protected_optimizer(optimizer).param_groups[0]["lr"])
        self.before.append(snapshot(self.params))

    def on_optimizer_step(self, args, state, control, **kw):
        self.after.append(snapshot(self.params))


def test_accumulation_and_clipping_surgery_once_per_step_on_clipped_gradient(tmp_path, protected):
    model, samples = fresh_model(protected)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1e-1), {"old": samples}, mode="project", rank=3)
    capture = CaptureStep(params)
    max_norm = 0.05
    trainer = Trainer(model=model, args=make_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=max_norm,
                                                  lr_scheduler_type="constant", learning_rate=1e-1),
                      train_dataset=TokenDataset(), optimizers=(opt, None), callbacks=[capture])
    trainer.train()
    # 3 optimizer steps, 2 micro-batches each: 6 backward passes, 3 surgeries
    assert capture.backwards == 6 * len(params)
    assert opt.gradsafe_steps == 3
    Q = orthonormal(samples, params)
    for grads, lr, before, after in zip(capture.grads, capture.lrs, capture.before, capture.after):
        g = flat(grads, params)
        # Trainer clipped before optimizer.step() ...
        assert g.norm() <= max_norm * (1 + 1e-4)
        # ... and the surgery acted on exactly that accumulated, clipped gradient
        expected = -lr * (g - Q @ (Q.T @ g))
        delta = flat([a - b for a, b in zip(after, before)], params)
        assert torch.allclose(delta, expected, atol=1e-6, rtol=1e-3), float((delta - expected).abs().max())


def _train_for_resume(tmp_path, protected, *, objectives: bool, resume: str | None):
    model, samples = fresh_model(protected)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    grads = {"old": samples, "old-gem": samples} if objectives else None
    opt = ProtectedOptimizer(base, grads, rank=2)
    if objectives:
        opt.unprotect("old-gem")
        opt.protect("old-gem", samples, mode="conflict", references="samples")
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(tmp_path, protected):
    full_model, full_opt = _train_for_resume(tmp_path, protected, objectives=True, resume=None)
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # what Trainer does on resume
    assert set(saved["gradsafe"]["objectives"]) == {"old", "old-gem"}
    # the resumed run starts from a wrapper with *no* objectives: they come from the checkpoint
    resumed_model, resumed_opt = _train_for_resume(tmp_path, protected, objectives=False, resume=str(ckpt))
    assert set(resumed_opt.objectives) == {"old", "old-gem"}
    assert resumed_opt.gradsafe_steps == full_opt.gradsafe_steps == 6
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


class ReportPerStep(TrainerCallback):
    def __init__(self):
        self.reports = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.reports.append({k: dict(v) for k, v in find_protected_optimizer(optimizer).report.items()})


def test_callback_logs_the_mean_report_and_reaches_reporters_when_added_first(tmp_path, protected):
    model, samples = fresh_model(protected)
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), {"old": samples}, mode="conflict")
    recorder, per_step = Recorder(), ReportPerStep()
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=4, logging_steps=2),
                      train_dataset=TokenDataset(), optimizers=(opt, None), callbacks=[recorder, per_step])
    add_gradsafe_callback(trainer)
    with pytest.raises(ValueError):
        add_gradsafe_callback(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(per_step.reports) == 4
    for i, h in enumerate(logs):
        for stat in STATS:
            mean = sum(r["old"][stat] for r in per_step.reports[2 * i : 2 * i + 2]) / 2
            assert h[f"gradsafe/old/{stat}"] == pytest.approx(mean)
    # the recorder runs after the callback, so it saw the keys
    seen = [l for l in recorder.logs if "loss" in l]
    assert all("gradsafe/old/cosine" in l for l in seen)
    # the summary log at the end of training carries no report
    assert "gradsafe/old/cosine" not in trainer.state.log_history[-1]
