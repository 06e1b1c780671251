"""ProtectedOptimizer under FSDP2 (``fully_shard``): 2 CPU processes, gloo, file:// rendezvous.

Parameters and gradients are DTensors sharded on dim 0; the model's layer sizes make the
shards uneven (5 rows split 3 + 2, 3 rows 2 + 1, and 1 row 1 + 0: an empty shard). Every
configuration trains on both ranks and, for the reference, in one process on the gradient
FSDP averages (the mean of the two ranks' losses). Per configuration the test checks:

- the full parameters equal the single-process result to fp32 tolerance, on both ranks
  (with new samples merged into the sharded memory half way);
- each rank holds only its rows of the memory (the memory is sharded like the parameters)
  and the report is the same on both ranks and matches the reference;
- the communication per step: exactly one all-reduce (the coefficients, carrying the
  factored stage's partial sums such as ``P h``), two only where a rule row reads a
  matrix that a factored operator changes;
- ``torch.distributed.checkpoint`` saves the sharded memory and loads it back (per rank),
  and training resumed from the checkpoint continues exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")

import gradsafe  # noqa: E402
from gradsafe import ProtectedOptimizer  # noqa: E402
from _spawn import run_rank, run_spawned  # noqa: E402

WORLD = 2
STEPS = 4
LOCAL_BATCH = 8
JOIN_TIMEOUT_S = 240.0

CONFIGS: dict[str, dict] = {
    "project-global": dict(mode="project", scope="global", rank=3),
    "conflict-tensor-samples": dict(mode="conflict", scope="tensor", references="samples", rank=3),
    "project-tensor-damping-update": dict(mode="project", scope="tensor", rank=2, damping=0.5, space="update"),
    "factored-project": dict(mode="project", scope="factored", rank=2),
    "factored-right-soft": dict(mode="project", scope="factored", rank=2, sides="right", strength=0.7),
    "factored-conflict": dict(mode="conflict", scope="factored", rank=2),
    # a factored conflict reference on the matrices a factored projection changes
    "factored-project-and-conflict": dict(mode="project", scope="factored", rank=2, also_conflict=True),
}
# all-reduces per step: one, the coefficients (with the factored stage's partial sums riding
# on it); two where a rule row reads a matrix a factored operator changes
ALL_REDUCES = {name: 1 for name in CONFIGS}
ALL_REDUCES["factored-project-and-conflict"] = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)


def _loss(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def _samples():
    """Protected gradient samples, computed on a plain copy of the model (full tensors)."""
    model = _model()
    xp, yp = _data(1, 32)
    return gradsafe.collect_gradients(model, lambda b: _loss(model, *b), [(xp[i : i + 8], yp[i : i + 8]) for i in range(0, 32, 8)])


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _make(name: str, rank: int | None):
    # AdamW's eps is raised from 1e-8: where a constraint makes a gradient exactly zero, fp32
    # rounding leaves +-1e-8 that the default eps would blow up to full steps of random sign
    cfg = dict(CONFIGS[name])
    space = cfg.pop("space", "grad")
    also_conflict = cfg.pop("also_conflict", False)
    model = _model()
    if rank is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2, eps=1e-4), {"safety": _samples()}, space=space, backend="torch", **cfg)
    if also_conflict:
        opt.protect("guard", _samples()[2:], mode="conflict")
    return model, opt


def _train_steps(model, opt, rank, steps, start=0):
    from gradsafe.sharding import COUNTERS

    reduces = []
    for step in range(start, start + steps):
        x, y = _data(100 + step, WORLD * LOCAL_BATCH)
        opt.zero_grad()
        if rank is None:
            loss = sum(_loss(model, x[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH], y[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]) for r in range(WORLD)) / WORLD
        else:
            sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            loss = _loss(model, x[sl], y[sl])
        loss.backward()
        before = COUNTERS["step_all_reduce"]
        opt.step()
        reduces.append(COUNTERS["step_all_reduce"] - before)
    return reduces


def _train(name: str, rank: int | None, ckpt_dir: str | None = None) -> dict:
    model, opt = _make(name, rank)
    reduces = _train_steps(model, opt, rank, STEPS // 2)
    # merging into sharded memory: gather, merge whole on every rank, keep the local part
    opt.add_samples("safety", _samples()[1:3])
    reduces += _train_steps(model, opt, rank, STEPS - STEPS // 2, start=STEPS // 2)
    obj = opt.objectives["safety"]
    out = dict(
        params=[_full(p) for p in model.parameters()],
        report=opt.report,
        reduces=reduces,
        local_memory=obj.flat_numel,
        fisher_local=None if obj.fisher is None else obj.fisher.numel(),
        factor_left_cols={t: fm.left.shape[1] for t, fm in obj.factors.items()},
    )
    if rank is not None and ckpt_dir is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = os.path.join(ckpt_dir, name)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        _train_steps(model, opt, rank, 2, start=STEPS)
        out["continued"] = [_full(p) for p in model.parameters()]
        # a fresh run (same model and objectives, memory perturbed so that a load that did
        # nothing would show), then the checkpoint: parameters, AdamW state, sharded memory
        model2, opt2 = _make(name, rank)
        fresh = opt2.objectives["safety"]
        fresh._storage.mul_(0.5)
        for fm in fresh.factors.values():
            fm.ref_right.mul_(0.5)
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        loaded = opt2.objectives["safety"]
        out["loaded_shard"] = loaded.shard is not None
        out["loaded_memory_equal"] = torch.equal(loaded._storage, obj._storage) and all(
            torch.equal(loaded.factors[t].ref_right, fm.ref_right) and torch.equal(loaded.factors[t].left, fm.left)
            for t, fm in obj.factors.items()
        )
        _train_steps(model2, opt2, rank, 2, start=STEPS)
        out["resumed"] = [_full(p) for p in model2.parameters()]
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(rank, init_file, out_dir, WORLD, 90, lambda: {name: _train(name, rank, out_dir) for name in CONFIGS})


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict[int, dict]:
    return run_spawned(_worker, tmp_path_factory.mktemp("fsdp"), WORLD, JOIN_TIMEOUT_S, "FSDP")


@pytest.fixture(scope="module")
def reference_results() -> dict[str, dict]:
    return {name: _train(name, None) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_single_process(fsdp_results, reference_results, name):
    ref = reference_results[name]
    init = [p.detach() for p in _model().parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(ref["params"], init)) > 1e-3  # it trained
    for rank in range(WORLD):
        got = fsdp_results[rank][name]
        for i, (a, b) in enumerate(zip(got["params"], ref["params"])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} rank {rank} parameter {i}: {m}")
        for stat, value in ref["report"]["safety"].items():
            assert got["report"]["safety"][stat] == pytest.approx(value, rel=1e-3, abs=1e-5), (name, rank, stat)
    assert fsdp_results[0][name]["report"] == fsdp_results[1][name]["report"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_memory_is_sharded_like_the_parameters(fsdp_results, reference_results, name):
    whole = reference_results[name]
    local = [fsdp_results[r][name] for r in range(WORLD)]
    # the ranks' flat memory adds up to the whole, each rank holding a strict part
    assert sum(x["local_memory"] for x in local) == whole["local_memory"]
    if whole["local_memory"]:
        assert all(x["local_memory"] < whole["local_memory"] for x in local)
    for t, cols in whole["factor_left_cols"].items():
        assert sum(x["factor_left_cols"][t] for x in local) == cols
    if whole["fisher_local"] is not None:
        assert sum(x["fisher_local"] for x in local) == whole["fisher_local"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_reduces_per_step(fsdp_results, reference_results, name):
    for rank in range(WORLD):
        assert fsdp_results[rank][name]["reduces"] == [ALL_REDUCES[name]] * STEPS
    assert reference_results[name]["reduces"] == [0] * STEPS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dcp_checkpoint_resumes_exactly(fsdp_results, name):
    for rank in range(WORLD):
        res = fsdp_results[rank][name]
        assert res["loaded_shard"] and res["loaded_memory_equal"]
        for i, (a, b) in enumerate(zip(res["resumed"], res["continued"])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name} rank {rank} parameter {i}: {m}")
