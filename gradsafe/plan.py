"""A step plan: the active objectives compiled against the current parameter list.

The plan fixes, until the objectives or the parameters change, everything a backend needs
to run a step without looking at objectives again:

- which parameters are covered (``positions``, indices into the optimizer's flat parameter
  list) and, per covered parameter, the objectives' direction rows that touch it;
- the flat layout of the coefficients a backend writes (per block a ``(T_b, r_b)`` matrix,
  then one ``||h_t||^2`` per covered tensor) and of the weights it reads back (the same
  per-block matrices);
- the per-tensor damping factors ``1 / (1 + sum_o lam_o F_hat_o)``;
- the host rule (``gradsafe.rule.HostRule``), with its Gram matrices precomputed (and updated
  in place, ``Plan.update_rows``, when an objective's rows are rewritten without a change
  of shape: a live reference's refresh);
- the factored operators (``gradsafe.factored.FactorOp``), one per matrix that a
  factored project objective covers, applied before the rule (docs/math.md section 7).

Kernels know nothing of objectives: a backend reads only this.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .factored import NUM_STATS, FactorOp, FactorStat, side_kinv
from .numerics import LowRankRow
from .operators.damping import damping_factors
from .rule import HostRule
from .sharding import ShardSpec, all_reduce_arrays

if TYPE_CHECKING:  # pragma: no cover
    from .objective import ProtectedObjective

__all__ = ["Block", "Plan", "build_plan"]


@dataclass
class Block:
    """One objective's part of the step, as plain data (no live objective).

    ``kind`` "flat": dense rows over flat memory (``rows[:, slices[t]]`` per tensor).
    ``kind`` "lowrank": a factored objective's reference as one row, a ``LowRankRow`` per
    matrix (dense on its 1-D tensors): one constraint over all of them (conflict mode).
    ``kind`` "stats": the matrices of a factored project / observe objective; the factored
    operator stage acts on them, and the block's ``NUM_STATS`` coefficients per tensor are
    the statistics that stage writes.

    What the rule does with the rows (``basis_rows``, ``penalty``, ``constraint``,
    ``live_rows``, ``acts``) is the objective's operator's ``RuleRows``.
    """

    name: str  # the objective's
    mode: str
    scope: str  # how the rule treats the block: "global" (one instance over its tensors) or "tensor"
    rows: torch.Tensor | None  # (r, N_flat) float32 direction rows over the objective's flat memory
    n_basis: int
    n_mean: int
    n_refs: int
    positions: list[int]  # plan tensor positions, in the objective's coverage order
    slices: list[slice | None]  # each covered tensor's columns in ``rows`` (None: a matrix)
    coef_offset: int  # start of this block's (T_b, r_b) matrix in the flat coefficients
    acts: bool  # whether the rule gives it non-zero weights
    penalty: "float | np.ndarray" = 0.0  # on the basis columns (0: hard); per row (k,) or per tensor and row (T, k)
    basis: tuple[int, ...] = ()  # rows that are basis columns of the rule
    constraint: tuple[int, ...] = ()  # rows that are conflict constraints
    live_rows: slice = field(default_factory=lambda: slice(0, 0))  # the contiguous rows that can get non-zero weights
    kind: str = "flat"
    operands: list | None = None  # per tensor: a LowRankRow or dense rows ("lowrank", "stats"; "flat": lent rows)
    n_stats: int = 0  # "stats" blocks: coefficients per tensor
    factors: list | None = None  # stats blocks: per tensor its FactorMemory
    factor_strength: float | None = None  # stats blocks: the factored operator's strength (None: it measures)
    rho: float = 0.0  # SafeGrad's weight: rho times the mean reference joins the step after the surgery
    coverage_ids: tuple[int, ...] = ()  # "flat" blocks: each tensor's position in the objective's coverage

    @property
    def num_rows(self) -> int:
        if self.n_stats:
            return self.n_stats
        return self.rows.shape[0] if self.operands is None else 1

    def dense_rows(self) -> torch.Tensor:
        """The block's rows over the objective's flat memory, ``(r, N_flat)``: ``rows`` itself, or
        (a "flat" block reading lent rows, ``Plan.update_rows``) a new tensor of the operands
        in their columns (columns of tensors outside the step are zero)."""
        if self.operands is None:
            return self.rows
        out = self.rows.new_zeros(self.rows.shape)
        for op, sl in zip(self.operands, self.slices):
            out[:, sl] = op
        return out

    def operand(self, t: int) -> "torch.Tensor | LowRankRow":
        """All of the block's rows on its ``t``-th tensor: dense ``(r, n_t)`` or a ``LowRankRow``."""
        if self.operands is not None:
            return self.operands[t]
        return self.rows[:, self.slices[t]]

    def mean_operand(self, t: int) -> "torch.Tensor | LowRankRow":
        """The mean reference on the ``t``-th tensor: dense ``(1, n_t)`` or a ``LowRankRow``."""
        if self.operands is not None:
            op = self.operands[t]
            return op if isinstance(op, LowRankRow) else op[self.mean_row() : self.mean_row() + 1]
        return self.rows[self.mean_row() : self.mean_row() + 1, self.slices[t]]

    @property
    def num_tensors(self) -> int:
        return len(self.positions)

    @property
    def coef_numel(self) -> int:
        return self.num_rows * self.num_tensors

    def apply_rows(self) -> slice:
        """The contiguous rows that can get non-zero weights (the apply pass reads only these)."""
        return self.live_rows

    def basis_rows(self) -> list[int]:
        """Rows that enter the rule as basis columns."""
        return list(self.basis)

    def mean_row(self) -> int:
        return self.n_basis

    @property
    def stats_block(self) -> bool:
        """Whether the block's coefficients are the factored stage's statistics."""
        return self.n_stats > 0

    def constraint_rows(self) -> list[int]:
        """Rows that are conflict constraints."""
        return list(self.constraint)


@dataclass
class Plan:
    """Everything a backend needs for one step; see the module docstring."""

    param_indices: list[int]  # covered parameters (indices into the flat parameter list)
    blocks: list[Block]
    touching: list[list[tuple[int, slice]]]  # per position: (block index, columns) pairs
    damp_factors: list[torch.Tensor | None]  # per position: 1 / (1 + lam F_hat), or None
    coef_numel: int
    norms_offset: int  # where the T squared norms start in the flat coefficients
    rule: HostRule
    device: torch.device
    factor_ops: list[FactorOp] = field(default_factory=list)
    shard: ShardSpec | None = None  # FSDP2: coefficients are partial sums, all-reduced per step
    versions: tuple[int, ...] = field(default_factory=tuple)  # the objectives' memory versions (structure)
    rows_versions: tuple[int, ...] = field(default_factory=tuple)  # and their in-place row rewrites
    active: frozenset[int] = frozenset()
    operands_version: int = 0  # counts the times a block took other tensors as operands (lent rows)
    # backends keep per-plan views and uploads here; the report its constants ("report")
    cache: dict = field(default_factory=dict)

    @property
    def num_tensors(self) -> int:
        return len(self.param_indices)

    @property
    def weight_numel(self) -> int:
        return self.norms_offset

    @property
    def has_factored(self) -> bool:
        """Whether the plan has factored parts (operators or low-rank rows): torch backend only."""
        return bool(self.factor_ops) or any(b.kind != "flat" for b in self.blocks)

    def update_rows(
        self,
        changed: Collection[int],
        row_norms2: Mapping[str, np.ndarray | None] | None = None,
        lent: Mapping[str, Sequence[torch.Tensor] | None] | None = None,
    ) -> None:
        """Blocks ``changed`` read rows that were rewritten in place (same storage, same shape)
        or lent: update the numbers that depend on them, and nothing else.

        ``lent``: per objective name, its lent rows (``ProtectedObjective.lent_rows``, per
        covered tensor; None: its storage holds them again); a "flat" block of a name in it reads
        them as its operands from now on. Otherwise the blocks' views already see the new rows.
        The rule updates their entries of its tensor Grams and the matrices of their components
        (``HostRule.update_rows``); the report's constants, if built, their entries
        (``ReportConstants.update``). Backends' entries of ``cache`` are dropped (uploads of the
        rule's matrices, the kernels' tables, are stale), except those keyed ``("structure", ...)``:
        views of the same rows, which a rewrite leaves valid (the torch backend's; when a block's
        operands changed, ``operands_version`` tells it to point them at the new ones).
        ``row_norms2``: per objective name, when every row it reads is a copy of one gradient (a
        live reference's refresh), that gradient's squared norm per covered tensor (coverage
        order): its own Gram entries come from them. Unsharded plans only.
        """
        if self.shard is not None:
            raise ValueError("a sharded plan's Grams are summed across ranks: rebuild it instead")
        moved = False  # whether a block's operands are other tensors now
        copies = {}
        for bi in changed:
            b = self.blocks[bi]
            if b.kind != "flat":
                continue
            norms = None if row_norms2 is None else row_norms2.get(b.name)
            if norms is not None:
                copies[bi] = norms[list(b.coverage_ids)]
            if lent is None or b.name not in lent:
                continue
            rows = lent[b.name]
            if rows is None:
                moved = moved or b.operands is not None
                b.operands = None
            else:
                b.operands = [rows[c].view(1, -1) for c in b.coverage_ids]
                moved = True
        self.rule.update_rows(changed, copies)
        report = self.cache.get("report")
        if moved:
            self.operands_version += 1
        kept = {k: v for k, v in self.cache.items() if isinstance(k, tuple) and k[:1] == ("structure",)}
        self.cache.clear()
        self.cache.update(kept)
        if report is not None:
            report.update(self, changed)
            self.cache["report"] = report


def build_plan(
    objectives: Sequence["ProtectedObjective"],
    params: Sequence[torch.Tensor],
    active: Collection[int] | None = None,
) -> Plan:
    """Compile the objectives against the current flat parameter list.

    ``active``: the parameters that take part in this step (those with a gradient); the
    others are left out of the problem, as the base optimizer leaves them out of its step.
    An objective none of whose parameters is active gets no block.
    """
    active = set(range(len(params))) if active is None else set(active)
    # an objective with no memory (an EWC penalty alone) has no part in the surgery
    versions = tuple(o.version for o in objectives)
    rows_versions = tuple(o.rows_version for o in objectives)
    objectives = [o for o in objectives if o.memory.storage is not None or o.memory.factors]
    covered = sorted({i for o in objectives for i in o.coverage if i in active})
    pos_of = {i: p for p, i in enumerate(covered)}
    devices = {params[i].device for i in covered}
    if len(devices) > 1:
        raise ValueError(f"protected parameters live on several devices {devices}; not supported yet")
    device = devices.pop() if devices else torch.device("cpu")

    blocks: list[Block] = []
    touching: list[list[tuple[int, slice | None]]] = [[] for _ in covered]
    offset = 0

    def add(block: Block) -> None:
        nonlocal offset
        block.coef_offset = offset
        for pos, sl in zip(block.positions, block.slices):
            touching[pos].append((len(blocks), sl))
        offset += block.coef_numel
        blocks.append(block)

    for obj in objectives:
        cfg = obj.config
        op = cfg.operator
        span = obj.row_span()
        rows = obj.memory.storage[span.start : span.stop]
        in_step = [j for j, t in enumerate(obj.flat_index) if obj.coverage[t] in active]
        flat_slices = obj.flat_slices()
        flat = [(pos_of[obj.coverage[obj.flat_index[j]]], flat_slices[j]) for j in in_step]
        rule_rows = op.rule_rows(cfg, span, _step_energies(obj.memory.energies, in_step))
        mats = [(pos_of[obj.coverage[t]], t) for t in sorted(obj.factors) if obj.coverage[t] in active]
        base = dict(name=obj.name, mode=cfg.mode, n_basis=span.n_basis, n_mean=span.n_mean, n_refs=span.n_refs,
                    coef_offset=0, rho=float(cfg.rho))
        ruled = dict(acts=rule_rows.acts, penalty=rule_rows.penalty, basis=rule_rows.basis_rows,
                     constraint=rule_rows.constraint_rows, live_rows=rule_rows.apply_rows)
        if cfg.scope == "factored" and rule_rows.constraint_rows:
            if flat or mats:  # one constraint over the dense 1-D parts and the low-rank matrix parts
                add(Block(rows=rows, positions=[p for p, _ in flat] + [p for p, _ in mats],
                          slices=[sl for _, sl in flat] + [None] * len(mats), kind="lowrank", scope="global",
                          operands=[rows[:, sl] for _, sl in flat] + [obj.factors[t].reference_row() for _, t in mats],
                          **base, **ruled))
            continue
        if flat:
            # flat bases of a factored objective are per tensor
            scope = "tensor" if cfg.scope == "factored" else cfg.scope
            add(Block(rows=rows, positions=[p for p, _ in flat], slices=[sl for _, sl in flat], scope=scope,
                      coverage_ids=tuple(obj.flat_index[j] for j in in_step), **base, **ruled))
        if mats:
            add(Block(rows=None, positions=[p for p, _ in mats], slices=[None] * len(mats), kind="stats", scope="global",
                      operands=[obj.factors[t].reference_row() for _, t in mats], n_stats=NUM_STATS,
                      factors=[obj.factors[t] for _, t in mats], factor_strength=op.factored_strength(cfg),
                      acts=False, **base))
    norms_offset = offset
    coef_numel = offset + len(covered)
    shard = _plan_shard(objectives, active)
    factor_ops = _factor_ops(blocks, len(covered), norms_offset, shard)
    coef_numel += len(factor_ops)
    damp_factors = damping_factors(
        [(obj.config.damping, obj.normalized_fisher, obj.coverage, obj.memory_slices()) for obj in objectives],
        pos_of,
    )

    reduce = None if shard is None else (lambda arrays: all_reduce_arrays(arrays, shard))
    rule = HostRule(blocks, touching, reduce=reduce)
    return Plan(
        shard=shard,
        factor_ops=factor_ops,
        param_indices=covered,
        blocks=blocks,
        touching=touching,
        damp_factors=damp_factors,
        coef_numel=coef_numel,
        norms_offset=norms_offset,
        rule=rule,
        device=device,
        versions=versions,
        rows_versions=rows_versions,
        active=frozenset(active),
    )


def _step_energies(energies: torch.Tensor | None, in_step: list[int]) -> "np.ndarray | None":
    """The basis's singular values on the host: ``(k,)``, or per tensor of the step ``(T, k)``."""
    if energies is None:
        return None
    e = energies.detach().cpu().numpy()
    return e[in_step] if e.ndim == 2 else e


def _factor_ops(blocks: list[Block], num_positions: int, norms_offset: int, shard: ShardSpec | None) -> list[FactorOp]:
    """One ``FactorOp`` per matrix that a factored project / observe block covers."""
    by_pos: dict[int, list[tuple[Block, int]]] = {}
    for b in blocks:
        if b.stats_block:
            for t, p in enumerate(b.positions):
                by_pos.setdefault(p, []).append((b, t))
    ops = []
    for p in sorted(by_pos):
        stats, lefts, ls, rights, rs = [], [], [], [], []
        for b, t in by_pos[p]:
            mem = b.factors[t]
            strength = b.factor_strength
            lrows = rrows = None
            if strength is not None and mem.rank_left:
                start = sum(x.shape[0] for x in lefts)
                lefts.append(mem.left)
                ls.append(strength)
                lrows = slice(start, start + mem.rank_left)
            if strength is not None and mem.rank_right:
                start = sum(x.shape[0] for x in rights)
                rights.append(mem.right)
                rs.append(strength)
                rrows = slice(start, start + mem.rank_right)
            stats.append(FactorStat(mem, b.coef_offset + t * b.num_rows, lrows, rrows))
        shape = (mem.ref_right.shape[0], mem.ref_left.shape[1])  # this rank's rows when sharded
        ops.append(
            FactorOp(
                position=p,
                shape=shape,
                left=torch.cat(lefts).contiguous() if lefts else None,
                left_kinv=side_kinv(lefts, ls, shard) if lefts else None,
                right=torch.cat(rights).contiguous() if rights else None,
                right_kinv=side_kinv(rights, rs) if rights else None,
                stats=stats,
                norm_offset=norms_offset + p,
                removed_offset=0,
            )
        )
    base = norms_offset + num_positions
    for j, op in enumerate(ops):
        op.removed_offset = base + j
    return ops


def _plan_shard(objectives: Sequence["ProtectedObjective"], active: Collection[int]) -> ShardSpec | None:
    """The one sharding all the step's objectives share (FSDP2), or None."""
    live = [o for o in objectives if any(i in active for i in o.coverage)]
    specs = {id(o.shard.group): o.shard for o in live if o.shard is not None}
    if len(specs) > 1:
        raise ValueError("protected objectives are sharded over different process groups; not supported")
    shard = next(iter(specs.values()), None)
    if shard is not None and any(o.shard is None for o in live):
        raise ValueError("some protected objectives are sharded (FSDP2) and others are not; not supported")
    return shard
