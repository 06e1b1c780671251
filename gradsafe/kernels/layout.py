"""The tables the kernels read, built once per plan (pure torch / numpy: no triton here).

A ``KernelLayout`` fixes, for one plan, one device and one basis storage dtype:

- the tiles: each covered tensor is cut into ``chunk``-element tiles (the grid of the
  reduce and apply passes);
- the stored rows: the plan's float32 row views (no copy), or a bfloat16 copy padded so that
  every tensor's columns start on a 128-byte boundary; with bf16 rows the rule's Gram
  matrices come from the rounded rows (a second ``HostRule``), so that the result is
  orthogonal to the rows the kernels actually read;
- the partials buffer: first one ``|h|^2`` slot per tile, then per block an
  ``(r_b, tiles of its tensors)`` matrix, so that every sum the finalize pass makes (a
  global column: a whole row of it; a per-tensor coefficient: the tensor's range of a row)
  reads contiguous memory;
- the coefficient table (for the report's numbers), the rule's columns (where each sums its
  partials from and where its weight goes), the rule instances (one per independent
  component of ``HostRule``) with their precomputed ``K^+``, ``P2``, ``H`` in one float64 pool.

Column layouts are documented in ``gradsafe/kernels/surgery.py`` and docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..plan import Plan
from ..rule import HostRule

__all__ = ["KernelConfig", "KernelLayout", "build_layout", "DTYPE_CODES", "next_pow2"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ESIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_PAD = 64  # bf16 row copies: each tensor's columns start at a multiple of 64 elements (128 bytes)


def next_pow2(n: int) -> int:
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
    device: torch.device
    rows_dtype: torch.dtype
    config: KernelConfig
    rule: HostRule  # the rule the kernels' rows satisfy (plan.rule, or the bf16-rounded one)
    numels: list[int]
    ntiles: list[int]
    chunk: int
    block_reduce: int
    rb_reduce: int
    block_apply: int
    rb_apply: int
    tens: torch.Tensor  # (T, 8) int64
    groups: torch.Tensor  # reduce row groups (G, 4) int64
    apply_groups: torch.Tensor  # (Ga, 4) int64
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
    keep: list[torch.Tensor] = field(default_factory=list)
    tile_cache: dict = field(default_factory=dict)
    step_cache: dict = field(default_factory=dict)  # (addresses, dtypes) -> per-step tables

    @property
    def static_aligned_np(self) -> np.ndarray:
        arr = self.__dict__.get("_static_aligned_np")
        if arr is None:
            arr = self.__dict__["_static_aligned_np"] = np.asarray(self.static_aligned, dtype=bool)
        return arr

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


def _rounded_rule(plan: Plan, dtype: torch.dtype) -> HostRule:
    blocks = [replace(b, rows=b.rows.to(dtype).to(torch.float32)) for b in plan.blocks]
    return HostRule(blocks, plan.touching)


def _stored_rows(plan: Plan, dtype: torch.dtype, device: torch.device):
    """Per block: (stored rows tensor, per-tensor column starts, row stride, element size)."""
    out = []
    for b in plan.blocks:
        if dtype == torch.float32:
            rows = b.rows
            if rows.device != device or rows.dtype != torch.float32 or (rows.shape[1] > 1 and rows.stride(1) != 1):
                rows = rows.to(device=device, dtype=torch.float32).contiguous()
            cols = [sl.start for sl in b.slices]
            out.append((rows, cols, rows.stride(0), 4))
        else:
            widths = [-(-(sl.stop - sl.start) // _PAD) * _PAD for sl in b.slices]
            cols = [int(c) for c in np.concatenate([[0], np.cumsum(widths)[:-1]])] if widths else []
            total = max(sum(widths), 1)
            stored = torch.zeros(b.num_rows, total, dtype=dtype, device=device)
            src = b.rows.to(device)
            for sl, c in zip(b.slices, cols):
                stored[:, c : c + sl.stop - sl.start] = src[:, sl].to(dtype)
            out.append((stored, cols, total, 2))
    return out


def build_layout(plan: Plan, rows_dtype: torch.dtype, config: KernelConfig, device: torch.device | None = None) -> KernelLayout:
    device = torch.device(device if device is not None else plan.device)
    cfg = config
    T = plan.num_tensors
    blocks = plan.blocks
    numels = [0] * T
    for p, touch in enumerate(plan.touching):
        if not touch:
            raise ValueError(f"plan position {p} is covered by no block")
        sl = touch[0][1]
        numels[p] = sl.stop - sl.start

    rule = plan.rule if rows_dtype == torch.float32 else _rounded_rule(plan, rows_dtype)
    stored = _stored_rows(plan, rows_dtype, device)
    esize = _ESIZE[rows_dtype]
    vec = 16 // esize

    # ---- pass geometry
    max_rows = max((b.num_rows for b in blocks), default=1)
    rb_reduce = min(next_pow2(max_rows), cfg.rows_block)
    block_reduce = max(cfg.tile_elems // rb_reduce, 16)
    live = [b.apply_rows() for b in blocks if b.acts]
    max_apply = max((s.stop - s.start for s in live), default=1)
    rb_apply = min(next_pow2(max(max_apply, 1)), cfg.rows_block)
    block_apply = max(cfg.tile_elems // rb_apply, 16)
    step = max(block_reduce, block_apply)
    chunk = -(-cfg.chunk // step) * step

    # ---- tiles and partial areas
    ntiles = [-(-n // chunk) for n in numels]
    tile_list = [(p, j) for p in range(T) for j in range(ntiles[p])]
    gtile0 = np.concatenate([[0], np.cumsum(ntiles)[:-1]]).astype(np.int64) if T else np.zeros(0, np.int64)
    off = len(tile_list)  # norm partials first: slot = tile's global index
    pbase, tstart, tiles_b = [], [], []
    for b in blocks:
        nts = [ntiles[p] for p in b.positions]
        ts = np.concatenate([[0], np.cumsum(nts)[:-1]]).astype(np.int64) if nts else np.zeros(0, np.int64)
        pbase.append(off)
        tstart.append(ts)
        tiles_b.append(int(sum(nts)))
        off += int(sum(nts)) * b.num_rows
    n_part = max(off, 1)

    # ---- row groups (reduce: all rows; apply: the rows that can act)
    local_t = {(bi, p): t for bi, b in enumerate(blocks) for t, p in enumerate(b.positions)}
    groups, apply_groups, tens = [], [], []
    static_aligned, changes = [], []
    keep: list[torch.Tensor] = []
    for p in range(T):
        ok = True
        g0 = len(groups)
        a0 = len(apply_groups)
        for bi, _sl in plan.touching[p]:
            b = blocks[bi]
            t = local_t[(bi, p)]
            rows, cols, stride, es = stored[bi]
            addr = rows.data_ptr() + cols[t] * es
            ok &= addr % 16 == 0 and stride % vec == 0
            groups.append((addr, stride, b.num_rows, pbase[bi] + int(tstart[bi][t]), tiles_b[bi], 0, 0, 0))
            if b.acts:
                live_rows = b.apply_rows()
                n_live = live_rows.stop - live_rows.start
                if n_live > 0:
                    apply_groups.append(
                        (addr + live_rows.start * stride * es, stride, n_live, b.coef_offset + t * b.num_rows + live_rows.start,
                         0, 0, 0, 0)
                    )
        damp = plan.damp_factors[p]
        daddr = 0
        if damp is not None:
            damp = damp.to(device=device, dtype=torch.float32).contiguous()
            keep.append(damp)
            daddr = damp.data_ptr()
            ok &= daddr % 16 == 0
        tens.append((numels[p], daddr, g0, len(groups), a0, len(apply_groups), int(gtile0[p]) if T else 0, 0))
        static_aligned.append(bool(ok))
        changes.append(damp is not None or len(apply_groups) > a0)
    keep.extend(s[0] for s in stored)

    def i64(rows, cols):
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, cols) if len(rows) else np.zeros((1, cols), np.int64)
        return torch.from_numpy(arr).to(device)

    # ---- coefficient table: (partial base, count, stride, owned)
    coef = np.zeros((plan.coef_numel, 4), dtype=np.int64)
    for bi, b in enumerate(blocks):
        r = np.arange(b.num_rows)
        nts = np.asarray([ntiles[p] for p in b.positions], dtype=np.int64)
        sl = slice(b.coef_offset, b.coef_offset + b.coef_numel)
        coef[sl, 0] = (pbase[bi] + tstart[bi][:, None] + r[None, :] * tiles_b[bi]).reshape(-1)
        coef[sl, 1] = np.repeat(nts, b.num_rows)
        coef[sl, 2] = 1
    if T:
        coef[plan.norms_offset :, 0] = gtile0
        coef[plan.norms_offset :, 1] = ntiles
        coef[plan.norms_offset :, 2] = 1
        coef[plan.norms_offset :, 3] = 1

    # ---- rule columns: where each z sums from, where its weight goes
    acting = any(b.acts for b in blocks)
    Z = rule.num_columns
    colspec = np.zeros((Z, 8), dtype=np.int64)
    for seg in rule.segments:
        b = blocks[seg.block]
        rb = b.num_rows
        for ri, r in enumerate(seg.rows):
            if seg.per_tensor:
                for t, p in enumerate(b.positions):
                    z = seg.z_offset + t * len(seg.rows) + ri
                    dst = b.coef_offset + t * rb + r
                    src = pbase[seg.block] + r * tiles_b[seg.block] + int(tstart[seg.block][t])
                    colspec[z] = (src, ntiles[p], 1, dst, 1, rb, 0, 0)
                    coef[dst, 3] = 1
            else:
                z = seg.z_offset + ri
                src = pbase[seg.block] + r * tiles_b[seg.block]
                colspec[z] = (src, tiles_b[seg.block], 1, b.coef_offset + r, b.num_tensors, rb, 0, 0)
                coef[b.coef_offset + r : b.coef_offset + b.coef_numel : rb, 3] = 1

    # ---- rule instances (one per component), their matrices in one float64 pool
    inst, cols, pool_parts = [], [], []
    c_off = p_off = 0
    max_a = max_r = 0
    for idxA, idxR, K_pinv, P2, H, ref_norms2 in rule.batches:
        B, nA = idxA.shape
        nR = idxR.shape[1]
        max_a, max_r = max(max_a, nA), max(max_r, nR)
        for i in range(B):
            kp, p2, hh = p_off, p_off + nA * nA, p_off + nA * nA + nA * nR
            rn = hh + nR * nR
            inst.append((nA, nR, c_off, kp, p2, hh, rn, 0))
            order = np.concatenate([idxA[i], idxR[i]]).astype(np.int64)
            cols.append(colspec[order])
            pool_parts += [K_pinv[i].reshape(-1), P2[i].reshape(-1), H[i].reshape(-1), ref_norms2[i].reshape(-1)]
            c_off += nA + nR
            p_off += nA * nA + nA * nR + nR * nR + nR
    reason = None
    if max_a > cfg.max_rule_columns:
        reason = f"a component has {max_a} basis columns (device rule limit {cfg.max_rule_columns})"
    elif max_r > cfg.max_refs:
        reason = f"a component has {max_r} conflict references (device rule limit {cfg.max_refs})"
    device_rule = acting and reason is None
    pool = np.concatenate(pool_parts) if pool_parts else np.zeros(1)
    col_tab = np.concatenate(cols) if cols else np.zeros((1, 8), np.int64)
    longest = int(max(coef[:, 1].max(initial=1), col_tab[:, 1].max(initial=1)))
    jb = min(next_pow2(max(longest, 1)), cfg.sum_block)
    cb = max(cfg.finalize_tile // jb, 16)

    return KernelLayout(
        device=device,
        rows_dtype=rows_dtype,
        config=cfg,
        rule=rule,
        numels=numels,
        ntiles=ntiles,
        chunk=chunk,
        block_reduce=block_reduce,
        rb_reduce=rb_reduce,
        block_apply=block_apply,
        rb_apply=rb_apply,
        tens=i64(tens, 8),
        groups=i64(groups, 8),
        apply_groups=i64(apply_groups, 8),
        tile_list=tile_list,
        changes=changes,
        static_aligned=static_aligned,
        n_part=n_part,
        coef_tab=i64(coef, 4),
        acting=acting,
        device_rule=device_rule,
        host_reason=reason if acting else None,
        n_inst=len(inst) if device_rule else 0,
        inst_tab=i64(inst, 8),
        col_tab=torch.from_numpy(col_tab).to(device),
        pool=torch.from_numpy(pool.astype(np.float64)).to(device),
        num_columns=max(Z, 1),
        maxr=next_pow2(max(max_r, 1)),
        has_r=max_r > 0,
        jb=jb,
        cb=cb,
        keep=keep,
    )
