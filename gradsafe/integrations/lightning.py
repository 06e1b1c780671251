"""PyTorch Lightning: a callback that logs the interference report.

Importing this module imports ``lightning``. A ``ProtectedOptimizer`` needs nothing else to
work in Lightning: return it from ``configure_optimizers`` (alone, in a list, or in the dict
form with a scheduler). Automatic optimization calls ``optimizer.step(closure=...)``; the
wrapper runs that closure (forward, backward, Lightning's gradient clipping) first, then the
surgery, then the base step, so the surgery sees the clipped gradient. Manual optimization
(``self.optimizers().step()`` after ``self.manual_backward``) runs the same surgery.
Checkpoints carry the objectives' memory inside the optimizer state.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ._common import find_protected_optimizer, flatten_report

__all__ = ["GradsafeLightningCallback"]


class GradsafeLightningCallback(pl.Callback):
    """Logs ``"<prefix>/<objective>/<stat>"`` after every optimizer step that ran the surgery.

    The values are the report of that step (Lightning's logger writes them every
    ``log_every_n_steps``, like any step metric). Under gradient accumulation only the batches
    that ended with an optimizer step log. With several ``ProtectedOptimizer`` instances the
    keys are ``"<prefix>/optimizer_<i>/<objective>/<stat>"``, ``i`` the optimizer's index in
    ``trainer.optimizers``. ``on_epoch=True`` also logs the epoch mean (Lightning's reduction).
    """

    def __init__(self, prefix: str = "gradsafe", on_epoch: bool = False, prog_bar: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        self.on_epoch = on_epoch
        self.prog_bar = prog_bar
        self._seen: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        protected = []
        for i, optimizer in enumerate(trainer.optimizers):
            opt = find_protected_optimizer(optimizer)
            if opt is not None:
                protected.append((i, opt))
        values: dict[str, float] = {}
        for i, opt in protected:
            if opt.gradsafe_steps == 0 or self._seen.get(id(opt)) == opt.gradsafe_steps:
                continue
            self._seen[id(opt)] = opt.gradsafe_steps
            prefix = self.prefix if len(protected) == 1 else f"{self.prefix}/optimizer_{i}"
            values.update(flatten_report(opt.report, prefix))
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=self.on_epoch, prog_bar=self.prog_bar, logger=True)
