"""Fused Triton kernels for the surgery. Importing this package requires triton.

Shipped as ``gradsafe.kernels`` from the repository's top-level ``kernels/`` folder. It imports
only the standard library, torch and triton: what it needs from a plan and its rule (the
address tables, the rule's matrices, the dual's degeneracy threshold) reaches it as a
``KernelLayout``, which ``gradsafe.backends.triton_layout.build_layout`` fills.

``import gradsafe`` never imports this package; ``gradsafe.backends.get_backend("triton")``
does. Whether the kernels run natively or under the Triton interpreter is fixed when this
package is imported (``TRITON_INTERPRET=1`` then: interpreter, CPU tensors only).

- ``reduce``, ``finalize``, ``apply``: one ``@triton.jit`` kernel each (finalize solves the
  rule on the device); ``common``: their table layouts and shared helpers;
- ``layout``: the plain containers the launchers read (no triton needed);
- the launch functions below, which count launches (``launches``) for the tests and the
  benchmark's "launches per step" column.

See docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import apply, finalize, reduce
from .layout import DTYPE_CODES, KernelConfig, KernelLayout

__all__ = [
    "INTERPRETED",
    "KernelConfig",
    "KernelLayout",
    "DTYPE_CODES",
    "launch_reduce",
    "launch_finalize",
    "launch_apply",
    "launches",
    "TRITON_VERSION",
]

TRITON_VERSION = triton.__version__

#: True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = isinstance(reduce.reduce_kernel, InterpretedFunction)


class _Counter:
    """Kernel launches since the last reset, by kernel name."""

    def __init__(self) -> None:
        self.by_kernel: dict[str, int] = {}

    def add(self, name: str) -> None:
        self.by_kernel[name] = self.by_kernel.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def reset(self) -> None:
        self.by_kernel = {}


launches = _Counter()


def launch_reduce(layout: KernelLayout, tiles: torch.Tensor, gtab: torch.Tensor, part: torch.Tensor, g_code: int) -> None:
    """One reduce launch over ``tiles`` ((n, 2) int64) of gradients of dtype code ``g_code``: writes ``part``."""
    grid = (tiles.shape[0],)
    reduce.reduce_kernel[grid](
        tiles, layout.tens, gtab, layout.groups, part, layout.chunk,
        G_DT=g_code, U_DT=DTYPE_CODES[layout.rows_dtype],
        BLOCK=layout.block_reduce, RB=layout.rb_reduce, num_warps=layout.config.num_warps,
    )
    launches.add("reduce")


def launch_finalize(layout: KernelLayout, part: torch.Tensor, coefs: torch.Tensor, weights: torch.Tensor,
                    zbuf: torch.Tensor, n_weight: int, with_rule: bool) -> None:
    """One finalize launch: the coefficients into ``coefs``; with ``with_rule``, the device rule's
    weights into ``weights`` (``zbuf``: scratch, one float64 per rule column)."""
    cfg = layout.config
    n_coef = coefs.shape[0]
    n_inst = layout.n_inst if with_rule else 0
    grid = (n_inst + triton.cdiv(n_coef, layout.cb),)
    finalize.finalize_kernel[grid](
        part, layout.coef_tab, coefs, weights, n_coef, n_weight,
        layout.inst_tab, layout.col_tab, layout.pool, zbuf, n_inst,
        CB=layout.cb, JB=layout.jb, CJ=cfg.col_block, MAXR=layout.maxr, HAS_R=layout.has_r,
        SWEEPS=cfg.sweeps, ROUNDS=cfg.rounds, ZERO_W=with_rule, DEGEN=layout.degenerate, num_warps=4,
    )
    launches.add("finalize")


def launch_apply(layout: KernelLayout, tiles: torch.Tensor, gtab: torch.Tensor, weights: torch.Tensor, g_code: int) -> None:
    """One apply launch over ``tiles`` of gradients of dtype code ``g_code``: changes them in place."""
    grid = (tiles.shape[0],)
    apply.apply_kernel[grid](
        tiles, layout.tens, gtab, layout.apply_groups, weights, layout.chunk,
        G_DT=g_code, U_DT=DTYPE_CODES[layout.rows_dtype],
        BLOCK=layout.block_apply, RB=layout.rb_apply, num_warps=layout.config.num_warps,
    )
    launches.add("apply")
