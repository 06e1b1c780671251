"""The fused surgery kernels: reduce, finalize (with the rule), apply.

One step is at most ``2 * (number of gradient dtypes) + 1`` launches, 3 when all covered
gradients share a dtype, whatever the number of tensors:

1. ``reduce_kernel`` (grid: one program per tile, a tile being a contiguous range of
   ``CHUNK`` elements of one tensor): reads the tile of the gradient (times the damping
   factor on load), and every row of every block touching the tensor, and writes the
   tile's partial coefficients ``rows @ h`` and ``|h|^2`` (float32, one slot each: no
   atomics).
2. ``finalize_kernel`` (grid: one program per rule instance + one per ``CB`` coefficients):
   a rule program sums, in a fixed order and in float64, the partials of its columns
   (``z``), solves its component of the joint rule (``mu = K^+ a``, ``q = b - P2^T a``, the
   conflict dual ``lam``, ``mu += P2 lam``) and scatters ``(-mu, lam)`` into the weights;
   a coefficient program sums the partials of ``CB`` coefficients (the report's numbers)
   and zeroes the weights no column owns. Nothing depends on another program's output.
3. ``apply_kernel`` (grid: the tiles of tensors that change): ``x = d * g + rows^T w``
   written in place, in the gradient's dtype.

All tables are int64; addresses are byte addresses cast to typed pointers. See
docs/kernels.md for the layouts.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---- table layouts (columns of the int64 tables; keep in sync with gradsafe/kernels/layout.py)
# tensors (T, TENS_COLS): numel, damp address (0: none), reduce groups [start, end),
#                         apply groups [start, end), norm partial base (tile 0)
TENS_COLS = 8
# per-step gradient table (T, 2): address, aligned flag
GTAB_COLS = 2
# reduce row groups (G, 8): rows address (row 0, first column), row stride, rows, partial base
#                           (row 0, the tensor's first tile), partial row stride (tiles of the block), -, -, -
# apply row groups  (G, 8): rows address (first applied row), row stride, rows, weight base, -, -, -, -
GROUP_COLS = 8
# tiles (n, 2): tensor position, tile index within the tensor
TILE_COLS = 2
# coefficient table (C, 4): partial base, count, stride, owned-by-a-column flag
COEF_COLS = 4
# rule columns (Z, 8): partial base, count, stride, weight base, count, stride, -, -
COL_COLS = 8
# rule instances (I, 8): nA, nR, column offset, K^+ offset, P2 offset, H offset, ref_norms2 offset, -
INST_COLS = 8

# dtype codes of gradients (G_DT) and stored rows (U_DT)
DT_FP32, DT_BF16, DT_FP16 = 0, 1, 2



@triton.jit
def _to_dt(x, DT: tl.constexpr):
    if DT == 0:
        y = x.to(tl.float32)
    elif DT == 1:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def _as_ptr(addr, DT: tl.constexpr):
    if DT == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif DT == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    return p


# ------------------------------------------------------------------------------------ reduce
@triton.jit
def _reduce_rows(
    gaddr, daddr, raddr, stride, nrows, r0, start, nfull, end,
    G_DT: tl.constexpr, U_DT: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr, HINT: tl.constexpr,
):
    """Partial dot products of rows [r0, r0 + RB) with the damped tile, and the tile's |h|^2."""
    gp = _as_ptr(gaddr, G_DT)
    dp = daddr.to(tl.pointer_type(tl.float32))
    up = _as_ptr(raddr, U_DT)
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


# ------------------------------------------------------------------------------------ apply
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
        up = _as_ptr(raddr, U_DT)
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
    gp = _as_ptr(gaddr, G_DT)
    dp = daddr.to(tl.pointer_type(tl.float32))
    if HINT:
        gp = tl.multiple_of(gp, 16)
        dp = tl.multiple_of(dp, 16)
    for i in range(0, nfull):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if HINT:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        x = _apply_piece(gp, dp, daddr, groups_ptr, a0, a1, w_ptr, offs, offs < end, U_DT, BLOCK, RB, False, HINT)
        tl.store(gp + offs, _to_dt(x, G_DT))
    offs = start + nfull * BLOCK + tl.arange(0, BLOCK)
    m = offs < end
    x = _apply_piece(gp, dp, daddr, groups_ptr, a0, a1, w_ptr, offs, m, U_DT, BLOCK, RB, True, HINT)
    tl.store(gp + offs, _to_dt(x, G_DT), mask=m)


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


# ------------------------------------------------------------------------------------ finalize
@triton.jit
def _strided_sums(part_ptr, base, cnt, stride, cm, CB: tl.constexpr, JB: tl.constexpr):
    """Per lane c: sum_{j < cnt[c]} part[base[c] + j * stride[c]], in float64, in a fixed order."""
    acc = tl.zeros([CB], dtype=tl.float64)
    maxcnt = tl.max(tl.where(cm, cnt, 0), axis=0)
    for j0 in range(0, maxcnt, JB):
        jj = (j0 + tl.arange(0, JB)).to(tl.int64)
        mk = cm[:, None] & (jj[None, :] < cnt[:, None])
        v = tl.load(part_ptr + base[:, None] + jj[None, :] * stride[:, None], mask=mk, other=0.0)
        acc += tl.sum(v.to(tl.float64), axis=1)
    return acc


@triton.jit
def _coef_block(cb, part_ptr, coef_ptr, coefs_ptr, w_ptr, n_coef, n_weight,
                CB: tl.constexpr, JB: tl.constexpr, ZERO_W: tl.constexpr):
    c = cb * CB + tl.arange(0, CB)
    cm = c < n_coef
    base = tl.load(coef_ptr + c * 4, mask=cm, other=0)
    cnt = tl.load(coef_ptr + c * 4 + 1, mask=cm, other=0)
    stride = tl.load(coef_ptr + c * 4 + 2, mask=cm, other=0)
    owned = tl.load(coef_ptr + c * 4 + 3, mask=cm, other=1)
    acc = _strided_sums(part_ptr, base, cnt, stride, cm, CB, JB)
    tl.store(coefs_ptr + c, acc, mask=cm)
    if ZERO_W:
        tl.store(w_ptr + c, tl.zeros([CB], dtype=tl.float64), mask=cm & (c < n_weight) & (owned == 0))


@triton.jit
def _scatter(w_ptr, col_ptr, cols, cm, val, CJ: tl.constexpr, JB: tl.constexpr):
    """weights[base + j * stride] = val for j < count, per column."""
    base = tl.load(col_ptr + cols * 8 + 3, mask=cm, other=0)
    cnt = tl.load(col_ptr + cols * 8 + 4, mask=cm, other=0)
    stride = tl.load(col_ptr + cols * 8 + 5, mask=cm, other=0)
    maxcnt = tl.max(tl.where(cm, cnt, 0), axis=0)
    for j0 in range(0, maxcnt, JB):
        jj = (j0 + tl.arange(0, JB)).to(tl.int64)
        mk = cm[:, None] & (jj[None, :] < cnt[:, None])
        tl.store(w_ptr + base[:, None] + jj[None, :] * stride[:, None],
                 tl.zeros([CJ, JB], dtype=tl.float64) + val[:, None], mask=mk)


@triton.jit
def _solve_dual(q, h_ptr, rn_ptr, nR, MAXR: tl.constexpr, SWEEPS: tl.constexpr, ROUNDS: tl.constexpr,
                DEGEN: tl.constexpr):
    """argmin_{lam >= 0} 1/2 lam^T H lam + q^T lam, as gradsafe.qp solves it on the host.

    A reference whose diagonal of H is below DEGEN (gradsafe.qp.DEGENERATE) times its squared norm
    before projection (``rn``) gets a zero multiplier and leaves the problem. One reference:
    the closed form. Several: ``ROUNDS`` rounds of ``SWEEPS`` projected Gauss-Seidel sweeps,
    each closed by an exact solve on the sweeps' active set (Gauss-Jordan on the masked
    system), kept once it satisfies the KKT conditions to a relative 1e-9; if no round
    passes, the sweeps' iterate. A non-finite q gives non-finite multipliers (a non-finite
    gradient passes through, as on the host).
    """
    ir = tl.arange(0, MAXR)
    rm = ir < nR
    diag = tl.load(h_ptr + ir * nR + ir, mask=rm, other=0.0)
    rn = tl.load(rn_ptr + ir, mask=rm, other=0.0)
    live = rm & (diag > DEGEN * tl.maximum(rn, 1e-300))
    finite = tl.sum((rm & ~(tl.abs(q) <= 1.7976931348623157e308)).to(tl.int32), axis=0) == 0
    dsafe = tl.where(live, diag, 1.0)
    if MAXR == 1:
        lam = tl.where(live, tl.maximum(-q, 0.0) / dsafe, 0.0)
    else:
        eye = ir[:, None] == ir[None, :]
        Hm = tl.load(h_ptr + ir[:, None] * nR + ir[None, :], mask=live[:, None] & live[None, :], other=0.0)
        qmax = tl.max(tl.where(live, tl.abs(q), 0.0), axis=0)
        lam = tl.zeros([MAXR], dtype=tl.float64)
        best = tl.zeros([MAXR], dtype=tl.float64)
        done = tl.zeros([MAXR], dtype=tl.float64)
        for _rnd in range(ROUNDS):
            if tl.max(done, axis=0) == 0.0:
                for _s in range(SWEEPS):
                    for i in range(nR):
                        sel = ir == i
                        hrow = tl.sum(tl.where(sel[:, None], Hm, 0.0), axis=0)
                        gi = tl.sum(tl.where(sel, q, 0.0), axis=0) + tl.sum(hrow * lam, axis=0)
                        hii = tl.sum(tl.where(sel, dsafe, 0.0), axis=0)
                        li = tl.sum(tl.where(sel, lam, 0.0), axis=0)
                        lam = tl.where(sel & live, tl.maximum(li - gi / hii, 0.0), lam)
                # exact solve on the active set {lam > 0}
                free = live & (lam > 0.0)
                M = tl.where(free[:, None] & free[None, :], Hm, tl.where(eye, 1.0, 0.0))
                rhs = tl.where(free, -q, 0.0)
                for i in range(MAXR):
                    sel = ir == i
                    row = tl.sum(tl.where(sel[:, None], M, 0.0), axis=0)
                    col = tl.sum(tl.where(sel[None, :], M, 0.0), axis=1)
                    piv = tl.sum(tl.where(sel, row, 0.0), axis=0)
                    f = tl.where(sel, 0.0, col / piv)
                    M = M - f[:, None] * row[None, :]
                    rhs = rhs - f * tl.sum(tl.where(sel, rhs, 0.0), axis=0)
                dM = tl.sum(tl.where(eye, M, 0.0), axis=1)
                x = tl.where(free, rhs / dM, 0.0)
                grad = q + tl.sum(Hm * x[None, :], axis=1)
                tol = 1e-9 * (qmax + tl.max(tl.where(live, diag, 0.0), axis=0) * tl.max(tl.abs(x), axis=0))
                bad = (free & ~(x > 0.0)) | (free & ~(tl.abs(grad) <= tol)) | (live & ~free & ~(grad >= -tol))
                ok = tl.sum(bad.to(tl.int32), axis=0) == 0
                best = tl.where(ok, x, best)
                done = tl.where(ok, 1.0, done)
        lam = tl.where(done > 0.0, best, lam)
    return tl.where(finite, lam, float("nan"))


@triton.jit
def _rule_instance(i, part_ptr, inst_ptr, col_ptr, pool_ptr, z_ptr, w_ptr,
                   CJ: tl.constexpr, JB: tl.constexpr, MAXR: tl.constexpr, HAS_R: tl.constexpr,
                   SWEEPS: tl.constexpr, ROUNDS: tl.constexpr, DEGEN: tl.constexpr):
    nA = tl.load(inst_ptr + i * 8)
    nR = tl.load(inst_ptr + i * 8 + 1)
    c0 = tl.load(inst_ptr + i * 8 + 2)
    kp = tl.load(inst_ptr + i * 8 + 3)
    p2 = tl.load(inst_ptr + i * 8 + 4)
    hh = tl.load(inst_ptr + i * 8 + 5)
    rn = tl.load(inst_ptr + i * 8 + 6)
    ncols = nA + nR
    jc = tl.arange(0, CJ)
    # z: the column sums of the partials (A columns first, then R), kept in z_ptr[c0:c0 + ncols]
    for k0 in range(0, ncols, CJ):
        cols = c0 + k0 + jc
        cm = (k0 + jc) < ncols
        base = tl.load(col_ptr + cols * 8, mask=cm, other=0)
        cnt = tl.load(col_ptr + cols * 8 + 1, mask=cm, other=0)
        stride = tl.load(col_ptr + cols * 8 + 2, mask=cm, other=0)
        z = _strided_sums(part_ptr, base, cnt, stride, cm, CJ, JB)
        tl.store(z_ptr + cols, z, mask=cm)
    tl.debug_barrier()
    lam = tl.zeros([MAXR], dtype=tl.float64)
    ir = tl.arange(0, MAXR)
    rm = ir < nR
    if HAS_R:
        q = tl.load(z_ptr + c0 + nA + ir, mask=rm, other=0.0)
        for k0 in range(0, nA, CJ):  # q = b - P2^T a
            kk = k0 + jc
            km = kk < nA
            a = tl.load(z_ptr + c0 + kk, mask=km, other=0.0)
            P = tl.load(pool_ptr + p2 + kk[:, None] * nR + ir[None, :], mask=km[:, None] & rm[None, :], other=0.0)
            q -= tl.sum(P * a[:, None], axis=0)
        lam = _solve_dual(q, pool_ptr + hh, pool_ptr + rn, nR, MAXR, SWEEPS, ROUNDS, DEGEN)
        _scatter(w_ptr, col_ptr, c0 + nA + ir, rm, lam, MAXR, JB)
    # mu = K^+ a + P2 lam, by chunks of CJ rows; the weights of A columns are -mu
    for r0 in range(0, nA, CJ):
        rr = r0 + jc
        rmA = rr < nA
        mu = tl.zeros([CJ], dtype=tl.float64)
        for k0 in range(0, nA, CJ):
            kk = k0 + jc
            km = kk < nA
            a = tl.load(z_ptr + c0 + kk, mask=km, other=0.0)
            K = tl.load(pool_ptr + kp + rr[:, None] * nA + kk[None, :], mask=rmA[:, None] & km[None, :], other=0.0)
            mu += tl.sum(K * a[None, :], axis=1)
        if HAS_R:
            P = tl.load(pool_ptr + p2 + rr[:, None] * nR + ir[None, :], mask=rmA[:, None] & rm[None, :], other=0.0)
            mu += tl.sum(P * lam[None, :], axis=1)
        _scatter(w_ptr, col_ptr, c0 + rr, rmA, -mu, CJ, JB)


@triton.jit
def finalize_kernel(
    part_ptr, coef_ptr, coefs_ptr, w_ptr, n_coef, n_weight,
    inst_ptr, col_ptr, pool_ptr, z_ptr, n_inst,
    CB: tl.constexpr, JB: tl.constexpr, CJ: tl.constexpr, MAXR: tl.constexpr, HAS_R: tl.constexpr,
    SWEEPS: tl.constexpr, ROUNDS: tl.constexpr, ZERO_W: tl.constexpr, DEGEN: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_inst:
        _rule_instance(pid, part_ptr, inst_ptr, col_ptr, pool_ptr, z_ptr, w_ptr,
                       CJ, JB, MAXR, HAS_R, SWEEPS, ROUNDS, DEGEN)
    else:
        _coef_block(pid - n_inst, part_ptr, coef_ptr, coefs_ptr, w_ptr, n_coef, n_weight, CB, JB, ZERO_W)
