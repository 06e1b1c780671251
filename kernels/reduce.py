"""The reduce pass: per tile, the partial coefficients ``rows @ h`` and ``|h|^2``.

``reduce_kernel`` (grid: one program per tile, a tile being a contiguous range of ``CHUNK``
elements of one tensor) reads the tile of the gradient (times the damping factor on load),
and every row of every block touching the tensor, and writes the tile's partial
coefficients and ``|h|^2`` (float32, one slot each: no atomics). Table layouts: common.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import as_ptr

__all__ = ["reduce_kernel"]


@triton.jit
def _reduce_rows(
    gaddr, daddr, raddr, stride, nrows, r0, start, nfull, end,
    G_DT: tl.constexpr, U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr, HINT: tl.constexpr,
):
    """Partial dot products of rows [r0, r0 + RB) with the damped tile, and the tile's |h|^2."""
    gp = as_ptr(gaddr, G_DT)
    dp = daddr.to(tl.pointer_type(tl.float32))
    up = as_ptr(raddr, U_DT)
    if HINT:  # (the hints go on the pointers: they do not survive the int-to-pointer cast)
        gp = tl.multiple_of(gp, 16)
        dp = tl.multiple_of(dp, 16)
        up = tl.multiple_of(up, 16)
        # the stride is a multiple of the vector width here; say so by arithmetic (a hint on a
        # scalar argument is lost when the helper is inlined)
        if U_DT == 0:
            stride = (stride // 4) * 4
        else:
            stride = (stride // 8) * 8
    rr = r0 + tl.arange(0, RB)
    rmask = rr < nrows
    rowoff = rr.to(tl.int64) * stride
    acc = tl.zeros([RB, BLOCK], dtype=tl.float32)
    nacc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, nfull):  # full pieces: no element mask
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if HINT:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        h = tl.load(gp + offs).to(tl.float32)
        if daddr != 0:
            h = h * tl.load(dp + offs)
        u = tl.load(up + rowoff[:, None] + offs[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        acc += u * h[None, :]
        nacc += h * h
    # the tail piece (possibly empty)
    offs = start + nfull * BLOCK + tl.arange(0, BLOCK)
    m = offs < end
    h = tl.load(gp + offs, mask=m, other=0.0).to(tl.float32)
    if daddr != 0:
        h = h * tl.load(dp + offs, mask=m, other=0.0)
    u = tl.load(up + rowoff[:, None] + offs[None, :], mask=rmask[:, None] & m[None, :], other=0.0).to(tl.float32)
    acc += u * h[None, :]
    nacc += h * h
    return tl.sum(acc, axis=1), tl.sum(nacc, axis=0)


@triton.jit
def reduce_kernel(
    tiles_ptr, tens_ptr, gtab_ptr, groups_ptr, part_ptr, CHUNK,
    G_DT: tl.constexpr, U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr,
):
    t = tl.program_id(0)
    p = tl.load(tiles_ptr + t * 2)
    j = tl.load(tiles_ptr + t * 2 + 1)
    numel = tl.load(tens_ptr + p * 8)
    daddr = tl.load(tens_ptr + p * 8 + 1)
    g0 = tl.load(tens_ptr + p * 8 + 2)
    g1 = tl.load(tens_ptr + p * 8 + 3)
    norm_base = tl.load(tens_ptr + p * 8 + 6)
    gaddr = tl.load(gtab_ptr + p * 2)
    aligned = tl.load(gtab_ptr + p * 2 + 1)
    start = j * CHUNK
    end = tl.minimum(start + CHUNK, numel)
    nfull = (end - start) // BLOCK
    for g in range(g0, g1):
        raddr = tl.load(groups_ptr + g * 8)
        stride = tl.load(groups_ptr + g * 8 + 1)
        nrows = tl.load(groups_ptr + g * 8 + 2)
        pbase = tl.load(groups_ptr + g * 8 + 3)
        pstride = tl.load(groups_ptr + g * 8 + 4)
        for r0 in range(0, nrows, RB):
            if aligned != 0:
                dots, nrm = _reduce_rows(gaddr, daddr, raddr, stride, nrows, r0, start, nfull, end,
                                         G_DT, U_DT, BLOCK, RB, True)
            else:
                dots, nrm = _reduce_rows(gaddr, daddr, raddr, stride, nrows, r0, start, nfull, end,
                                         G_DT, U_DT, BLOCK, RB, False)
            rr = r0 + tl.arange(0, RB)
            tl.store(part_ptr + pbase + rr.to(tl.int64) * pstride + j, dots, mask=rr < nrows)
            tl.store(part_ptr + norm_base + j, nrm, mask=(g == g0) & (r0 == 0))

