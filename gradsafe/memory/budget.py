"""What an objective's memory costs, and fitting it into a budget.

``memory_rows``: bytes per covered tensor (bases, references, Fisher), the numbers of
``ProtectedOptimizer.memory_report()``. ``apply_budget``: a memory whose bases are
truncated so that the whole fits ``config.memory_budget``, keeping the directions that
capture the most energy per byte across all its tensors (and both sides of factored ones).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .record import Memory, ObjectiveLayout, pack_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["MemoryRow", "MemoryReport", "memory_rows", "apply_budget", "budget_bytes"]

_F32 = 4


@dataclass
class MemoryRow:
    """One objective's memory on one covered tensor, in bytes."""

    objective: str
    parameter: str
    shape: tuple[int, ...]
    kind: str  # "flat" or "factored"
    rank: str  # e.g. "8" (flat) or "4+6" (factored left+right)
    basis: int
    reference: int
    fisher: int
    param_bytes: int

    @property
    def total(self) -> int:
        return self.basis + self.reference + self.fisher


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass
class MemoryReport:
    """Bytes per objective and covered tensor; ``str()`` is a table."""

    rows: list[MemoryRow]
    param_bytes: int  # all the optimizer's parameters

    def total(self, objective: str | None = None) -> int:
        return sum(r.total for r in self.rows if objective is None or r.objective == objective)

    def by_objective(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.objective] = out.get(r.objective, 0) + r.total
        return out

    def __str__(self) -> str:
        head = ("objective", "parameter", "shape", "scope", "rank", "basis", "refs", "fisher", "total", "% of param")
        lines = []
        for r in self.rows:
            pct = 100.0 * r.total / r.param_bytes if r.param_bytes else 0.0
            lines.append((r.objective, r.parameter, "x".join(map(str, r.shape)), r.kind, r.rank,
                          _fmt_bytes(r.basis), _fmt_bytes(r.reference), _fmt_bytes(r.fisher), _fmt_bytes(r.total), f"{pct:.1f}"))
        for name, total in self.by_objective().items():
            lines.append((name, "(all)", "", "", "", "", "", "", _fmt_bytes(total),
                          f"{100.0 * total / self.param_bytes:.1f}" if self.param_bytes else ""))
        lines.append(("(all)", "", "", "", "", "", "", "", _fmt_bytes(self.total()),
                      f"{100.0 * self.total() / self.param_bytes:.1f}" if self.param_bytes else ""))
        widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(x) for x in lines])


def memory_rows(
    name: str,
    layout: ObjectiveLayout,
    config: "ObjectiveConfig",
    memory: Memory,
    names: list[str] | None = None,
    elem_sizes: list[int] | None = None,
) -> list[MemoryRow]:
    """The objective's bytes per covered tensor. ``names``/``elem_sizes``: per coverage entry."""
    rows = []
    flat_pos = {t: i for i, t in enumerate(layout.flat_index)}
    k_flat = 0 if memory.basis is None else memory.basis.shape[0]
    n_refs = 1 + (0 if memory.sample_refs is None else memory.sample_refs.shape[0])
    # sharded (FSDP2): this rank's bytes
    numels = layout.columns(memory.shard).numels
    for t, (i, shape, numel) in enumerate(zip(layout.coverage, layout.shapes, numels)):
        fisher = _F32 * numel if memory.fisher is not None else 0
        pbytes = numel * (elem_sizes[t] if elem_sizes else _F32)
        pname = names[t] if names else f"param {i}"
        if t in memory.factors:
            fm = memory.factors[t]
            nb = fm.nbytes()
            rows.append(MemoryRow(name, pname, tuple(shape), "factored", f"{fm.rank_left}+{fm.rank_right}",
                                  nb["basis"], nb["reference"], fisher, pbytes))
        else:
            if config.scope == "global":
                k = k_flat
            else:
                e = memory.energies[flat_pos[t]] if memory.energies is not None and memory.energies.ndim == 2 else None
                k = int((e > 0).sum()) if e is not None else k_flat
            # the row storage is (k_flat + refs) x N: a tensor of lower rank still pays k_flat rows
            rows.append(MemoryRow(name, pname, tuple(shape), "flat", str(k),
                                  _F32 * numel * k_flat, _F32 * numel * n_refs, fisher, pbytes))
    return rows


def budget_bytes(config: "ObjectiveConfig", param_bytes: int) -> int:
    """The budget in bytes (a float budget is a fraction of the covered parameters' bytes)."""
    b = config.memory_budget
    if b is None:
        raise ValueError("the objective has no memory_budget")
    return int(b * param_bytes) if isinstance(b, float) else int(b)


def apply_budget(memory: Memory, layout: ObjectiveLayout, config: "ObjectiveConfig", param_bytes: int, name: str = "") -> Memory:
    """``memory`` with its bases truncated so that it fits ``config.memory_budget``.

    Fixed costs (references over flat tensors, the Fisher diagonal) come first. Every basis
    direction is a candidate worth its share of its group's captured energy (a group: one
    flat tensor, one side of one factored matrix, or the whole global basis) per byte it
    costs; the best are kept greedily, which keeps each group's leading directions. A
    factored direction costs its basis row and its column of the projected reference,
    ``4 (m + n)`` bytes; a flat direction ``4 n_t`` (``4 N`` for a global basis).
    """
    budget = budget_bytes(config, param_bytes)
    flat_numel = layout.columns(memory.shard).flat_numel
    refs = 1 + (0 if memory.sample_refs is None else memory.sample_refs.shape[0])
    # the flat row storage holds at least one basis row, unless the objective keeps none
    basis_row = 1 if memory.n_basis else 0
    fixed = _F32 * flat_numel * (refs + basis_row) + (_F32 * layout.numel if memory.fisher is not None else 0)
    if fixed > budget:
        raise ValueError(
            f"objective {name!r}: memory_budget of {budget} bytes is below its fixed memory "
            f"({fixed} bytes: references over 1-D/flat tensors and the Fisher diagonal); raise the budget"
        )
    # candidate groups: (key, per-direction share of the group's energy (descending), cost)
    groups: list[tuple[tuple, list[float], int]] = []
    for t, fm in memory.factors.items():
        m, n = fm.shape
        groups.append((("L", t), _shares(fm.left_energy[None]), _F32 * (m + n)))
        groups.append((("R", t), _shares(fm.right_energy[None]), _F32 * (m + n)))
    if flat_numel:
        # the flat rows are one (k, N) storage: a row costs 4 N whatever tensor it serves,
        # and is worth the largest share it holds of any tensor's energy
        e = memory.energies if memory.energies.ndim == 2 else memory.energies[None]
        groups.append((("F",), _shares(e), _F32 * flat_numel))
    keep: dict[tuple, int] = {key: 0 for key, _, _ in groups}
    if flat_numel and groups[-1][1] and groups[-1][1][0] > 0:
        keep[("F",)] = 1  # paid for in the fixed part
    heap = [
        (-share / cost, key, j, cost)
        for key, shares, cost in groups
        for j, share in enumerate(shares)
        if share > 0 and j >= keep[key]
    ]
    heapq.heapify(heap)
    left = budget - fixed
    while heap:
        _, key, j, cost = heapq.heappop(heap)
        if cost > left:
            continue
        if j == keep[key]:  # a group's directions are taken in order (energies descend)
            keep[key] = j + 1
            left -= cost
    return _truncated(memory, flat_numel, keep)


def _shares(e: torch.Tensor) -> list[float]:
    """Per direction (column of ``e``, one row per tensor): the largest share of a tensor's energy."""
    e2 = e.double().pow(2)
    total = e2.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return (e2 / total).max(dim=0).values.tolist() if e2.shape[1] else []


def _truncated(memory: Memory, flat_numel: int, keep: dict[tuple, int]) -> Memory:
    factors = dict(memory.factors)
    for t, fm in memory.factors.items():
        kl, kr = keep[("L", t)], keep[("R", t)]
        if kl < fm.rank_left or kr < fm.rank_right:
            factors[t] = fm.truncate(kl, kr)
    if not flat_numel:
        return replace(memory, factors=factors)
    k = keep[("F",)]
    if k == 0 and memory.n_basis == 0:  # an objective that keeps no basis (conflict)
        return replace(memory, factors=factors)
    if k == 0:  # the row storage always has a basis row: keep one zero row
        basis = memory.basis.new_zeros(1, flat_numel)
        energies = memory.energies.new_zeros(memory.energies.shape[:-1] + (1,))
    else:
        basis, energies = memory.basis[:k], memory.energies[..., :k]
    sample_refs = None if memory.sample_refs is None else memory.sample_refs.clone()
    return replace(
        memory,
        storage=pack_rows(basis.clone(), memory.mean_ref.clone(), sample_refs),
        n_basis=basis.shape[0],
        energies=energies.contiguous(),
        factors=factors,
    )
