"""The pure-torch backend: per-tensor BLAS matrix-vector products on k-major bases.

Factored operators first (``gradsafe.factored.run_factor_ops``: matmuls and one ``addmm_``
per matrix). Then per covered tensor and objective, one ``mv`` (coefficients) and one
in-place ``addmv_`` (combine), or a matmul and an ``addmm_`` for a factored reference;
damping is one ``_foreach_mul_``; each tensor's squared norm is read right after its first
``mv``, while the tensor is still in cache. The coefficients of all tensors land in one flat
buffer that crosses to the host once per step; the weights come back in one transfer.

On the CPU the two passes are cut by columns into chunks of near-equal bytes that
``threads`` threads claim in turn (the MKL build of torch runs a matrix-vector product on one
core, so one thread cannot reach the memory bandwidth: benchmarks/README.md); each chunk's
coefficients are partial sums, added before the rule. Plans with factored parts, steps under
``torch.compile`` and other devices run in one chunk, on the calling thread.

With ``cpu_kernels=True`` the dense coefficient and apply passes of a CPU step run through
compiled loops (``gradsafe.backends.cpu_kernels``, ``kernels/cpu_surgery.cpp``) that read
all of a block's rows and the tensor together, the squared norm in the same pass; the rest
is unchanged.

Precision: a float32 tensor is worked on in place (a float32 copy, written back, when it is
not contiguous); a float64 tensor keeps its own precision: its coefficients are read from a
float32 copy, and the correction ``rows^T w`` (float32, like the rows) is added into it, so
entries the rows do not touch come back bit-exact. Float16 and bfloat16 tensors (and float64
tensors that a factored operator or a low-rank row reads) are worked on in a float32 copy
(float32 accumulation) that is written back.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch

from ..factored import factor_finish, factor_partials, partials_finite, run_factor_ops, sum_across_ranks
from ..numerics import LowRankRow
from ..plan import Plan
from .base import StepRecord
from .cpu_kernels import cpu_kernels_from_env, load_cpu_kernels

__all__ = ["TorchBackend", "partition_columns"]

# A chunk smaller than this many columns is not split off: its share of a pass (~0.1 ms at k = 8)
# would be close to what handing it to a thread costs.
MIN_CHUNK_COLUMNS = 1 << 18
# Chunks per thread: each thread claims the next chunk when it finishes one, so a thread the
# operating system delays holds up the step by about one chunk, not by its whole share.
CHUNKS_PER_THREAD = 4
# Cuts inside a tensor fall on multiples of this many entries (whole cache lines and pages).
CUT_ALIGN = 1024


@dataclass
class _Chunk:
    """One chunk of a step: column ranges ``[lo, hi)`` of the covered tensors.

    ``coef``: (position, lo, hi, operand, coefficient offset, whether this entry also reads
    the range's squared norm); ``apply``: (position, lo, hi, operand for the combine, weight
    slice).
    An operand is a dense view of the rows (``(r, hi - lo)`` for the coefficients,
    ``(hi - lo, r)`` for the combine) or a ``LowRankRow`` (whole matrix, one chunk only).
    """

    coef: list[tuple[int, int, int, "torch.Tensor | LowRankRow", int, bool]] = field(default_factory=list)
    apply: list[tuple[int, int, int, "torch.Tensor | LowRankRow", slice]] = field(default_factory=list)


@dataclass
class _Views:
    """Per-plan views, built once per number of chunks."""

    chunks: list[_Chunk]
    # whether a row's coefficient reads a tensor after its factored operator (then the
    # operator must act before the coefficient pass)
    rows_after_factored: bool
    # positions a factored operator or a low-rank row reads: worked on in float32 whatever their dtype
    float32_only: frozenset[int]
    numels: list[int]
    # the dense entries, to point them at a block's new operands (lent rows): (chunk, "coef" or
    # "apply", entry, block, tensor, lo, hi), and the plan's operands_version they show
    dense: list[tuple[int, str, int, int, int, int, int]] = field(default_factory=list)
    operands_version: int = 0


def partition_columns(costs: list[tuple[int, float]], parts: int, min_columns: int = MIN_CHUNK_COLUMNS,
                      align: int = CUT_ALIGN) -> list[list[tuple[int, int, int]]]:
    """Split tensors into at most ``parts`` contiguous runs of near-equal cost.

    ``costs``: per tensor (in order) its number of columns and its cost per column. Returns
    per part the ``(tensor, lo, hi)`` column ranges it covers; together they cover every
    column once. A cut inside a tensor falls on a multiple of ``align`` and leaves at least
    ``min_columns`` on each side (else it moves to the tensor's edge); empty parts are dropped.
    """
    total = sum(n * c for n, c in costs)
    offsets, start = [], 0
    for n, _ in costs:
        offsets.append(start)
        start += n
    columns = start
    if parts <= 1 or total <= 0 or columns == 0:
        cuts = [0, columns]
    else:
        cuts, acc, t = [0], 0.0, 0
        for j in range(1, parts):
            target = total * j / parts
            while t < len(costs) and acc + costs[t][0] * costs[t][1] <= target:
                acc += costs[t][0] * costs[t][1]
                t += 1
            if t == len(costs):
                break
            n, c = costs[t]
            col = int(round((target - acc) / c / align)) * align if c > 0 else 0
            if col < min_columns:
                col = 0
            elif n - col < min_columns:
                col = n
            cuts.append(offsets[t] + col)
        cuts.append(columns)
    out: list[list[tuple[int, int, int]]] = []
    for lo_g, hi_g in zip(cuts[:-1], cuts[1:]):
        if hi_g <= lo_g:
            continue
        ranges = []
        for t, (n, _) in enumerate(costs):
            lo, hi = max(lo_g - offsets[t], 0), min(hi_g - offsets[t], n)
            if lo < hi:
                ranges.append((t, lo, hi))
        out.append(ranges)
    return out if out else [[]]


def _views(plan: Plan, chunks: int) -> _Views:
    """The plan's operands cut into (at most) ``chunks`` chunks, cached on the plan.

    Views of the plan's rows and offsets only: an in-place rewrite of the rows keeps them
    (``Plan.update_rows`` keeps ``("structure", ...)`` entries); when blocks take other tensors as
    operands (lent rows: ``Plan.operands_version``), the dense entries are pointed at them."""
    key = ("structure", "torch", chunks)
    cached = plan.cache.get(key)
    if cached is not None:
        if cached.operands_version != plan.operands_version:
            _repoint(cached, plan)
        return cached
    coef, apply = [], []
    numels = [0] * plan.num_tensors
    lowrank: set[int] = set()
    # the factored stage writes the squared norms of the tensors it reads
    factored = {op.position for op in plan.factor_ops}
    seen: set[int] = set(factored)
    for bi, b in enumerate(plan.blocks):
        if b.stats_block:
            continue  # its numbers come from the factored stage
        live = b.apply_rows()
        for t, pos in enumerate(b.positions):
            op = b.operand(t)
            if isinstance(op, LowRankRow):
                lowrank.add(pos)
                numels[pos] = op.shape[0] * op.shape[1]
            else:
                numels[pos] = op.shape[1]
            offset = b.coef_offset + t * b.num_rows
            source = (bi, t) if not isinstance(op, LowRankRow) else None
            coef.append((pos, op, offset, pos not in seen, source))
            seen.add(pos)
            if b.acts and live.stop > live.start:
                applied = _live_transposed(op, live)
                apply.append((pos, applied, slice(offset + live.start, offset + live.stop), source))
    # The apply pass runs in reverse: the rows read last by the coefficient pass are the
    # likeliest still to be in cache.
    apply = apply[::-1]
    float32_only = frozenset(factored | lowrank)
    if chunks > 1 and float32_only:
        chunks = 1  # factored parts are whole-matrix matmuls
    if chunks == 1:
        ranges = [[(pos, 0, n) for pos, n in enumerate(numels)]]
    else:
        per_column = [1.0] * plan.num_tensors  # the tensor's own read
        for pos, op, *_ in coef:
            per_column[pos] += op.shape[0]
        for pos, op, *_ in apply:
            per_column[pos] += op.shape[1] + 1  # the rows, and the write
        ranges = partition_columns(list(zip(numels, per_column)), chunks, MIN_CHUNK_COLUMNS, CUT_ALIGN)
    out = []
    dense = []
    for ci, rs in enumerate(ranges):
        where = {pos: (lo, hi) for pos, lo, hi in rs}
        chunk = _Chunk()
        for pos, op, offset, first, source in coef:
            if pos in where:
                lo, hi = where[pos]
                if source is not None:
                    dense.append((ci, "coef", len(chunk.coef), *source, lo, hi))
                chunk.coef.append((pos, lo, hi, _coef_view(op, lo, hi), offset, first))
        for pos, op, live, source in apply:
            if pos in where:
                lo, hi = where[pos]
                if source is not None:
                    dense.append((ci, "apply", len(chunk.apply), *source, lo, hi))
                chunk.apply.append((pos, lo, hi, _apply_view(op, lo, hi), live))
        out.append(chunk)
    cached = plan.cache[key] = _Views(out, any(pos in factored for pos, *_ in coef), float32_only, numels, dense,
                                      plan.operands_version)
    return cached


def _live_transposed(op: "torch.Tensor | LowRankRow", live: slice) -> "torch.Tensor | LowRankRow":
    """The rows ``live`` of an operand ``(r, n)``, transposed to ``(n, r_live)`` for the combine
    (a low-rank operand as it is)."""
    if isinstance(op, LowRankRow):
        return op
    return (op if live.start == 0 and live.stop == op.shape[0] else op[live]).T


def _coef_view(op: "torch.Tensor | LowRankRow", lo: int, hi: int) -> "torch.Tensor | LowRankRow":
    """Columns ``[lo, hi)`` of an operand ``(r, n)`` (itself when whole, or low-rank)."""
    return op if isinstance(op, LowRankRow) or (lo == 0 and hi == op.shape[1]) else op[:, lo:hi]


def _apply_view(op_t: "torch.Tensor | LowRankRow", lo: int, hi: int) -> "torch.Tensor | LowRankRow":
    """Rows ``[lo, hi)`` of a transposed operand ``(n, r)`` (itself when whole, or low-rank)."""
    return op_t if isinstance(op_t, LowRankRow) or (lo == 0 and hi == op_t.shape[0]) else op_t[lo:hi]


def _repoint(views: _Views, plan: Plan) -> None:
    """Point the dense entries at their blocks' current operands (the layout is unchanged)."""
    for ci, kind, j, bi, t, lo, hi in views.dense:
        b = plan.blocks[bi]
        op = b.operand(t)
        chunk = views.chunks[ci]
        if kind == "coef":
            pos, _, _, _, offset, first = chunk.coef[j]
            chunk.coef[j] = (pos, lo, hi, _coef_view(op, lo, hi), offset, first)
        else:
            pos, _, _, _, weights = chunk.apply[j]
            chunk.apply[j] = (pos, lo, hi, _apply_view(_live_transposed(op, b.apply_rows()), lo, hi), weights)
    views.operands_version = plan.operands_version


def _coef_pass(chunk: _Chunk, work: list[torch.Tensor], coefs: torch.Tensor, norms: torch.Tensor, threaded: bool,
               kernels: ModuleType | None = None) -> None:
    """Coefficients (and squared norms) of one chunk's column ranges into ``coefs``; dense rows
    through ``kernels`` (the CPU kernels) when given."""
    for pos, lo, hi, rows, offset, first in chunk.coef:
        h = work[pos]
        if isinstance(rows, LowRankRow):
            coefs[offset] = rows.dot(h.view(rows.shape))
        else:
            if hi - lo != h.shape[0]:
                h = h[lo:hi]
            if kernels is not None:  # the norm in the same pass
                kernels.coefficients(rows, h, coefs[offset : offset + rows.shape[0]], norms[pos : pos + 1] if first else None)
                continue
            torch.mv(rows, h, out=coefs[offset : offset + rows.shape[0]])
        if first:  # |h|^2 right after the first read of h, while it is still in cache
            if threaded:  # a BLAS-2 call: one core, like the chunk's other calls (dot may start threads)
                torch.mv(h.view(1, -1), h, out=norms[pos : pos + 1])
            else:
                torch.dot(h, h, out=norms[pos])


def _apply_pass(chunk: _Chunk, targets: list[torch.Tensor], W: torch.Tensor, fresh: frozenset[int],
                skip: frozenset[tuple[int, int]], kernels: ModuleType | None = None) -> None:
    """``target += rows^T w`` over one chunk's column ranges (dense rows through ``kernels``
    when given).

    A position in ``fresh`` (a correction buffer) is overwritten by its first product; an
    entry whose weights (``live``, as (start, stop)) are in ``skip`` is left out.
    """
    written: set[int] = set()
    for pos, lo, hi, rows_t, live in chunk.apply:
        if (live.start, live.stop) in skip:
            continue
        h = targets[pos]
        if isinstance(rows_t, LowRankRow):
            rows_t.add_to(h.view(rows_t.shape), W[live])
            continue
        if hi - lo != h.shape[0]:
            h = h[lo:hi]
        overwrite = pos in fresh and pos not in written
        if overwrite:
            written.add(pos)
        if kernels is not None:
            kernels.accumulate(rows_t, W[live], h, overwrite)
        elif overwrite:
            torch.mv(rows_t, W[live], out=h)
        else:
            h.addmv_(rows_t, W[live])


def _check_subtract(tensors: list[torch.Tensor], targets: list[torch.Tensor], allowed: bool) -> None:
    if not allowed:
        raise ValueError("subtract_from needs a plan without damping or factored parts (can_subtract)")
    if len(targets) != len(tensors):
        raise ValueError(f"subtract_from has {len(targets)} tensors, expected {len(tensors)}")
    for i, (t, s) in enumerate(zip(tensors, targets)):
        if t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous() or not s.is_contiguous():
            raise ValueError(f"subtract_from: tensor {i} must be contiguous float32 or float64, with its target")
        if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
            raise ValueError(f"subtract_from: tensor {i}'s target is {s.dtype} {tuple(s.shape)} on {s.device}, "
                             f"expected {t.dtype} {tuple(t.shape)} on {t.device}")


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads (a new one after ``fork``: the child
    has none of its parent's threads)."""
    global _pool
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool[0] != pid or _pool[1] < workers:
            if _pool is not None and _pool[0] == pid:
                _pool[2].shutdown(wait=False)
            _pool = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix="gradsafe-torch"))
        return _pool[2]


def _run_chunks(calls: list, threads: int) -> None:
    """Run the calls (no arguments) on ``threads`` threads, this one and the pool's; each
    thread claims the next call in order when it finishes one."""
    if threads <= 1 or len(calls) == 1:
        for call in calls:
            call()
        return
    claims: queue.SimpleQueue = queue.SimpleQueue()
    for call in calls:
        claims.put(call)

    def drain() -> None:
        while True:
            try:
                call = claims.get_nowait()
            except queue.Empty:
                return
            call()

    futures = [_executor(threads - 1).submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for f in futures:
            f.result()


class TorchBackend:
    """The surgery in torch ops (see the module docstring).

    Args:
        threads: how many threads share a CPU step's two passes (default
            ``torch.get_num_threads()``); 1 runs the step on the calling thread alone. A plan
            is cut into up to ``CHUNKS_PER_THREAD`` chunks per thread of at least
            ``MIN_CHUNK_COLUMNS`` columns each; a plan too small for two runs on one thread.
        cpu_kernels: run the dense passes of CPU steps through compiled loops
            (``gradsafe.backends.cpu_kernels``) instead of ``torch.mv`` / ``addmv_``; they are
            built here on first use (a C++ compiler and ninja are needed; ``RuntimeError``
            saying why otherwise). Steps under ``torch.compile`` and on other devices keep the
            torch ops. None (default): on when the environment has ``GRADSAFE_CPU_KERNELS=1``.
    """

    name = "torch"

    def __init__(self, threads: int | None = None, cpu_kernels: bool | None = None) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"TorchBackend(threads=...) must be a whole number >= 1 or None, got {threads!r}")
        if cpu_kernels is None:
            cpu_kernels = cpu_kernels_from_env()
        elif not isinstance(cpu_kernels, bool):
            raise TypeError(f"TorchBackend(cpu_kernels=...) must be True, False or None, got {cpu_kernels!r}")
        self.threads = threads
        self.cpu_kernels = cpu_kernels
        if cpu_kernels:
            load_cpu_kernels()  # built (or found built) now; the module is not kept here, so a copy pickles

    def _split(self, plan: Plan, compiling: bool) -> tuple[int, int]:
        """(chunks, threads) for a step of this plan."""
        if compiling or plan.device.type != "cpu" or plan.factor_ops:
            return 1, 1
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        if threads <= 1:
            return 1, 1
        chunks = max(1, min(threads * CHUNKS_PER_THREAD, sum(_views(plan, 1).numels) // MIN_CHUNK_COLUMNS))
        return chunks, min(threads, chunks)

    def can_subtract(self, plan: Plan) -> bool:
        """Whether ``run(plan, ..., subtract_from=...)`` applies: the plan's change to a tensor
        is then ``rows^T w`` alone (no damping, no factored part)."""
        return not plan.has_factored and all(f is None for f in plan.damp_factors)

    def run(self, plan: Plan, tensors: list[torch.Tensor], subtract_from: list[torch.Tensor] | None = None) -> StepRecord:
        """The step's surgery on ``tensors``, in place.

        ``subtract_from`` (``can_subtract(plan)`` must hold): tensors of the same shapes and
        dtypes, all contiguous float32 or float64 like ``tensors``. ``tensors`` are then only
        read, and the change the surgery would make to each is subtracted from its
        ``subtract_from`` tensor instead (space "update": ``u`` in, the parameters changed).
        """
        if subtract_from is not None:
            _check_subtract(tensors, subtract_from, self.can_subtract(plan))
        compiling = torch.compiler.is_compiling()
        chunks, threads = self._split(plan, compiling)
        views = _views(plan, chunks)
        threaded = len(views.chunks) > 1
        kernels = load_cpu_kernels() if self.cpu_kernels and plan.device.type == "cpu" and not compiling else None

        # own: each tensor as a flat tensor in its own precision (float32 for the rest), the
        # one that damping scales and, unless it has a correction buffer, the apply pass changes
        own: list[torch.Tensor] = []
        writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, t in enumerate(tensors):
            keep64 = t.dtype == torch.float64 and i not in views.float32_only
            if t.is_contiguous() and (t.dtype == torch.float32 or keep64):
                own.append(t.view(-1))
            else:
                w = t.detach().reshape(-1).to(torch.float64 if keep64 else torch.float32, copy=True)
                own.append(w)
                writeback.append((t, w))

        damped = [i for i, f in enumerate(plan.damp_factors) if f is not None]
        if damped:
            torch._foreach_mul_([own[i] for i in damped], [plan.damp_factors[i] for i in damped])

        # work: float32, what the coefficient pass reads; a float64 tensor's float32 copy is
        # then its correction buffer (``rows^T w``, added into it at the end)
        wide = [i for i, w in enumerate(own) if w.dtype == torch.float64]
        work = list(own)
        for i in wide:
            work[i] = own[i].to(torch.float32)

        coefs = torch.empty(plan.coef_numel, dtype=torch.float32, device=plan.device)
        norms = coefs[plan.norms_offset :]
        # the factored operators act first (docs/math.md section 7); when no row reads a
        # tensor they change, their sums across ranks (FSDP2) ride on the coefficients' all-reduce
        staged = partials = None
        finite = True
        if plan.factor_ops:
            if views.rows_after_factored:
                finite = run_factor_ops(plan.factor_ops, work, coefs, plan.shard)
            else:
                staged, partials = factor_partials(plan.factor_ops, work, coefs)
        if threaded:  # each chunk sums its own columns; the chunks are added here
            split = torch.zeros(len(views.chunks), plan.coef_numel, dtype=torch.float32, device=plan.device)
            _run_chunks([
                lambda p=p, out=out: _coef_pass(p, work, out, out[plan.norms_offset :], True, kernels)
                for p, out in zip(views.chunks, split)
            ], threads)
            torch.sum(split, 0, out=coefs)
        else:
            _coef_pass(views.chunks[0], work, coefs, norms, False, kernels)
        if plan.shard is not None:  # FSDP2: each rank summed its own rows; one all-reduce
            sum_across_ranks(partials or [], plan.shard, extra=coefs)
        if staged is not None:
            if partials_finite(partials):
                factor_finish(staged, coefs)
            else:
                finite = False
        host = coefs.cpu().numpy()  # the step's one device-to-host transfer (factored plans: two)
        if compiling:  # branch-free: zero weights below (damping, elementwise, stays)
            finite = np.isfinite(host).all() & finite
        elif not (finite and np.isfinite(host).all()):
            # a non-finite gradient entry (or a sum that overflowed): the rule would spread it
            # to every entry its rows touch. The tensors are handed back as they came (damping
            # undone, to rounding; copies are not written back).
            views_damped = [i for i in damped if own[i].data_ptr() == tensors[i].data_ptr()]
            if views_damped:
                torch._foreach_div_([own[i] for i in views_damped], [plan.damp_factors[i] for i in views_damped])
            return StepRecord(coefs=host, weights=None, finite=False)

        weights = None
        if any(p.apply for p in views.chunks):
            weights = plan.rule.solve(host)
            if compiling:
                weights = np.where(finite, weights, 0.0)
            W = torch.from_numpy(weights.astype(np.float32)).to(plan.device)
            fresh = frozenset(wide)
            # what the correction is added into; a float64 tensor's is its correction buffer
            changed, targets = own, work
            if subtract_from is not None:  # the negated correction, into the other tensors
                W = W.neg_()
                changed = [t.view(-1) for t in subtract_from]
                targets = [work[i] if i in fresh else t for i, t in enumerate(changed)]
            entries = _views(plan, 1).chunks[0].apply  # every (position, weights) pair once
            skip: frozenset[tuple[int, int]] = frozenset()
            if not compiling:  # adding zero (a conflict constraint that holds): skip the pass
                skip = frozenset((e[4].start, e[4].stop) for e in entries if not weights[e[4]].any())
            if threaded:  # last chunks first: their rows are the likeliest still in cache
                _run_chunks([lambda p=p: _apply_pass(p, targets, W, fresh, skip, kernels) for p in views.chunks[::-1]],
                            threads)
            else:
                _apply_pass(views.chunks[0], targets, W, fresh, skip, kernels)
            touched = {pos for pos, *_, live in entries if (live.start, live.stop) not in skip}
            for i in wide:
                if i in touched:  # every chunk over it wrote its range of the buffer
                    changed[i].add_(work[i])

        for t, w in writeback:
            t.copy_(w.view_as(t))
        return StepRecord(coefs=host, weights=weights, finite=finite)
