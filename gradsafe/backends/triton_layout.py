"""From a plan to the tables the Triton kernels read (the gradsafe side of ``gradsafe.kernels``).

The kernels package reads only plain containers (``KernelLayout``: int64 tables, a float64
pool, launch geometry); everything it needs from the plan and the rule is put there by
``build_layout``:

- the stored rows: the plan's float32 row views (no copy), or a bfloat16 copy padded so that
  every tensor's columns start on a 128-byte boundary; with bf16 rows the rule's Gram
  matrices come from the rounded rows (a second ``HostRule``), so that the result is
  orthogonal to the rows the kernels actually read;
- the tiles, the partials buffer, the coefficient table, the rule's columns and instances
  (one per independent component of ``HostRule``, with its ``K^+``, ``P2``, ``H``);
- the dual's degeneracy threshold, ``gradsafe.numerics.DEGENERATE``.

Column layouts are documented in ``kernels/common.py`` (``gradsafe.kernels.common``) and
docs/kernels.md. Importing this module imports triton (through ``gradsafe.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..kernels.layout import KernelConfig, KernelLayout, next_pow2
from ..plan import Plan
from ..numerics import DEGENERATE
from ..rule import HostRule

__all__ = ["TritonLayout", "build_layout"]

_ESIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_PAD = 64  # bf16 row copies: each tensor's columns start at a multiple of 64 elements (128 bytes)


@dataclass(kw_only=True)
class TritonLayout(KernelLayout):
    """A ``KernelLayout`` with what the backend needs on the host besides the tables.

    rule: the rule the kernels' rows satisfy (``plan.rule``, or the bf16-rounded one); the
        host-rule fallback solves it.
    static_aligned_np: ``static_aligned`` as a numpy bool array (the per-step alignment flags
        are computed with it).
    """

    rule: HostRule
    static_aligned_np: np.ndarray


def _rounded_rule(plan: Plan, dtype: torch.dtype) -> HostRule:
    # every block is "flat" here (the Triton backend takes no factored plan); lent rows become stored ones
    blocks = [replace(b, rows=b.dense_rows().to(dtype).to(torch.float32), operands=None) for b in plan.blocks]
    return HostRule(blocks, plan.touching)


def _stored_rows(plan: Plan, dtype: torch.dtype, device: torch.device):
    """Per block: (stored rows tensor, per-tensor column starts, row stride, element size)."""
    out = []
    for b in plan.blocks:
        if dtype == torch.float32:
            rows = b.dense_rows()
            if rows.device != device or rows.dtype != torch.float32 or (rows.shape[1] > 1 and rows.stride(1) != 1):
                rows = rows.to(device=device, dtype=torch.float32).contiguous()
            cols = [sl.start for sl in b.slices]
            out.append((rows, cols, rows.stride(0), 4))
        else:
            widths = [-(-(sl.stop - sl.start) // _PAD) * _PAD for sl in b.slices]
            cols = [int(c) for c in np.concatenate([[0], np.cumsum(widths)[:-1]])] if widths else []
            total = max(sum(widths), 1)
            stored = torch.zeros(b.num_rows, total, dtype=dtype, device=device)
            src = b.dense_rows().to(device)
            for sl, c in zip(b.slices, cols):
                stored[:, c : c + sl.stop - sl.start] = src[:, sl].to(dtype)
            out.append((stored, cols, total, 2))
    return out


def build_layout(plan: Plan, rows_dtype: torch.dtype, config: KernelConfig,
                 device: torch.device | None = None) -> TritonLayout:
    """The tables of ``plan`` for rows stored in ``rows_dtype`` on ``device`` (default: the plan's)."""
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

    return TritonLayout(
        device=device,
        rows_dtype=rows_dtype,
        config=cfg,
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
        degenerate=DEGENERATE,
        keep=keep,
        rule=rule,
        static_aligned_np=np.asarray(static_aligned, dtype=bool),
    )
