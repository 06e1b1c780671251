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
- a plan with factored parts (scope "factored") runs on the torch backend: its work is
  matmuls, which cuBLAS does through torch;
- a gradient that is not contiguous, or not float32 / bfloat16 / float16, is worked on in a
  contiguous copy (float32 when its dtype is not one of these) that is written back; a
  float64 gradient gets only the copy's change added back (float32 arithmetic), so what the
  step does not change keeps its float64 value.

The per-plan tables (``gradsafe.backends.triton_layout.build_layout``, into the kernels'
``KernelLayout``) are cached on the plan object, keyed by device, basis dtype and
configuration.
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import Plan
from .base import StepRecord

__all__ = ["TritonBackend", "triton_unavailable_reason"]

def triton_unavailable_reason() -> str | None:
    """None if ``gradsafe.kernels`` imports, else why not."""
    try:
        import gradsafe.kernels  # noqa: F401
    except ImportError as exc:  # triton missing (or broken)
        return f"triton cannot be imported ({exc}); install it (pip install \"gradsafe[triton]\") or use backend='torch'"
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
        self._torch = None  # plans with factored parts run on the torch backend

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
        """The plan's ``TritonLayout`` for this backend's basis dtype and configuration (cached)."""
        key = ("triton", str(plan.device), self.basis_dtype, self.config)
        lay = plan.cache.get(key)
        if lay is None:
            self.check_device(plan.device)
            from .triton_layout import build_layout

            lay = build_layout(plan, self.basis_dtype, self.config, plan.device)
            plan.cache[key] = lay
        return lay

    # ------------------------------------------------------------------ the step
    def _tables(self, lay, tensors: list[torch.Tensor], ptrs, dts):
        """Per-step tables for these tensors (validated): (gradient table, tiles per dtype)."""
        k = self._k
        for t, n in zip(tensors, lay.numels):
            if t.device != lay.device:
                raise ValueError(f"tensor on {t.device}, plan on {lay.device}")
            if t.numel() != n:
                raise ValueError(f"tensor of {t.numel()} elements where the plan expects {n}")
        addr = np.asarray(ptrs, dtype=np.uint64).astype(np.int64)
        aligned = (addr % 16 == 0) & lay.static_aligned_np
        host = torch.from_numpy(np.stack([addr, aligned.astype(np.int64)], axis=1).reshape(-1, 2).copy())
        if lay.device.type == "cuda":
            gtab = host.pin_memory().to(lay.device, non_blocking=True)
        else:
            gtab = host
        return gtab, lay.tiles_for(tuple(k.DTYPE_CODES[d] for d in dts))

    def run(self, plan: Plan, tensors: list[torch.Tensor]) -> StepRecord:
        if plan.has_factored or plan.shard is not None:
            # factored operators and low-rank references are matmuls (cuBLAS through the torch
            # backend); sharded plans need the all-reduce of the coefficients (docs/kernels.md)
            if self._torch is None:
                from .torch_backend import TorchBackend

                self._torch = TorchBackend()
            self.last_host_rule = True
            return self._torch.run(plan, tensors)
        lay = self.layout(plan)
        dev = lay.device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):  # Triton launches on the current device
                return self._run(plan, lay, tensors)
        return self._run(plan, lay, tensors)

    def _run(self, plan: Plan, lay, tensors: list[torch.Tensor]) -> StepRecord:
        k = self._k
        if len(tensors) != plan.num_tensors:
            raise ValueError(f"expected {plan.num_tensors} tensors, got {len(tensors)}")
        # One pass over the tensors; the tables for a (addresses, dtypes, contiguity) seen
        # before are reused (training loops cycle through a few gradient buffers).
        meta = tuple([(t.data_ptr(), t.dtype, t.is_contiguous()) for t in tensors])
        entry = lay.step_cache.get(meta)
        writeback: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (tensor, copy, float64: copy before)
        work = tensors
        if entry is None:
            codes = k.DTYPE_CODES
            if all(c and d in codes for _, d, c in meta):
                entry = self._tables(lay, tensors, [m[0] for m in meta], [m[1] for m in meta])
                if len(lay.step_cache) >= 8:  # forget the oldest
                    lay.step_cache.pop(next(iter(lay.step_cache)))
                lay.step_cache[meta] = entry
            else:  # the copy path (not cached: the copies are new buffers every step)
                work = list(tensors)
                for i, (t, (_, d, c)) in enumerate(zip(tensors, meta)):
                    if c and d in codes:
                        continue
                    dt = d if d in codes else torch.float32
                    w = t.detach().to(dtype=dt, memory_format=torch.contiguous_format, copy=True)
                    work[i] = w
                    writeback.append((t, w, w.clone() if d == torch.float64 else None))
                entry = self._tables(lay, work, [w.data_ptr() for w in work], [w.dtype for w in work])
        gtab, groups = entry

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
            if not np.isfinite(host).all():
                # a non-finite gradient entry: the rule would spread it; the tensors are left as they came
                return StepRecord(coefs=coefs, weights=None, finite=False)
            w = lay.rule.solve(host)
            weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).to(dev)
            if weights.numel() == 0:
                weights = torch.zeros(1, dtype=torch.float64, device=dev)
            finite = True
        else:
            # decided on the device, no synchronisation: with a non-finite coefficient the
            # weights are zero, so the apply pass only damps (elementwise: nothing spreads)
            finite = torch.isfinite(coefs).all()
            if acting:
                weights = torch.where(finite, weights, torch.zeros((), dtype=weights.dtype, device=dev))
        for code, (_red, app) in groups.items():
            if app is not None:
                k.launch_apply(lay, app, gtab, weights, code)
        for t, w, before in writeback:
            if before is None:
                t.copy_(w.view_as(t))
            else:  # float64: add the step's change, not the float32 rounding of the rest
                t.add_((w - before).view_as(t))
        return StepRecord(coefs=coefs, weights=weights[: plan.weight_numel] if acting else None, finite=finite)
