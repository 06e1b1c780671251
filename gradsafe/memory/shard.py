"""FSDP2: keeping only this rank's columns of a memory, and gathering it back whole.

A sharded memory holds, of every covered tensor, the rows of the parameter this rank owns
(``ShardSpec``): its columns of the flat row storage and of the Fisher, and of a factored
matrix its columns of the left basis and rows of the reference's right factor.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..factored import FactorMemory
from ..sharding import ShardSpec
from .record import Memory, ObjectiveLayout

__all__ = ["shard", "unshard"]


def shard(memory: Memory, layout: ObjectiveLayout, spec: ShardSpec, name: str = "") -> Memory:
    """Keep only this rank's part of a whole memory."""
    if memory.shard is not None:
        raise RuntimeError(f"objective {name!r} is already sharded")
    flat = layout.columns(None).flat_slices()
    cols = [spec.cols(t) for t in range(len(layout.shapes))]
    storage = memory.storage
    if storage is not None:
        parts = [storage[:, sl][:, cols[t]] for sl, t in zip(flat, layout.flat_index)]
        storage = (torch.cat(parts, dim=1) if parts else storage[:, :0]).contiguous()
    fisher, fisher_mean = memory.fisher, memory.fisher_mean
    if fisher is not None:
        fisher_mean = float(fisher.double().mean()) if fisher.numel() else 0.0
        fisher = torch.cat([fisher[sl][cols[t]] for t, sl in enumerate(layout.slices())]).contiguous()
    factors = {}
    for t, fm in memory.factors.items():
        off, n = spec.rows(t)
        factors[t] = FactorMemory(fm.shape, fm.left[:, off : off + n].contiguous(), fm.left_energy, fm.right,
                                  fm.right_energy, fm.ref_left, fm.ref_right[off : off + n].contiguous())
    return replace(memory, storage=storage, fisher=fisher, fisher_mean=fisher_mean, factors=factors, shard=spec)


def unshard(memory: Memory, layout: ObjectiveLayout) -> Memory:
    """Gather the whole memory on every rank (a collective)."""
    spec = memory.shard
    if spec is None:
        return memory
    cols = layout.columns(spec)
    storage = memory.storage
    if storage is not None:
        R = storage.shape[0]
        parts = []
        for sl, t in zip(cols.flat_slices(), layout.flat_index):
            piece = storage[:, sl].reshape(R, spec.rows(t)[1], spec.row_numel(t))
            parts.append(spec.gather_rows(piece, t, dim=1).reshape(R, -1))
        storage = (torch.cat(parts, dim=1) if parts else storage).contiguous()
    fisher = memory.fisher
    if fisher is not None:
        fisher = torch.cat([
            spec.gather_rows(fisher[sl].reshape(spec.rows(t)[1], spec.row_numel(t)), t, dim=0).reshape(-1)
            for t, sl in enumerate(cols.memory_slices())
        ])
    factors = {
        t: FactorMemory(fm.shape, spec.gather_rows(fm.left, t, dim=1), fm.left_energy, fm.right,
                        fm.right_energy, fm.ref_left, spec.gather_rows(fm.ref_right, t, dim=0))
        for t, fm in memory.factors.items()
    }
    return replace(memory, storage=storage, fisher=fisher, fisher_mean=None, factors=factors, shard=None)
