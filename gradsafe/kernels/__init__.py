"""Fused Triton kernels for the surgery. Importing this package requires triton.

``import gradsafe`` never imports this package; ``gradsafe.backends.get_backend("triton")``
does. Whether the kernels run natively or under the Triton interpreter is fixed when this
package is imported (``TRITON_INTERPRET=1`` then: interpreter, CPU tensors only).

- ``surgery``: the ``@triton.jit`` kernels (reduce, finalize with the device rule, apply);
- ``layout``: the per-plan tables they read (no triton needed);
- the launch functions below, which count launches (``launches``) for the tests and the
  benchmark's "launches per step" column.

See docs/kernels.md.
"""

from __future__ import annotations

import triton
from triton.runtime.interpreter import InterpretedFunction

from ..qp import DEGENERATE
from . import surgery
from .layout import DTYPE_CODES, KernelConfig, KernelLayout, build_layout

__all__ = [
    "INTERPRETED",
    "KernelConfig",
    "KernelLayout",
    "build_layout",
    "DTYPE_CODES",
    "launch_reduce",
    "launch_finalize",
    "launch_apply",
    "launches",
    "TRITON_VERSION",
]

TRITON_VERSION = triton.__version__

#: True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = isinstance(surgery.reduce_kernel, InterpretedFunction)


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


def launch_reduce(layout: KernelLayout, tiles, gtab, part, g_code: int) -> None:
    grid = (tiles.shape[0],)
    surgery.reduce_kernel[grid](
        tiles, layout.tens, gtab, layout.groups, part, layout.chunk,
        G_DT=g_code, U_DT=DTYPE_CODES[layout.rows_dtype],
        BLOCK=layout.block_reduce, RB=layout.rb_reduce, num_warps=layout.config.num_warps,
    )
    launches.add("reduce")


def launch_finalize(layout: KernelLayout, part, coefs, weights, zbuf, n_weight: int, with_rule: bool) -> None:
    cfg = layout.config
    n_coef = coefs.shape[0]
    n_inst = layout.n_inst if with_rule else 0
    grid = (n_inst + triton.cdiv(n_coef, layout.cb),)
    surgery.finalize_kernel[grid](
        part, layout.coef_tab, coefs, weights, n_coef, n_weight,
        layout.inst_tab, layout.col_tab, layout.pool, zbuf, n_inst,
        CB=layout.cb, JB=layout.jb, CJ=cfg.col_block, MAXR=layout.maxr, HAS_R=layout.has_r,
        SWEEPS=cfg.sweeps, ROUNDS=cfg.rounds, ZERO_W=with_rule, DEGEN=DEGENERATE, num_warps=4,
    )
    launches.add("finalize")


def launch_apply(layout: KernelLayout, tiles, gtab, weights, g_code: int) -> None:
    grid = (tiles.shape[0],)
    surgery.apply_kernel[grid](
        tiles, layout.tens, gtab, layout.apply_groups, weights, layout.chunk,
        G_DT=g_code, U_DT=DTYPE_CODES[layout.rows_dtype],
        BLOCK=layout.block_apply, RB=layout.rb_apply, num_warps=layout.config.num_warps,
    )
    launches.add("apply")
