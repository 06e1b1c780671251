"""The apply pass: ``x = d * g + rows^T w``, written in place in the gradient's dtype.

``apply_kernel`` (grid: the tiles of the tensors that change) reads the tile of the gradient
(damped on load), the rows that can act and their weights (written by the finalize pass).
Table layouts: common.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import as_ptr, to_dt

__all__ = ["apply_kernel"]


@triton.jit
def _apply_piece(
    gp, dp, daddr, groups_ptr, a0, a1, w_ptr, offs, m,
    U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr, MASKED: tl.constexpr, HINT: tl.constexpr,
):
    if MASKED:
        h = tl.load(gp + offs, mask=m, other=0.0).to(tl.float32)
    else:
        h = tl.load(gp + offs).to(tl.float32)
    if daddr != 0:
        if MASKED:
            h = h * tl.load(dp + offs, mask=m, other=0.0)
        else:
            h = h * tl.load(dp + offs)
    acc = tl.zeros([RB, BLOCK], dtype=tl.float32)
    for a in range(a0, a1):
        raddr = tl.load(groups_ptr + a * 8)
        stride = tl.load(groups_ptr + a * 8 + 1)
        nrows = tl.load(groups_ptr + a * 8 + 2)
        wbase = tl.load(groups_ptr + a * 8 + 3)
        up = as_ptr(raddr, U_DT)
        if HINT:
            up = tl.multiple_of(up, 16)
            if U_DT == 0:
                stride = (stride // 4) * 4
            else:
                stride = (stride // 8) * 8
        for r0 in range(0, nrows, RB):
            rr = r0 + tl.arange(0, RB)
            rm = rr < nrows
            w = tl.load(w_ptr + wbase + rr, mask=rm, other=0.0).to(tl.float32)
            ptrs = up + rr.to(tl.int64)[:, None] * stride + offs[None, :]
            if MASKED:
                u = tl.load(ptrs, mask=rm[:, None] & m[None, :], other=0.0).to(tl.float32)
            else:
                u = tl.load(ptrs, mask=rm[:, None], other=0.0).to(tl.float32)
            acc += u * w[:, None]
    return h + tl.sum(acc, axis=0)


@triton.jit
def _apply_range(
    gaddr, daddr, groups_ptr, a0, a1, w_ptr, start, nfull, end,
    G_DT: tl.constexpr, U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr, HINT: tl.constexpr,
):
    gp = as_ptr(gaddr, G_DT)
    dp = daddr.to(tl.pointer_type(tl.float32))
    if HINT:
        gp = tl.multiple_of(gp, 16)
        dp = tl.multiple_of(dp, 16)
    for i in range(0, nfull):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if HINT:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        x = _apply_piece(gp, dp, daddr, groups_ptr, a0, a1, w_ptr, offs, offs < end, U_DT, BLOCK, RB, False, HINT)
        tl.store(gp + offs, to_dt(x, G_DT))
    offs = start + nfull * BLOCK + tl.arange(0, BLOCK)
    m = offs < end
    x = _apply_piece(gp, dp, daddr, groups_ptr, a0, a1, w_ptr, offs, m, U_DT, BLOCK, RB, True, HINT)
    tl.store(gp + offs, to_dt(x, G_DT), mask=m)


@triton.jit
def apply_kernel(
    tiles_ptr, tens_ptr, gtab_ptr, groups_ptr, w_ptr, CHUNK,
    G_DT: tl.constexpr, U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr,
):
    t = tl.program_id(0)
    p = tl.load(tiles_ptr + t * 2)
    j = tl.load(tiles_ptr + t * 2 + 1)
    numel = tl.load(tens_ptr + p * 8)
    daddr = tl.load(tens_ptr + p * 8 + 1)
    a0 = tl.load(tens_ptr + p * 8 + 4)
    a1 = tl.load(tens_ptr + p * 8 + 5)
    gaddr = tl.load(gtab_ptr + p * 2)
    aligned = tl.load(gtab_ptr + p * 2 + 1)
    start = j * CHUNK
    end = tl.minimum(start + CHUNK, numel)
    nfull = (end - start) // BLOCK
    if aligned != 0:
        _apply_range(gaddr, daddr, groups_ptr, a0, a1, w_ptr, start, nfull, end, G_DT, U_DT, BLOCK, RB, True)
    else:
        _apply_range(gaddr, daddr, groups_ptr, a0, a1, w_ptr, start, nfull, end, G_DT, U_DT, BLOCK, RB, False)

