"""SafeGrad (Yi et al. 2025) through Hugging Face Trainer, as docs/safegrad.md writes it.

Tiny random GPT-2 (built from a config, nothing downloaded) with peft's LoRA on ``c_attn``;
the alignment objective is ``gradsafe.kl_to_reference`` to a frozen copy of the model taken
before fine-tuning, protected with ``mode="conflict", refresh_every=1, rho=RHO``. The same run
without the objective (same seed, same data) is the comparison.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradsafe
from gradsafe.integrations.hf import add_gradsafe_callback
from ._linalg import flat, snapshot
from ._tiny import TokenDataset, lm_batches, tiny_gpt2

# peft starts LoRA at B = 0 and the gradients of this tiny model are small (norm ~0.04): a large
# SGD step moves the plain run's alignment KL measurably (~1e-2) in 6 steps
LR, STEPS, RHO = 10.0, 6, 0.1
DOCS = Path(__file__).resolve().parents[2] / "docs"


def make_args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0,
    )


def lora_gpt2(seed: int = 0):
    """peft LoRA (r=4) on both blocks' ``c_attn``, peft's own initialisation (B = 0: the model starts as the base)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_gpt2(seed), config)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 4
    return model, lora


class CaptureStep(TrainerCallback):
    """Per optimizer step: the task gradient, the alignment gradient at the same parameters, the update."""

    def __init__(self, params, alignment_loss):
        self.params, self.alignment_loss = params, alignment_loss
        self.task, self.alignment, self.before, self.after = [], [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.task.append(flat([p.grad for p in self.params], self.params))
        with torch.enable_grad():
            grads = torch.autograd.grad(self.alignment_loss(), self.params)
        self.alignment.append(flat(grads, self.params))
        self.before.append(snapshot(self.params))

    def on_optimizer_step(self, args, state, control, **kw):
        self.after.append(snapshot(self.params))

    def deltas(self):
        return [flat([a - b for a, b in zip(after, before)], self.params) for before, after in zip(self.before, self.after)]


def fine_tune(tmp_path, protected: bool):
    """Fine-tune on tokens 32..63; the alignment data (tokens 0..31) is what the aligned model must keep."""
    model, lora = lora_gpt2()
    aligned_copy = copy.deepcopy(model).eval()
    align_batches = [{"input_ids": ids} for ids in lm_batches(2, low=0, high=32)]
    alignment_loss = gradsafe.kl_to_reference(model, aligned_copy, align_batches)
    opt = gradsafe.ProtectedOptimizer(torch.optim.SGD(lora, lr=LR))
    if protected:
        opt.protect("alignment", closure=alignment_loss, mode="conflict", refresh_every=1, rho=RHO)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = snapshot(lora)
    capture = CaptureStep(lora, alignment_loss)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(low=32, high=64),
                      optimizers=(opt, None), callbacks=[capture])
    add_gradsafe_callback(trainer)
    trainer.train()
    with torch.no_grad():
        final_kl = float(alignment_loss())
    return dict(model=model, lora=lora, opt=opt, trainer=trainer, capture=capture, frozen=frozen,
                lora_before=lora_before, final_kl=final_kl)


def test_safegrad_recipe_under_trainer_keeps_the_alignment_kl_lower(tmp_path):
    plain = fine_tune(tmp_path / "plain", protected=False)
    safe = fine_tune(tmp_path / "safe", protected=True)
    assert safe["opt"].gradsafe_steps == STEPS and plain["trainer"].state.global_step == STEPS
    for run in (plain, safe):
        # only the LoRA weights moved
        for name, p in run["model"].named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, run["frozen"][name]), name
        assert all(not torch.equal(p, b) for p, b in zip(run["lora"], run["lora_before"]))

    opt = safe["opt"]
    # the alignment gradient was recomputed at every step after the first (which reads the registration's)
    assert opt.objectives["alignment"].num_refreshes == STEPS - 1
    logs = [h for h in safe["trainer"].state.log_history if "loss" in h]
    assert len(logs) == STEPS
    flags = [h["gradsafe/alignment/conflict"] for h in logs]
    assert set(flags) <= {0.0, 1.0} and all(math.isfinite(h["gradsafe/alignment/cosine"]) for h in logs)

    capture = safe["capture"]
    conflicts = 0
    for step, (g, r, delta, flag) in enumerate(zip(capture.task, capture.alignment, capture.deltas(), flags)):
        conflict = float(g @ r) < 0
        conflicts += conflict
        assert flag == float(conflict), step
        # SafeGrad with SGD: the task gradient projected off r when they conflict, plus rho r
        expected = -LR * (g - min(0.0, float(g @ r)) / float(r @ r) * r + RHO * r)
        assert torch.allclose(delta, expected, atol=1e-7, rtol=1e-4), (step, float((delta - expected).abs().max()))
        # to first order the step never raises the alignment KL
        assert float(delta @ r) <= 1e-6 * float(delta.norm() * r.norm()), step
    assert conflicts > 0  # the constraint acted

    # the fine-tuning moved the model away from the aligned one; the protected run much less
    assert plain["final_kl"] > 1e-3
    assert safe["final_kl"] < 0.5 * plain["final_kl"], (safe["final_kl"], plain["final_kl"])


def test_the_safegrad_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "safegrad.md").read_text(), re.S | re.M)
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "docs_safegrad"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"safegrad.md[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"safegrad.md, example {i} failed: {exc!r}\n{block}") from exc
