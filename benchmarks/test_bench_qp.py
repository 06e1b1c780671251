"""pytest-benchmark suite: the conflict dual's QP (``gradsafe.qp``) against the solver it replaced.

Run with ``python -m pytest benchmarks/test_bench_qp.py -q -s`` (not part of the tests; ``-s``
shows the table). The problems are GEM's dual on random references: ``R`` (m, n) Gaussian,
``g`` Gaussian (about half the constraints violated), ``H = R R^T``, ``q = R g``, with
``n = 4 m`` and ``n = m`` (H of full rank) and ``n = m // 2 + 1`` (H of rank n < m).

``test_qp_table`` prints, from one run with interleaved rounds (``GRADSAFE_BENCH_QP_ROUNDS``,
default 7), the median over rounds of the time per solve, wall clock and the thread's CPU time
(the CPU time leaves out time the thread spent descheduled on a shared machine), of the
previous solver and of the current one, cold and warm-started from the active set of a
neighbouring problem (g moved by 1 %), and the ratio previous / current (wall clock); with
quadprog installed (a dev dependency) also quadprog's compiled Goldfarb-Idnani solver on the
same problems' primal, the hand GEM loop's solver. The previous solver is kept below, in this
file only, as the baseline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from gradsafe.numerics import DEGENERATE, NULL_RTOL, single_threaded_blas
from gradsafe.qp import solve_nonneg_qp, solve_nonneg_qp_batch

ROUNDS = int(os.environ.get("GRADSAFE_BENCH_QP_ROUNDS", 7))
SIZES = (16, 64, 128)
PROBLEMS = 5  # problems per (m, n); each round solves all of them


def previous_solve_nonneg_qp(H: np.ndarray, q: np.ndarray, ref_norms2: np.ndarray) -> np.ndarray:
    """The baseline: gradsafe.qp.solve_nonneg_qp before this rewrite (Lawson-Hanson with an
    ``lstsq`` per inner iteration, an ``eigh`` for the null space, tests relative to the
    largest reference). Kept for timing only."""
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    m = q.shape[0]
    if m == 0:
        return np.zeros(0)
    if not (np.isfinite(q).all() and np.isfinite(H).all()):
        return np.full(m, np.nan)
    diag = np.diag(H)
    ref_norms2 = np.asarray(ref_norms2, dtype=np.float64).reshape(-1)
    live = diag > DEGENERATE * np.maximum(ref_norms2, 1e-300)
    lam = np.zeros(m)
    if not live.any():
        return lam
    if not live.all():
        idx = np.flatnonzero(live)
        lam[idx] = previous_solve_nonneg_qp(H[np.ix_(idx, idx)], q[idx], ref_norms2[idx])
        return lam
    if m == 1:
        return np.maximum(-q, 0.0) / H[0, 0]
    evals, evecs = np.linalg.eigh(H)
    null = evecs[:, evals <= NULL_RTOL * max(float(evals[-1]), 1e-300)]
    if null.shape[1]:
        q = q - null @ (null.T @ q)
    tol = 1e-13 * max(float(np.max(np.diag(H))), float(np.max(np.abs(q))), 1e-300)
    free = np.zeros(m, dtype=bool)
    max_iter = 3 * m + 10
    for _ in range(max_iter):
        w = -(H @ lam + q)
        candidates = np.where(~free, w, -np.inf)
        j = int(np.argmax(candidates))
        if candidates[j] <= tol:
            break
        free[j] = True
        for _ in range(max_iter):
            z = np.zeros(m)
            idx = np.flatnonzero(free)
            z[idx] = np.linalg.lstsq(H[np.ix_(idx, idx)], -q[idx], rcond=None)[0]
            if np.all(z[idx] > 0):
                lam = z
                break
            bad = idx[z[idx] <= 0]
            step = np.min(lam[bad] / np.maximum(lam[bad] - z[bad], 1e-300))
            lam = lam + step * (z - lam)
            free &= lam > 0
            lam[~free] = 0.0
    return np.maximum(lam, 0.0)


@dataclass
class Problem:
    H: np.ndarray
    q: np.ndarray
    norms2: np.ndarray
    q_near: np.ndarray  # the same references, g moved by 1 %
    warm: np.ndarray  # the active set of the (H, q_near) problem
    R: np.ndarray  # the references (m, n) and the gradient, for the primal (quadprog)
    g: np.ndarray


def gem_problems(m: int, n: int, count: int = PROBLEMS, seed: int = 0) -> list[Problem]:
    rng = np.random.default_rng([m, n, seed])
    out = []
    for _ in range(count):
        R = rng.standard_normal((m, n))
        g = rng.standard_normal(n)
        g_near = g + 0.01 * np.linalg.norm(g) / np.sqrt(n) * rng.standard_normal(n)
        H = R @ R.T
        q_near = R @ g_near
        out.append(Problem(H, R @ g, np.diag(H).copy(), q_near, solve_nonneg_qp(H, q_near) > 0, R, g))
    return out


def widths(m: int) -> list[int]:
    return [4 * m, m, m // 2 + 1]


CASES = [(m, n) for m in SIZES for n in widths(m)]


def quadprog_primal(p: Problem, quadprog) -> None:
    """GEM's primal ``min 1/2 |x - g|^2 s.t. R x >= 0`` by quadprog (compiled Goldfarb-Idnani), on
    unit references as tests/test_qp.py's reference does; it gives up on some degenerate ones."""
    units = p.R / np.linalg.norm(p.R, axis=1, keepdims=True)
    try:
        quadprog.solve_qp(np.eye(p.R.shape[1]), p.g, units.T, np.zeros(p.R.shape[0]))
    except ValueError:  # "constraints are inconsistent": timed up to where it stopped
        pass


def solve_all(problems: list[Problem], solver: str, quadprog=None) -> None:
    for p in problems:
        if solver == "quadprog":
            quadprog_primal(p, quadprog)
        elif solver == "previous":
            previous_solve_nonneg_qp(p.H, p.q, p.norms2)
        elif solver == "current":
            solve_nonneg_qp(p.H, p.q, p.norms2)
        else:
            solve_nonneg_qp(p.H, p.q, p.norms2, warm_start=p.warm)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"m{c[0]}-n{c[1]}")
def problems(request):
    return gem_problems(*request.param)


@pytest.mark.parametrize("solver", ["current", "warm"])
def test_solver(benchmark, problems, solver):
    with single_threaded_blas():
        benchmark(solve_all, problems, solver)


def test_previous_solver(benchmark, problems):
    with single_threaded_blas():
        benchmark.pedantic(solve_all, args=(problems, "previous"), rounds=3, iterations=1)


def test_batch_of_small_problems(benchmark):
    """64 problems of 4 references each (one per tensor in tensor scope): the per-call cost."""
    problems = gem_problems(4, 8, count=64)
    H = np.stack([p.H for p in problems])
    q = np.stack([p.q for p in problems])
    benchmark(solve_nonneg_qp_batch, H, q, np.diagonal(H, axis1=1, axis2=2))


def interleaved(cases: dict[str, Callable[[], None]], solves: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median over rounds of (wall, CPU) milliseconds per solve; the cases alternate within a round."""
    wall: dict[str, list[float]] = {s: [] for s in cases}
    cpu: dict[str, list[float]] = {s: [] for s in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for s, fn in cases.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[s].append((time.perf_counter() - t0) * 1e3 / solves)
            cpu[s].append((time.thread_time() - c0) * 1e3 / solves)
    return {s: (float(np.median(wall[s])), float(np.median(cpu[s]))) for s in cases}


def batch_cases(problems: list[Problem]) -> dict[str, Callable[[], None]]:
    """The batch entry point on many small problems (as the rule calls it in tensor scope)."""
    H = np.stack([p.H for p in problems])
    q = np.stack([p.q for p in problems])
    norms2 = np.stack([p.norms2 for p in problems])
    warm = np.stack([p.warm for p in problems])

    def previous() -> None:
        for b in range(len(problems)):
            previous_solve_nonneg_qp(H[b], q[b], norms2[b])

    return {
        "previous": previous,
        "current": lambda: solve_nonneg_qp_batch(H, q, norms2),
        "warm": lambda: solve_nonneg_qp_batch(H, q, norms2, warm_start=warm),
    }


def test_qp_table():
    """The table: ms per solve (wall / CPU), previous vs current (and quadprog on the primal,
    when installed), one interleaved run."""
    try:
        import quadprog
    except ImportError:
        quadprog = None
    solvers = ["previous", "current", "warm"] + (["quadprog"] if quadprog is not None else [])
    lines = [
        f"gradsafe.qp: GEM's dual on random references, {PROBLEMS} problems per row, {ROUNDS} interleaved rounds, "
        f"one BLAS thread, load average {os.getloadavg()[0]:.1f}",
        f"{'m':>4} {'n':>4}  {'previous ms':>16}  {'current ms':>16}  {'warm start ms':>16}  {'prev/current':>12}"
        + (f"  {'quadprog primal ms':>18}" if quadprog is not None else ""),
        "                 (wall / cpu)      (wall / cpu)      (wall / cpu)       (wall)"
        + ("        (wall / cpu)" if quadprog is not None else ""),
    ]

    def row(label: str, t: dict[str, tuple[float, float]]) -> str:
        cells = "  ".join(f"{t[s][0]:7.3f} / {t[s][1]:6.3f}" for s in ("previous", "current", "warm"))
        last = f"  {t['quadprog'][0]:9.3f} / {t['quadprog'][1]:6.3f}" if "quadprog" in t else ""
        return f"{label}  {cells}  {t['previous'][0] / t['current'][0]:11.1f}x{last}"

    with single_threaded_blas():
        for m, n in CASES:
            problems = gem_problems(m, n)
            cases = {s: (lambda s=s: solve_all(problems, s, quadprog)) for s in solvers}
            lines.append(row(f"{m:4d} {n:4d}", interleaved(cases, len(problems), ROUNDS)))
        small = gem_problems(4, 8, count=64)
        lines.append(row("   4    8", interleaved(batch_cases(small), len(small), ROUNDS)))
    lines.append("last row: solve_nonneg_qp_batch on 64 problems (previous: its loop of single solves), ms per problem")
    if quadprog is not None:
        lines.append("quadprog primal: quadprog.solve_qp on GEM's primal (n variables, m unit constraints), compiled")
    print("\n" + "\n".join(lines), flush=True)
