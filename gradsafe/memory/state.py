"""A memory as tensors and plain values (``torch.load(weights_only=True)``), and back.

Whole memory saves its tensors as they are. Sharded memory (FSDP2) saves each tensor's
rows as a DTensor of the global shape, which ``torch.distributed.checkpoint`` writes per
rank and reshards on load.
"""

from __future__ import annotations

from typing import Any

import torch

from ..factored import FactorMemory
from ..sharding import ShardSpec, local
from .record import Memory, ObjectiveLayout
from .shard import shard as shard_memory

__all__ = ["memory_state", "memory_from_state"]


def memory_state(memory: Memory, layout: ObjectiveLayout) -> dict[str, Any]:
    """The memory's entries of an objective's state dict."""
    state = {
        "basis": memory.basis,
        "energies": memory.energies,
        "mean_ref": memory.mean_ref,
        "sample_refs": memory.sample_refs,
        "fisher": memory.fisher,
        "num_samples": memory.num_samples,
        "factors": {str(t): fm.state_dict() for t, fm in memory.factors.items()},
        "fixed_factors": sorted(memory.fixed_factors),
    }
    if memory.shard is not None:
        state.update(_sharded_state(memory, layout))
    return state


def _sharded_state(memory: Memory, layout: ObjectiveLayout) -> dict[str, Any]:
    spec = memory.shard
    cols = layout.columns(spec)
    R = memory.storage.shape[0]
    rows = [
        spec.dtensor(memory.storage[:, sl].reshape(R, spec.rows(t)[1], *layout.shapes[t][1:]), 1, (R, *layout.shapes[t]))
        for sl, t in zip(cols.flat_slices(), layout.flat_index)
    ]
    fisher = None
    if memory.fisher is not None:
        fisher = [spec.dtensor(memory.fisher[sl].reshape(spec.rows(t)[1], *layout.shapes[t][1:]), 0, layout.shapes[t])
                  for t, sl in enumerate(cols.memory_slices())]
    factors = {}
    for t, fm in memory.factors.items():
        st = fm.state_dict()
        st["left"] = spec.dtensor(fm.left, 1, (fm.rank_left, fm.shape[0]))
        st["ref_right"] = spec.dtensor(fm.ref_right, 0, (fm.shape[0], fm.rank_right))
        factors[str(t)] = st
    return {
        "basis": None,
        "mean_ref": None,
        "sample_refs": None,
        "fisher": None,
        "factors": factors,
        "sharded": {
            "rows": rows,
            "num_rows": R,
            "num_basis": memory.n_basis,
            "has_samples": memory.has_samples,
            "fisher": fisher,
            "fisher_mean": memory.fisher_mean,
        },
    }


def memory_from_state(
    state: dict[str, Any],
    layout: ObjectiveLayout,
    name: str,
    device: torch.device | None = None,
    shard: ShardSpec | None = None,
) -> Memory:
    """Rebuild a memory (copies, float32, on ``device``); ``shard``: the parameters' sharding
    (FSDP2) in this process. A memory saved whole and loaded into sharded parameters is sharded."""
    sharded = state.get("sharded")
    if sharded is not None and shard is None:
        raise ValueError(
            f"objective {name!r} was saved sharded (FSDP2); load it into an optimizer over the same "
            "sharded parameters (or save with the parameters unsharded)"
        )

    def load(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = local(t)  # a DTensor loaded by torch.distributed.checkpoint: this rank's rows
        return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32).clone()

    factors = {
        int(t): FactorMemory.from_state_dict({k: local(v) if isinstance(v, torch.Tensor) else v for k, v in f.items()}, device)
        for t, f in state.get("factors", {}).items()
    }
    common = dict(
        energies=load(state["energies"]),
        factors=factors,
        fixed_factors=frozenset(state.get("fixed_factors", [])),
        num_samples=int(state["num_samples"]),
    )
    if sharded is None:
        basis, mean_ref, sample_refs = load(state["basis"]), load(state["mean_ref"]), load(state["sample_refs"])
        rows = [basis, mean_ref[None]] + ([sample_refs] if sample_refs is not None else [])
        memory = Memory(
            storage=torch.cat(rows).to(torch.float32).contiguous(),
            n_basis=basis.shape[0],
            has_samples=sample_refs is not None,
            fisher=load(state["fisher"]),
            **common,
        )
        return shard_memory(memory, layout, shard, name) if shard is not None else memory
    parts = [load(r) for r in sharded["rows"]]
    R = int(sharded["num_rows"])
    storage = torch.cat([r.reshape(R, -1) for r in parts], dim=1) if parts else torch.zeros(R, 0, device=device)
    return Memory(
        storage=storage.contiguous(),
        n_basis=int(sharded["num_basis"]),
        has_samples=bool(sharded["has_samples"]),
        fisher=None if sharded["fisher"] is None else torch.cat([load(f).reshape(-1) for f in sharded["fisher"]]),
        fisher_mean=sharded["fisher_mean"],
        shard=shard,
        **common,
    )
