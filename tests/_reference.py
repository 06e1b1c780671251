"""The reference for a whole ProtectedOptimizer configuration, built on ``gradsafe.surgery``.

Every objective's memory (over its covered parameters, packed in coverage order) is embedded
into full-length rows over the flat vector of all the optimizer's parameters (zeros
elsewhere); scope "tensor" gives one row per (tensor, row) so that each tensor's slice is
its own basis / constraint. Damping of several objectives is combined per entry in float64
as ``1 / (1 + sum_o lam_o F_hat_o)``; then ``joint_surgery`` is solved on the one flat vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradsafe.surgery import joint_surgery, normalize_fisher


def all_params(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def offsets_of(params: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    offs, total = [], 0
    for p in params:
        offs.append(total)
        total += p.numel()
    return offs, total


def flatten(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 flat vector; None counts as zeros."""
    parts = [
        torch.zeros(p.numel(), dtype=torch.float64) if t is None else t.detach().reshape(-1).double()
        for t, p in zip(tensors, params)
    ]
    return torch.cat(parts)


def unflatten(x: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    offs, _ = offsets_of(params)
    return [x[o : o + p.numel()].reshape(p.shape) for o, p in zip(offs, params)]


def embed_rows(obj, rows: torch.Tensor, offs: list[int], total: int, inactive=frozenset()) -> torch.Tensor:
    """Full-length float64 rows for an objective's rows (over its coverage); zero rows dropped.

    Parameters in ``inactive`` (no gradient this step) are left out of the problem: their
    columns stay zero.
    """
    rows = rows.double().reshape(-1, obj.numel)
    cols = [(offs[i], sl) for i, sl in zip(obj.coverage, obj.slices()) if i not in inactive]
    out = []
    if obj.config.scope == "global":
        for r in rows:
            full = torch.zeros(total, dtype=torch.float64)
            for off, sl in cols:
                full[off : off + sl.stop - sl.start] = r[sl]
            out.append(full)
    else:
        for off, sl in cols:
            for r in rows:
                full = torch.zeros(total, dtype=torch.float64)
                full[off : off + sl.stop - sl.start] = r[sl]
                out.append(full)
    out = [r for r in out if bool(r.abs().max() > 0)]
    return torch.stack(out) if out else torch.zeros(0, total, dtype=torch.float64)


def damping_multiplier(opt) -> torch.Tensor:
    params = all_params(opt)
    offs, total = offsets_of(params)
    excess = torch.zeros(total, dtype=torch.float64)
    for obj in opt.objectives.values():
        lam = float(obj.config.damping)
        if lam <= 0:
            continue
        f_hat = normalize_fisher(obj.fisher.double())
        for i, sl in zip(obj.coverage, obj.slices()):
            excess[offs[i] : offs[i] + sl.stop - sl.start] += lam * f_hat[sl]
    return 1.0 / (1.0 + excess)


def constraint_rows(opt, inactive=frozenset()) -> list[torch.Tensor]:
    """The embedded conflict constraints of every conflict objective."""
    params = all_params(opt)
    offs, total = offsets_of(params)
    out = []
    for obj in opt.objectives.values():
        if obj.config.mode != "conflict":
            continue
        rows = obj.mean_ref[None] if obj.config.references == "mean" else obj.sample_refs
        out.append(embed_rows(obj, rows, offs, total, inactive))
    return out


def reference_flat(opt, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, h): the expected flat float64 result, and the damped input it was computed from.

    A ``None`` gradient marks a parameter left out of the step (docs/architecture.md: the
    problem is restricted to the parameters that have a gradient); its entries stay 0.
    """
    params = all_params(opt)
    offs, total = offsets_of(params)
    inactive = frozenset(i for i, t in enumerate(grads) if t is None)
    g = flatten(grads, params)
    h = g * damping_multiplier(opt)
    bases = []
    for obj in opt.objectives.values():
        cfg = obj.config
        if cfg.mode == "project" and cfg.strength > 0:
            bases.append((embed_rows(obj, obj.basis, offs, total, inactive), float(cfg.strength)))
    x = joint_surgery(h, bases=bases, references=constraint_rows(opt, inactive))
    return x, h


def reference_grads(opt, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Expected per-parameter gradients, rounded to each parameter's dtype."""
    params = all_params(opt)
    x, _ = reference_flat(opt, grads)
    return [t.to(p.dtype) for t, p in zip(unflatten(x, params), params)]


def step_capture(opt, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Assign ``grads`` (cloned, strides kept) and step; return the grads the base optimizer saw."""
    params = all_params(opt)
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    seen = {}

    def hook(optimizer, args, kwargs):
        seen["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in params]

    handle = opt.base_optimizer.register_step_pre_hook(hook)
    try:
        opt.step()
    finally:
        handle.remove()
    return seen["grads"]
