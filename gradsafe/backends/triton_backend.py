"""The Triton backend: the whole step in three fused launches, no host synchronisation.

``TritonBackend.run`` has the semantics of ``TorchBackend.run``: it changes the covered
tensors in place and returns the coefficients (the plan's flat layout, float64) and the
weights (the weights layout, float64, or None when no objective acts) as *device* tensors;
``StepRecord`` converts them on the host only when a report is asked for.

Per step: one ``reduce`` launch per gradient dtype, one ``finalize`` launch (which solves the
joint rule on the device), one ``apply`` launch per gradient dtype (skipped when nothing
changes). Fallbacks, each documented in docs/kernels.md:

- a rule component larger than the device limits (``KernelConfig.max_rule_columns``,
  ``max_refs``) is solved by the host rule: one device-to-host transfer per step;
- a gradient that is not contiguous, or not float32 / bfloat16 / float16, is worked on in a
  contiguous copy (float32 when its dtype is not one of these) that is written back.

The per-plan tables (``gradsafe.kernels.layout``) are cached on the plan object, keyed by
device, basis dtype and configuration.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..plan import Plan
from .base import StepRecord

__all__ = ["TritonBackend", "triton_unavailable_reason"]

_CACHE_ATTR = "_gradsafe_triton_layouts"


def triton_unavailable_reason() -> str | None:
    """None if ``gradsafe.kernels`` imports, else why not."""
    try:
        import gradsafe.kernels  # noqa: F401
    except ImportError as exc:  # triton missing (or broken)
        return f"triton cannot be imported ({exc}); install it (pip install triton) or use backend='torch'"
    return None


class TritonBackend:
    """Fused Triton kernels for the surgery.

    Args:
        basis_dtype: how the kernels store the rows (basis, references): ``torch.float32``
            (default: the plan's own row storage, no copy) or ``torch.bfloat16`` (a padded
            copy, half the bytes; the rule is then solved for the rounded rows, so the
            result is orthogonal to the stored basis).
        config: a ``gradsafe.kernels.KernelConfig`` (launch geometry, device-rule limits).
        force_host_rule: solve the rule on the host every step (a test and debugging aid).
    """

    name = "triton"

    def __init__(self, basis_dtype: torch.dtype = torch.float32, config=None, force_host_rule: bool = False) -> None:
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='triton' is not available: {reason}")
        from .. import kernels

        if basis_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"basis_dtype must be torch.float32 or torch.bfloat16, got {basis_dtype}")
        self._k = kernels
        self.basis_dtype = basis_dtype
        self.config = config if config is not None else kernels.KernelConfig()
        self.force_host_rule = bool(force_host_rule)
        self.last_host_rule = False  # whether the last step solved the rule on the host

    # ------------------------------------------------------------------ checks and layout
    def check_device(self, device: torch.device) -> None:
        """Raise if the kernels cannot run on tensors of ``device``."""
        device = torch.device(device)
        if device.type == "cpu":
            if not self._k.INTERPRETED:
                raise RuntimeError(
                    "backend='triton' with CPU tensors runs only under the Triton interpreter: set "
                    "TRITON_INTERPRET=1 before gradsafe.kernels is first imported (it is slow: for tests), "
                    "or use backend='torch' / backend=None (auto) on CPU"
                )
        elif device.type == "cuda":
            if self._k.INTERPRETED:
                raise RuntimeError(
                    "gradsafe.kernels was imported with TRITON_INTERPRET=1 (the interpreter runs on CPU "
                    "tensors only); unset it before the first import to run the kernels on CUDA tensors"
                )
        else:
            raise RuntimeError(f"backend='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device}")

    def layout(self, plan: Plan):
        cache = getattr(plan, _CACHE_ATTR, None)
        if cache is None:
            cache = {}
            setattr(plan, _CACHE_ATTR, cache)
        key = (str(plan.device), self.basis_dtype, self.config)
        lay = cache.get(key)
        if lay is None:
            self.check_device(plan.device)
            lay = self._k.build_layout(plan, self.basis_dtype, self.config, plan.device)
            cache[key] = lay
        return lay

    # ------------------------------------------------------------------ the step
    def _gtab(self, lay, work: list[torch.Tensor]) -> torch.Tensor:
        addrs = tuple(w.data_ptr() for w in work)
        if lay.gtab_cache is not None and lay.gtab_cache[0] == addrs:
            return lay.gtab_cache[1]
        rows = [(a, int(ok and a % 16 == 0)) for a, ok in zip(addrs, lay.static_aligned)]
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        if lay.device.type == "cuda":
            gtab = host.pin_memory().to(lay.device, non_blocking=True)
        else:
            gtab = host
        lay.gtab_cache = (addrs, gtab)
        return gtab

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
        k = self._k
        lay = self.layout(plan)
        if len(tensors) != plan.num_tensors:
            raise ValueError(f"expected {plan.num_tensors} tensors, got {len(tensors)}")
        work: list[torch.Tensor] = []
        writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t, n in zip(tensors, lay.numels):
            if t.device != lay.device:
                raise ValueError(f"tensor on {t.device}, plan on {lay.device}")
            if t.numel() != n:
                raise ValueError(f"tensor of {t.numel()} elements where the plan expects {n}")
            if t.dtype in k.DTYPE_CODES and t.is_contiguous():
                work.append(t)
            else:
                dt = t.dtype if t.dtype in k.DTYPE_CODES else torch.float32
                w = t.detach().to(dtype=dt, memory_format=torch.contiguous_format, copy=True)
                work.append(w)
                writeback.append((t, w))
        codes = tuple(k.DTYPE_CODES[w.dtype] for w in work)
        groups = lay.tiles_for(codes)
        gtab = self._gtab(lay, work)

        dev = lay.device
        part = torch.empty(lay.n_part, dtype=torch.float32, device=dev)
        coefs = torch.empty(plan.coef_numel, dtype=torch.float64, device=dev)
        zbuf = torch.empty(lay.num_columns, dtype=torch.float64, device=dev)
        acting = lay.acting
        weights = torch.empty(max(plan.weight_numel, 1), dtype=torch.float64, device=dev)
        for code, (red, _app) in groups.items():
            if red is not None:
                k.launch_reduce(lay, red, gtab, part, code)
        on_device = acting and lay.device_rule and not self.force_host_rule
        k.launch_finalize(lay, part, coefs, weights, zbuf, plan.weight_numel, with_rule=on_device)
        self.last_host_rule = acting and not on_device
        if self.last_host_rule:
            host = coefs.cpu().numpy()  # the fallback's one device-to-host transfer
            w = lay.rule.solve(host)
            weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).to(dev)
            if weights.numel() == 0:
                weights = torch.zeros(1, dtype=torch.float64, device=dev)
        for code, (_red, app) in groups.items():
            if app is not None:
                k.launch_apply(lay, app, gtab, weights, code)
        for t, w in writeback:
            t.copy_(w.view_as(t))
        return StepRecord(coefs=coefs, weights=weights[: plan.weight_numel] if acting else None)


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
