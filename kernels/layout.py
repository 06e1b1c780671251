"""The plain containers the launchers read: ``KernelConfig`` (launch geometry and device-rule
limits), ``KernelLayout`` (one plan's tables), the dtype codes. Torch only, no triton.

A ``KernelLayout`` fixes, for one plan, one device and one basis storage dtype:

- the tiles: each covered tensor is cut into ``chunk``-element tiles (the grid of the
  reduce and apply passes);
- the stored rows, reached through the row-group tables (addresses, strides);
- the partials buffer: first one ``|h|^2`` slot per tile, then per block an
  ``(r_b, tiles of its tensors)`` matrix, so that every sum the finalize pass makes (a
  global column: a whole row of it; a per-tensor coefficient: the tensor's range of a row)
  reads contiguous memory;
- the coefficient table (for the report's numbers), the rule's columns (where each sums its
  partials from and where its weight goes), the rule instances (one per independent
  component of the rule) with their precomputed ``K^+``, ``P2``, ``H`` in one float64 pool.

The tables are built from a plan by ``gradsafe.backends.triton_layout.build_layout``; their
column layouts are documented in common.py and docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["KernelConfig", "KernelLayout", "DTYPE_CODES", "next_pow2"]

#: dtype codes of gradients (``G_DT``) and stored rows (``U_DT``): common.DT_FP32, DT_BF16, DT_FP16
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    """Launch geometry and the limits of the device rule.

    chunk: elements per tile (rounded up to a multiple of the pass blocks).
    tile_elems: the register tile ``rows_block x BLOCK`` of the reduce / apply passes.
    rows_block: the most rows a pass holds at once (more rows loop).
    sum_block: the most partials a finalize sum reads per step (the step is the next power of
        two of the longest sum, up to this); finalize_tile: partials a program holds at once
        (coefficients per program = finalize_tile / step); col_block: rule columns per step
        of its matrix products.
    sweeps, rounds: the device conflict dual (several references): ``rounds`` times
        ``sweeps`` projected Gauss-Seidel sweeps, each round closed by an exact solve on the
        active set.
    max_rule_columns, max_refs: a component with more basis columns / references than this
        is solved by the host rule (one device-to-host transfer per step).
    num_warps: warps per program of the reduce / apply passes.
    """

    chunk: int = 16384
    tile_elems: int = 4096
    rows_block: int = 32
    sum_block: int = 256
    finalize_tile: int = 4096
    col_block: int = 16
    sweeps: int = 16
    rounds: int = 4
    max_rule_columns: int = 1024
    max_refs: int = 32
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("tile_elems", "rows_block", "sum_block", "finalize_tile", "col_block"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}")
        if self.chunk < 1 or self.sweeps < 1 or self.rounds < 1:
            raise ValueError("KernelConfig: chunk, sweeps and rounds must be >= 1")


@dataclass
class KernelLayout:
    """The tables and geometry of one plan, as the launchers read them.

    Built on the gradsafe side (``gradsafe.backends.triton_layout.build_layout``); the column
    layouts of the int64 tables are in common.py. ``tile_cache`` and ``step_cache`` are filled
    while stepping (per-dtype tile tables, per-step gradient tables).
    """

    device: torch.device
    rows_dtype: torch.dtype
    config: KernelConfig
    numels: list[int]
    ntiles: list[int]
    chunk: int
    block_reduce: int
    rb_reduce: int
    block_apply: int
    rb_apply: int
    tens: torch.Tensor  # (T, 8) int64
    groups: torch.Tensor  # reduce row groups (G, 8) int64
    apply_groups: torch.Tensor  # apply row groups (Ga, 8) int64
    tile_list: list[tuple[int, int]]
    changes: list[bool]  # per tensor: whether the apply pass writes it
    static_aligned: list[bool]
    n_part: int
    coef_tab: torch.Tensor  # (C, 4) int64
    acting: bool
    device_rule: bool
    host_reason: str | None
    n_inst: int
    inst_tab: torch.Tensor  # (I, 8) int64
    col_tab: torch.Tensor  # (Z, 8) int64
    pool: torch.Tensor  # float64
    num_columns: int
    maxr: int
    has_r: bool
    jb: int  # partials per sum step (finalize)
    cb: int  # coefficients per finalize program
    degenerate: float  # the dual's degeneracy threshold (finalize's DEGEN), set by the caller
    keep: list[torch.Tensor] = field(default_factory=list)  # what the tables' addresses point into
    tile_cache: dict = field(default_factory=dict)
    step_cache: dict = field(default_factory=dict)  # (addresses, dtypes) -> per-step tables

    def tiles_for(self, codes: tuple[int, ...]) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per gradient dtype code: (reduce tiles, apply tiles) as (n, 2) int64 device tables."""
        hit = self.tile_cache.get(codes)
        if hit is not None:
            return hit
        out = {}
        for code in sorted(set(codes)):
            red = [(p, j) for p, j in self.tile_list if codes[p] == code]
            app = [(p, j) for p, j in red if self.changes[p]]
            out[code] = tuple(
                torch.tensor(t, dtype=torch.int64, device=self.device).reshape(-1, 2) if t else None for t in (red, app)
            )
        self.tile_cache[codes] = out
        return out
