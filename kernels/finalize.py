"""The finalize pass: the sums of the partials and the joint rule, on the device.

``finalize_kernel`` (grid: one program per rule instance + one per ``CB`` coefficients): a
rule program sums, in a fixed order and in float64, the partials of its columns (``z``),
solves its component of the joint rule (``mu = K^+ a``, ``q = b - P2^T a``, the conflict dual
``lam``, ``mu += P2 lam``) and scatters ``(-mu, lam)`` into the weights; a coefficient
program sums the partials of ``CB`` coefficients (the report's numbers) and zeroes the
weights no column owns. Nothing depends on another program's output. The degeneracy
threshold of the dual (``DEGEN``) is a launch argument. Table layouts: common.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["finalize_kernel"]


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

    A reference whose diagonal of H is below DEGEN (gradsafe.numerics.DEGENERATE) times its squared norm
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
