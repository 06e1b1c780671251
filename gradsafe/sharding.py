"""FSDP2 support: memory sharded like the parameters, coefficients summed across ranks.

Under ``torch.distributed.fsdp.fully_shard`` a parameter and its gradient are DTensors
sharded on dim 0 (``Shard(0)`` on a 1-D mesh; torch.chunk sizes, so the last ranks may hold
fewer rows or none). An objective's memory is sharded the same way: each rank keeps, per
covered tensor, the columns of its rows (flat rows, the Fisher diagonal, a factored left
basis and the reference's left factor); what is not indexed by dim 0 (a factored right
basis) is replicated. Every coefficient of the step is a sum over entries, so each rank
computes its partial sums and one ``all_reduce`` gives everyone the global coefficients;
the rule then runs identically on every rank. Merging new samples gathers the memory,
merges on every rank (the same computation on the same numbers), and keeps the local part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ShardSpec", "is_dtensor", "local", "full", "shard_spec", "all_reduce_arrays", "COUNTERS"]

# collective calls made by gradsafe in the current process, by kind (tests read these)
COUNTERS = {"step_all_reduce": 0, "plan_all_reduce": 0, "gather": 0}


def is_dtensor(x: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view), or the tensor itself."""
    return x.to_local() if is_dtensor(x) else x


def full(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), or the tensor itself."""
    return x.full_tensor() if is_dtensor(x) else x


def chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) of dim 0 held by ``rank`` under torch.chunk sharding of ``n`` rows."""
    c = -(-n // world) if n else 0
    off = min(rank * c, n)
    return off, max(0, min(c, n - off))


@dataclass(frozen=True)
class ShardSpec:
    """How an objective's covered tensors are sharded (per coverage entry)."""

    group: Any  # the process group of the mesh
    rank: int
    world: int
    shapes: tuple[torch.Size, ...]
    mesh: Any = None

    def rows(self, t: int) -> tuple[int, int]:
        return chunk_rows(int(self.shapes[t][0]), self.world, self.rank)

    def row_numel(self, t: int) -> int:
        return int(math.prod(self.shapes[t][1:]))

    def local_numel(self, t: int) -> int:
        return self.rows(t)[1] * self.row_numel(t)

    def cols(self, t: int) -> slice:
        """The rank's entries within tensor ``t``'s flattened (row-major) numbering."""
        off, n = self.rows(t)
        rn = self.row_numel(t)
        return slice(off * rn, (off + n) * rn)

    def gather_rows(self, x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
        """All ranks' pieces of ``x`` (this rank's rows of tensor ``t`` along ``dim``), concatenated."""
        COUNTERS["gather"] += 1
        n = int(self.shapes[t][0])
        c = -(-n // self.world) if n else 0
        pad_shape = list(x.shape)
        pad_shape[dim] = c
        padded = x.new_zeros(pad_shape)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        pieces = [p.narrow(dim, 0, chunk_rows(n, self.world, r)[1]) for r, p in enumerate(parts)]
        return torch.cat(pieces, dim=dim)

    def dtensor(self, x: torch.Tensor, dim: int, global_shape: Sequence[int]) -> Any:
        """``x`` (this rank's rows along ``dim``) as a DTensor of ``global_shape`` (checkpoints)."""
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size(global_shape)
        stride = tuple(int(math.prod(shape[i + 1 :])) for i in range(len(shape)))
        return DTensor.from_local(x.contiguous(), self.mesh, [Shard(dim)], run_check=False, shape=shape, stride=stride)

    def all_reduce_(self, x: torch.Tensor, kind: str = "step_all_reduce") -> torch.Tensor:
        COUNTERS[kind] += 1
        dist.all_reduce(x, group=self.group)
        return x


def shard_spec(params: Sequence[torch.Tensor], coverage: Sequence[int]) -> ShardSpec | None:
    """The spec of the covered parameters if they are FSDP2 DTensors (Shard(0), 1-D mesh), else None."""
    covered = [params[i] for i in coverage]
    kinds = {is_dtensor(p) for p in covered}
    if kinds == {False}:
        return None
    if kinds != {True}:
        raise ValueError("an objective covers both sharded (DTensor) and plain parameters; not supported")
    from torch.distributed.tensor import Shard

    mesh = covered[0].device_mesh
    for p in covered:
        if p.device_mesh != mesh:
            raise ValueError("an objective covers DTensor parameters on different device meshes; not supported")
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"gradsafe supports DTensor parameters sharded as FSDP2 does (Shard(0) on a 1-D mesh); "
                f"got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh"
            )
    group = mesh.get_group()
    return ShardSpec(group, dist.get_rank(group), dist.get_world_size(group), tuple(p.shape for p in covered), mesh)


def all_reduce_arrays(arrays: list[np.ndarray], spec: ShardSpec) -> list[np.ndarray]:
    """Sum host arrays across ranks in one collective (plan-time Grams)."""
    if not arrays:
        return arrays
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64))
    spec.all_reduce_(flat, kind="plan_all_reduce")
    out, off = [], 0
    for a in arrays:
        out.append(flat[off : off + a.size].numpy().reshape(a.shape))
        off += a.size
    return out
