"""An objective's memory as a record: its layout over the parameters, and its tensors.

``ObjectiveLayout`` is fixed when the objective is registered (which parameters it covers,
their shapes, which get flat memory). ``Memory`` holds the tensors; every change
(``gradsafe.memory.merge``, ``budget``, ``shard``) returns a new record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..factored import FactorMemory
from ..sharding import ShardSpec

__all__ = ["ObjectiveLayout", "Columns", "Memory", "EMPTY"]


@dataclass(frozen=True)
class ObjectiveLayout:
    """The covered parameters (indices into the optimizer's flat list), their shapes, and the
    positions (in coverage order) whose memory is flat rows; the others are factored
    matrices (scope "factored": 2-D and larger weights)."""

    coverage: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    flat_index: tuple[int, ...]

    @classmethod
    def of(cls, coverage: Sequence[int], shapes: Sequence[Sequence[int]], factored: bool) -> "ObjectiveLayout":
        shapes = tuple(torch.Size(s) for s in shapes)
        flat = tuple(t for t, s in enumerate(shapes) if len(s) < 2) if factored else tuple(range(len(shapes)))
        return cls(tuple(coverage), shapes, flat)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        n = self.numels
        return tuple(sum(n[:i]) for i in range(len(n)))

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def slices(self) -> list[slice]:
        """Each covered tensor's columns in packed samples (whole tensors)."""
        return [slice(o, o + n) for o, n in zip(self.offsets, self.numels)]

    def flat_part(self, S: torch.Tensor) -> torch.Tensor:
        """The columns of packed samples ``S`` that flat memory covers."""
        if len(self.flat_index) == len(self.shapes):
            return S
        sl = self.slices()
        return torch.cat([S[:, sl[t]] for t in self.flat_index], dim=1) if self.flat_index else S[:, :0]

    def columns(self, shard: ShardSpec | None) -> "Columns":
        """Where each tensor's entries sit in the memory (this rank's part when sharded)."""
        mem = tuple(shard.local_numel(t) for t in range(len(self.shapes))) if shard else self.numels
        flat = [mem[t] for t in self.flat_index]
        return Columns(
            numels=mem,
            offsets=tuple(sum(mem[:i]) for i in range(len(mem))),
            flat_index=self.flat_index,
            flat_offsets=tuple(sum(flat[:i]) for i in range(len(flat))),
            flat_numel=sum(flat),
        )


@dataclass(frozen=True)
class Columns:
    """The memory's column layout: per covered tensor its entries held (``numels``) and
    offsets in the Fisher, and the flat tensors' offsets in the row storage."""

    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    flat_index: tuple[int, ...]
    flat_offsets: tuple[int, ...]
    flat_numel: int

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def memory_slices(self) -> list[slice]:
        """Each covered tensor's entries in the Fisher diagonal."""
        return [slice(o, o + n) for o, n in zip(self.offsets, self.numels)]

    def flat_slices(self) -> list[slice]:
        """Each flat-memory tensor's columns in the row storage (``flat_index`` order)."""
        return [slice(o, o + self.numels[t]) for o, t in zip(self.flat_offsets, self.flat_index)]


@dataclass(frozen=True)
class Memory:
    """The tensors of one objective's memory, float32 on the covered parameters' device.

    ``storage`` (k + 1 + m, N_flat): the rows ``[basis; mean reference; kept samples]`` over
    the flat tensors packed in coverage order (the step reads row ranges of it, no copy);
    ``energies``: the basis directions' singular values ((k,) for scope "global", (T, k)
    per tensor otherwise); ``fisher`` (N,): the online-averaged empirical Fisher, or None;
    ``factors``: per factored matrix (position in the coverage) its ``FactorMemory``;
    ``fixed_factors``: those given as bases (activation bases), which merges leave alone;
    ``shard``: under FSDP2, the sharding whose rank's columns this memory holds
    (``fisher_mean``: then the global mean of the Fisher).
    """

    storage: torch.Tensor | None = None
    n_basis: int = 0
    has_samples: bool = False
    energies: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    fisher_mean: float | None = None
    factors: Mapping[int, FactorMemory] = field(default_factory=dict)
    fixed_factors: frozenset[int] = frozenset()
    num_samples: int = 0
    shard: ShardSpec | None = None
    fisher_fixed: bool = False  # a Fisher given by the user (EWC): merges leave it as it is

    @property
    def basis(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage[: self.n_basis]

    @property
    def mean_ref(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage[self.n_basis]

    @property
    def sample_refs(self) -> torch.Tensor | None:
        return self.storage[self.n_basis + 1 :] if self.storage is not None and self.has_samples else None


EMPTY = Memory()


def pack_rows(basis: torch.Tensor, mean_ref: torch.Tensor, sample_refs: torch.Tensor | None) -> torch.Tensor:
    """``[basis; mean_ref; sample_refs]`` as one contiguous float32 row storage."""
    rows = [basis, mean_ref[None]] + ([sample_refs] if sample_refs is not None else [])
    return torch.cat(rows).to(torch.float32).contiguous()
