"""PyTorch Lightning (real library, CPU): automatic and manual optimization, resume, logging."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import gradsafe
from gradsafe import ProtectedOptimizer
from gradsafe.integrations.lightning import GradsafeLightningCallback
from ._linalg import flat, orthonormal, relative_overlap, snapshot

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def old_samples(net):
    g = torch.Generator().manual_seed(1)
    xo, yo = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    loss = lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1])  # noqa: E731
    return gradsafe.collect_gradients(net, loss, [(xo[i : i + 8], yo[i : i + 8]) for i in range(0, 24, 8)])


class Module(pl.LightningModule):
    def __init__(self, manual: bool = False, protect: bool = True, base: str = "sgd", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
        self.automatic_optimization = not manual
        self.samples = old_samples(self.net)
        self.protect = protect
        self.base = base
        self.steps_seen = []

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.steps_seen.append(opt.optimizer.gradsafe_steps)
            return None
        return loss

    def configure_optimizers(self):
        if self.base == "sgd":
            base = torch.optim.SGD(self.net.parameters(), lr=0.1)
        else:
            base = torch.optim.Adam(self.net.parameters(), lr=0.01)
        grads = {"old": self.samples} if self.protect else None
        opt = ProtectedOptimizer(base, grads, rank=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return pl.Trainer(**args)


def loader():
    return torch.utils.data.DataLoader(make_data(), batch_size=8, shuffle=False)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_surgery_applies_in_automatic_and_manual_optimization(tmp_path, manual):
    module = Module(manual=manual)
    params = list(module.net.parameters())
    Q = orthonormal(module.samples, params)
    before = snapshot(params)
    t = trainer(tmp_path, max_steps=4)
    t.fit(module, loader())
    opt = t.optimizers[0]
    assert isinstance(opt, ProtectedOptimizer)
    assert opt.gradsafe_steps == 4
    if manual:
        assert module.steps_seen == [1, 2, 3, 4]
    delta = flat([p - b for p, b in zip(params, before)], params)
    assert delta.norm() > 1e-3
    assert relative_overlap(Q, delta) < 1e-4
    # the interval="step" scheduler drove the base optimizer (manual: Lightning leaves it to the user)
    expected_lr = 0.1 * 0.5**2 if not manual else 0.1
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_automatic_optimization_surgery_sees_clipped_accumulated_gradient(tmp_path, monkeypatch):
    module = Module()
    params = list(module.net.parameters())
    Q = orthonormal(module.samples, params)

    # accumulate 2 batches per optimizer step, clip to a small norm
    t = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.01)
    grads_at_step = []
    original = ProtectedOptimizer.step

    def spy(self, closure=None):
        def wrapped():
            out = closure()
            grads_at_step.append([None if p.grad is None else p.grad.clone() for p in params])
            return out
        before = snapshot(params)
        lr = self.param_groups[0]["lr"]
        result = original(self, wrapped)
        after = snapshot(params)
        grads_at_step[-1] = (grads_at_step[-1], lr, before, after)
        return result

    monkeypatch.setattr(ProtectedOptimizer, "step", spy)
    t.fit(module, loader())
    opt = t.optimizers[0]
    assert opt.gradsafe_steps == 2 and len(grads_at_step) == 2
    for grads, lr, before, after in grads_at_step:
        g = flat(grads, params)
        assert g.norm() <= 0.01 * (1 + 1e-4)  # Lightning clipped inside the closure, before the surgery
        expected = -lr * (g - Q @ (Q.T @ g))
        delta = flat([a - b for a, b in zip(after, before)], params)
        assert torch.allclose(delta, expected, atol=1e-7, rtol=1e-4)


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    full = Module(base="adam")
    trainer(tmp_path / "a", max_epochs=2).fit(full, loader())

    first = Module(base="adam")
    t1 = trainer(tmp_path / "b", max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "first.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert "gradsafe" in saved["optimizer_states"][0]

    # a fresh module whose optimizer protects nothing: the objectives come from the checkpoint
    resumed = Module(base="adam", protect=False, seed=3)
    t2 = trainer(tmp_path / "c", max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=str(ckpt))
    opt = t2.optimizers[0]
    assert set(opt.objectives) == {"old"}
    assert opt.gradsafe_steps == 8
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


def test_callback_logs_the_report(tmp_path):
    module = Module()
    logger = CSVLogger(str(tmp_path), name="logs")
    t = trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2,
                callbacks=[GradsafeLightningCallback()])
    t.fit(module, loader())
    opt = t.optimizers[0]
    assert opt.gradsafe_steps == 4
    for stat in ("cosine", "conflict", "energy_in_subspace", "energy_removed"):
        assert t.callback_metrics[f"gradsafe/old/{stat}"] == pytest.approx(opt.report["old"][stat])
    with open(logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradsafe/old/cosine")]
    assert len(rows) == 4  # one row per optimizer step, not per batch (8 batches)
    assert all(0.0 <= float(r["gradsafe/old/energy_removed"]) <= 1.0 + 1e-6 for r in rows)
