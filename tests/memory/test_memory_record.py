"""Memory is a record: merges, budgets and sharding return a new one and leave the old alone."""

from __future__ import annotations

import torch

from gradsafe import ObjectiveConfig, ProtectedObjective
from gradsafe import memory as mem


def _setup(**config):
    shapes = [(6, 4), (4,)]
    cfg = ObjectiveConfig(**config)
    layout = mem.ObjectiveLayout.of(range(len(shapes)), shapes, factored=cfg.scope == "factored")
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(3, layout.numel, generator=gen)
    return cfg, layout, S


def test_merge_returns_a_new_record_and_leaves_the_old_unchanged():
    cfg, layout, S = _setup(rank=2)
    first = mem.merge(mem.EMPTY, layout, cfg, S, fresh=False, param_bytes=4 * layout.numel)
    snapshot = {k: v.clone() for k, v in (("storage", first.storage), ("energies", first.energies), ("fisher", first.fisher))}
    second = mem.merge(first, layout, cfg, S * 2 + 1, fresh=False, param_bytes=4 * layout.numel)
    assert second is not first
    for name, before in snapshot.items():
        assert torch.equal(getattr(first, name), before), name
    assert second.num_samples == 6 and first.num_samples == 3
    assert mem.EMPTY.storage is None and mem.EMPTY.num_samples == 0


def test_budget_returns_a_truncated_copy():
    cfg, layout, S = _setup(rank=3, scope="tensor")
    full = mem.merge(mem.EMPTY, layout, cfg, S, fresh=False, param_bytes=4 * layout.numel)
    # fixed: references and one basis row (2 rows of 4 N bytes) and the Fisher (4 N); one more row fits
    budget = ObjectiveConfig(rank=3, scope="tensor", memory_budget=4 * layout.numel * 4)
    small = mem.apply_budget(full, layout, budget, 4 * layout.numel)
    assert small.n_basis == 2 and torch.equal(small.basis, full.basis[:2])
    assert full.n_basis == 3 and full.storage.shape[0] == 3 + 1


def test_objective_handle_replaces_its_record_and_counts_versions():
    cfg, layout, S = _setup(rank=2)
    obj = ProtectedObjective("o", cfg, layout.coverage, layout.shapes)
    assert obj.version == 0 and obj.memory is mem.EMPTY
    obj.add_samples(S)
    first = obj.memory
    obj.refresh(S[:1])
    assert obj.memory is not first and obj.version == 2 and obj.num_refreshes == 1
    assert first.num_samples == 3 and obj.num_samples == 1
