"""A step plan: the active objectives compiled against the current parameter list.

The plan fixes, until the objectives or the parameters change, everything a backend needs
to run a step without looking at objectives again:

- which parameters are covered (``positions``, indices into the optimizer's flat parameter
  list) and, per covered parameter, the objectives' direction rows that touch it;
- the flat layout of the coefficients a backend writes (per block a ``(T_b, r_b)`` matrix,
  then one ``||h_t||^2`` per covered tensor) and of the weights it reads back (the same
  per-block matrices);
- the per-tensor damping factors ``1 / (1 + sum_o lam_o F_hat_o)``;
- the host rule (``gradsafe.rule.HostRule``), with its Gram matrices precomputed.

Kernels know nothing of objectives: a backend reads only this.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from .objective import ProtectedObjective
from .rule import HostRule
from .surgery import normalize_fisher

__all__ = ["Block", "Plan", "build_plan"]


@dataclass
class Block:
    """One objective's part of the step."""

    objective: ProtectedObjective
    rows: torch.Tensor  # (r, N) float32 direction rows over the objective's coverage
    n_basis: int
    n_mean: int
    n_refs: int
    positions: list[int]  # plan tensor positions, in the objective's coverage order
    slices: list[slice]  # each covered tensor's columns in ``rows``
    coef_offset: int  # start of this block's (T_b, r_b) matrix in the flat coefficients
    acts: bool  # whether the rule gives it non-zero weights

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tensors(self) -> int:
        return len(self.positions)

    @property
    def coef_numel(self) -> int:
        return self.num_rows * self.num_tensors

    @property
    def scope(self) -> str:
        return self.objective.config.scope

    @property
    def mode(self) -> str:
        return self.objective.config.mode

    def apply_rows(self) -> slice:
        """The contiguous rows that can get non-zero weights (the apply pass reads only these)."""
        if self.mode == "conflict":
            return slice(1, self.num_rows) if self.n_refs else slice(0, 1)
        return slice(0, self.n_basis) if self.acts else slice(0, 0)

    def basis_rows(self) -> list[int]:
        return list(range(self.n_basis))

    def mean_row(self) -> int:
        return self.n_basis

    def constraint_rows(self) -> list[int]:
        """Rows that are conflict constraints (empty unless mode == "conflict")."""
        if self.mode != "conflict":
            return []
        if self.objective.config.references == "samples":
            return list(range(self.n_basis + self.n_mean, self.num_rows))
        return [self.mean_row()]


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
    versions: tuple[int, ...] = field(default_factory=tuple)
    active: frozenset[int] = frozenset()
    cache: dict = field(default_factory=dict)  # backends keep per-plan views and uploads here

    @property
    def num_tensors(self) -> int:
        return len(self.param_indices)

    @property
    def weight_numel(self) -> int:
        return self.norms_offset


def build_plan(
    objectives: Sequence[ProtectedObjective],
    params: Sequence[torch.Tensor],
    active: Collection[int] | None = None,
) -> Plan:
    """Compile the objectives against the current flat parameter list.

    ``active``: the parameters that take part in this step (those with a gradient); the
    others are left out of the problem, as the base optimizer leaves them out of its step.
    An objective none of whose parameters is active gets no block.
    """
    active = set(range(len(params))) if active is None else set(active)
    covered = sorted({i for o in objectives for i in o.coverage if i in active})
    pos_of = {i: p for p, i in enumerate(covered)}
    devices = {params[i].device for i in covered}
    if len(devices) > 1:
        raise ValueError(f"protected parameters live on several devices {devices}; not supported yet")
    device = devices.pop() if devices else torch.device("cpu")

    blocks: list[Block] = []
    touching: list[list[tuple[int, slice]]] = [[] for _ in covered]
    offset = 0
    for obj in objectives:
        rows, n_basis, n_mean, n_refs = obj.direction_rows()
        kept = [(pos_of[i], sl) for i, sl in zip(obj.coverage, obj.slices()) if i in active]
        if not kept:
            continue
        block = Block(
            objective=obj,
            rows=rows,
            n_basis=n_basis,
            n_mean=n_mean,
            n_refs=n_refs,
            positions=[p for p, _ in kept],
            slices=[sl for _, sl in kept],
            coef_offset=offset,
            acts=obj.config.acts,
        )
        for pos, sl in zip(block.positions, block.slices):
            touching[pos].append((len(blocks), sl))
        offset += block.coef_numel
        blocks.append(block)
    norms_offset = offset
    coef_numel = offset + len(covered)

    damp_excess: list[torch.Tensor | None] = [None] * len(covered)
    for obj in objectives:
        lam = obj.config.damping
        if lam <= 0:
            continue
        f_hat = normalize_fisher(obj.fisher)
        for i, sl in zip(obj.coverage, obj.slices()):
            if i not in active:
                continue
            p = pos_of[i]
            part = lam * f_hat[sl]
            damp_excess[p] = part.clone() if damp_excess[p] is None else damp_excess[p] + part
    damp_factors = [None if e is None else 1.0 / (1.0 + e) for e in damp_excess]

    rule = HostRule(blocks, touching)
    return Plan(
        param_indices=covered,
        blocks=blocks,
        touching=touching,
        damp_factors=damp_factors,
        coef_numel=coef_numel,
        norms_offset=norms_offset,
        rule=rule,
        device=device,
        versions=tuple(o.version for o in objectives),
        active=frozenset(active),
    )
