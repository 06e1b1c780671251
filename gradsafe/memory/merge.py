"""Building memory from gradient samples, as pure functions: each returns a new ``Memory``.

What each part is and how it grows belongs to its operator: the basis to the projection
(``operators.projection.merge_flat_basis``), the references to the conflict projection
(``operators.conflict.merge_references``), the Fisher to damping
(``operators.damping.merge_fisher``), factored bases to the factored scope
(``factored.merge_factors``). Every objective keeps references and (flat scopes) a Fisher;
a basis only if its step reads one (``reads_basis``): the monitor's subspace energy of a
conflict objective comes from its constraint rows.

One exception to "a new record": ``refresh_in_place``, a live reference's refresh whose
memory keeps its shape, writes the fresh gradient into the record's rows (and Fisher).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..factored import FactorMemory, matrix_shape, merge_factors
from ..operators.conflict import merge_references
from ..operators.damping import keeps_fisher, mean_squared, merge_fisher
from ..operators.ewc import online_fisher
from ..operators.projection import merge_flat_basis
from .budget import apply_budget
from .record import Memory, ObjectiveLayout, pack_rows
from .shard import shard, unshard

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["merge", "from_bases", "check_packed", "all_finite", "reads_basis", "refreshes_in_place", "lends_rows", "refresh_in_place"]


def check_packed(S: torch.Tensor, numel: int, name: str) -> None:
    if S.ndim != 2 or S.shape[1] != numel:
        raise ValueError(f"objective {name!r}: packed samples must be (m, {numel}), got {tuple(S.shape)}")
    if not all_finite(S):
        raise ValueError(f"protected gradients for objective {name!r} contain inf or nan")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite: one min/max pass (NaN propagates through both), which
    is many times cheaper on the CPU than ``isfinite(x).all()``."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def reads_basis(config: "ObjectiveConfig") -> bool:
    """Whether the objective's step reads its flat basis (its operator's ``rows_read``).

    One that does not (the conflict projection: only its references) keeps a rank-0 basis:
    nothing else reads it (its report's subspace energy comes from its constraint rows).
    """
    return config.operator.rows_read(config, 1, 0).n_basis > 0


def merge(
    memory: Memory,
    layout: ObjectiveLayout,
    config: "ObjectiveConfig",
    S: torch.Tensor,
    *,
    fresh: bool,
    param_bytes: int,
    name: str = "",
    consolidate_gamma: float | None = None,
) -> Memory:
    """Merge packed samples ``S`` (m, N) into ``memory``; ``fresh``: replace bases and
    references by those of ``S`` (the Fisher keeps its online average; EWC's is left).
    ``consolidate_gamma``: the samples are a new task consolidated into an online-EWC
    objective, whose Fisher becomes ``gamma F_old + F_new``.

    A sharded memory is gathered, merged whole (on every rank alike) and sharded again.
    """
    spec = memory.shard
    whole = unshard(memory, layout) if spec is not None else memory
    merged = _merge_whole(whole, layout, config, S, fresh, consolidate_gamma)
    _check_finite(merged, S, name)
    if config.memory_budget is not None:
        merged = apply_budget(merged, layout, config, param_bytes, name)
    return shard(merged, layout, spec) if spec is not None else merged


def _merge_whole(
    memory: Memory, layout: ObjectiveLayout, config: "ObjectiveConfig", S: torch.Tensor, fresh: bool,
    consolidate_gamma: float | None = None,
) -> Memory:
    prev_count = 0 if fresh else memory.num_samples
    factors = dict(memory.factors)
    if config.scope == "factored":
        sl = layout.slices()
        for t, shape in enumerate(layout.shapes):
            if t in layout.flat_index:
                continue
            m, n = matrix_shape(shape)
            samples = S[:, sl[t]].reshape(S.shape[0], m, n)
            if t in memory.fixed_factors:  # given bases (activations): only the reference moves
                factors[t] = factors[t].with_mean(samples, prev_count)
                continue
            factors[t] = merge_factors(
                None if fresh else factors.get(t), samples,
                sides=config.sides, rank=config.rank, energy=config.energy, prev_count=prev_count,
            )
    F = layout.flat_part(S)
    old = memory.storage is not None and not fresh
    if reads_basis(config):
        basis, energies = merge_flat_basis(
            memory.basis if old else None,
            memory.energies if old else None,
            F,
            layout.columns(None).flat_slices(),
            per_tensor=config.scope != "global",
            rank=config.rank,
            energy=config.energy,
        )
    else:
        basis = F.new_zeros(0, F.shape[1])
        energies = F.new_zeros(0) if config.scope == "global" else F.new_zeros(len(layout.flat_index), 0)
    mean_ref, sample_refs, num_samples = merge_references(
        memory.mean_ref if old else None,
        memory.sample_refs if old else None,
        memory.num_samples,
        F,
        keep_samples=config.rank if config.references == "samples" else None,
    )
    fisher = memory.fisher
    if consolidate_gamma is not None and memory.fisher is not None and not memory.fisher_fixed:
        fisher = online_fisher(memory.fisher, mean_squared(None, 0, S), consolidate_gamma)
    elif config.ewc > 0:
        # EWC's Fisher is the task's: the mean of the squared samples over every sample of
        # the task (count-weighted across merges); a refresh, and a given diagonal, leave it
        if not memory.fisher_fixed and (memory.fisher is None or not fresh):
            fisher = mean_squared(memory.fisher, memory.num_samples, S)
    elif keeps_fisher(config.scope, config.damping):
        fisher = merge_fisher(memory.fisher, S, config.fisher_decay)
    return replace(
        memory,
        storage=pack_rows(basis, mean_ref, sample_refs),
        n_basis=basis.shape[0],
        has_samples=sample_refs is not None,
        energies=energies,
        fisher=fisher,
        factors=factors,
        num_samples=num_samples,
    )


def _check_finite(memory: Memory, S: torch.Tensor, name: str) -> None:
    """Refuse a merge whose results overflowed float32 (finite samples can square to inf)."""
    parts = {"the Fisher diagonal": memory.fisher, "the basis and references": memory.storage}
    for t, fm in memory.factors.items():
        parts[f"the factored memory of covered tensor {t}"] = torch.cat(
            [x.reshape(-1) for x in (fm.left, fm.right, fm.ref_left, fm.ref_right)]
        )
    for what, x in parts.items():
        if x is not None and not all_finite(x):
            raise ValueError(
                f"objective {name!r}: {what} overflowed float32 (the largest protected gradient entry is "
                f"{float(S.abs().max()):.3g}; its square must stay below 3.4e38): scale the protected loss down"
            )


def refreshes_in_place(memory: Memory, layout: ObjectiveLayout, config: "ObjectiveConfig") -> bool:
    """Whether a refresh from one fresh gradient can write it into ``memory``'s rows in place.

    So it can when the merge would give a memory of the same shape whose rows are copies of
    the gradient: flat memory, unsharded, no basis (the operator reads none), the references
    of one sample (``[mean]``, or ``[mean; sample]`` with references="samples" and a rank of
    at least 1), and no damping (the step reads no Fisher, so only the rows change).
    """
    if memory.storage is None or memory.shard is not None or memory.factors or config.scope == "factored":
        return False
    if reads_basis(config) or memory.n_basis != 0 or config.damping > 0:
        return False
    kept = min(1, config.rank) if config.references == "samples" else 0
    return memory.storage.shape[0] == 1 + kept and memory.has_samples == (config.references == "samples")


def lends_rows(memory: Memory, grads: "Sequence[torch.Tensor | None]", fisher_keep: float, fisher_new: float) -> bool:
    """Whether an in-place refresh (``refreshes_in_place`` holds) lends ``grads`` to the step
    instead of copying them into the rows (``ProtectedObjective.lent_rows``).

    On the CPU, when the rows are the mean reference alone, the Fisher takes no pass, and
    every covered tensor has a gradient that is contiguous float32 on the memory's device:
    then the gradient's own tensors are the rows' values, and the copy (a pass over N at
    memory speed there, which a hand-written loop does not make) is left out. On a GPU the
    copy costs microseconds; keeping the gradient alive across the next backward would cost
    N more floats of its memory.
    """
    storage = memory.storage
    if storage.device.type != "cpu" or storage.dtype != torch.float32 or memory.has_samples or storage.shape[0] != 1:
        return False
    if _folds_fisher(memory, fisher_keep, fisher_new):
        return False
    return all(
        g is not None and g.dtype == torch.float32 and g.device == storage.device and g.is_contiguous() for g in grads
    )


def _folds_fisher(memory: Memory, fisher_keep: float, fisher_new: float) -> bool:
    """Whether an in-place refresh with these weights changes the Fisher (a pass over it)."""
    return memory.fisher is not None and not (fisher_keep == 1.0 and fisher_new == 0.0)


@functools.lru_cache(maxsize=256)
def _in_place_columns(layout: ObjectiveLayout) -> tuple[tuple[int, slice, slice], ...]:
    """Per flat tensor: its position in the coverage, its columns in the row storage and in
    the Fisher (unsharded), computed once per layout."""
    return tuple(zip(layout.flat_index, layout.columns(None).flat_slices(), layout.slices()))


def refresh_in_place(
    memory: Memory,
    layout: ObjectiveLayout,
    grads: "Sequence[torch.Tensor | None]",
    fisher_keep: float,
    fisher_new: float,
) -> Memory:
    """Refresh ``memory`` from one fresh gradient, in place (``refreshes_in_place`` holds):
    ``grads`` (one per covered tensor, None: 0) are written into the reference rows, and the
    Fisher becomes ``fisher_keep * fisher + fisher_new * g^2`` (the online average
    ``d F + (1 - d) g^2``, or the objective's scaled form of it). Returns the record, updated:
    the same tensors (the caller checked that ``grads`` are finite).

    The rows get the values ``merge(memory, ..., fresh=True)`` of the packed gradient gives,
    without packing it: each tensor is copied once, into its columns of the storage.
    """
    storage = memory.storage
    mean = storage[0]
    fold = _folds_fisher(memory, fisher_keep, fisher_new)
    columns = _in_place_columns(layout)
    if not fold and all(grads[t] is not None for t, _, _ in columns):  # the common live case: copies only
        torch._foreach_copy_([mean[sl] for _, sl, _ in columns], [grads[t].detach().reshape(-1) for t, _, _ in columns])
        columns = ()
    for t, sl, fsl in columns:
        g = grads[t]
        row = mean[sl]
        if g is None:
            row.zero_()
        else:
            row.copy_(g.detach().reshape(-1))
        if fold:  # while in cache
            fisher = memory.fisher[fsl]
            if fisher_keep == 0.0:
                torch.mul(row, row, out=fisher)
                if fisher_new != 1.0:
                    fisher.mul_(fisher_new)
                continue
            if fisher_keep != 1.0:
                fisher.mul_(fisher_keep)
            fisher.addcmul_(row, row, value=fisher_new)
    if memory.has_samples:  # GEM: the one kept sample is the same gradient
        storage[1].copy_(mean)
    return memory if memory.num_samples == 1 else replace(memory, num_samples=1)


def from_bases(
    layout: ObjectiveLayout,
    config: "ObjectiveConfig",
    factors: Mapping[int, FactorMemory],
    *,
    param_bytes: int,
    name: str = "",
) -> Memory:
    """A factored memory started from given bases (``t`` = position in the coverage), no samples.

    The flat part (1-D tensors) starts empty; samples merged later give the references, the
    Fisher and the flat part's bases, and leave these bases as they are.
    """
    if config.scope != "factored":
        raise ValueError("bases can be given only to scope='factored' objectives")
    for t, fm in factors.items():
        if t in layout.flat_index:
            raise ValueError(f"objective {name!r}: parameter {layout.coverage[t]} is 1-D; it has no factored basis")
        if fm.shape != matrix_shape(layout.shapes[t]):
            raise ValueError(f"objective {name!r}: basis for parameter {layout.coverage[t]} is for a {fm.shape} matrix, "
                             f"the parameter is viewed as {matrix_shape(layout.shapes[t])}")
    device = next(iter(factors.values())).left.device if factors else torch.device("cpu")
    N = layout.columns(None).flat_numel
    memory = Memory(
        storage=pack_rows(torch.zeros(1, N, device=device), torch.zeros(N, device=device), None),
        n_basis=1,
        energies=torch.zeros(len(layout.flat_index), 1, device=device),
        fisher=torch.zeros(layout.numel, device=device) if keeps_fisher(config.scope, config.damping, config.ewc) else None,
        factors=dict(factors),
        fixed_factors=frozenset(factors),
    )
    if config.memory_budget is not None:
        memory = apply_budget(memory, layout, config, param_bytes, name)
    return memory
