"""ProtectedOptimizer under DistributedDataParallel: 2 CPU processes, gloo, file:// rendezvous.

DDP averages the gradients during ``backward``; when ``opt.step()`` runs every rank holds the
same averaged gradient, and the surgery (deterministic, no communication) must leave the
replicas bit-identical. The test runs several configurations inside one spawned job (spawn
is the slow part), then checks, per configuration:

- the parameters, the objectives' memory and the report are bit-identical across ranks;
- they equal (fp32 tolerance) a single process that trains on the mean of the two ranks'
  losses, i.e. on the gradient DDP averages;
- the surgery acted: the vector handed on (the gradient in space "grad", the parameter
  change in space "update") satisfies the objective's constraint at every step, on every
  rank, and some energy was removed.
"""

from __future__ import annotations


import pytest
import torch

import gradsafe
from gradsafe import ProtectedOptimizer

from _spawn import run_rank, run_spawned

WORLD = 2
STEPS = 5
LOCAL_BATCH = 8
JOIN_TIMEOUT_S = 120.0

# name -> options; every configuration is trained by both ranks and by the reference
CONFIGS: dict[str, dict] = {
    "project-global-grad": dict(mode="project", scope="global", space="grad"),
    "project-tensor-grad": dict(mode="project", scope="tensor", space="grad"),
    "conflict-global-grad": dict(mode="conflict", scope="global", space="grad"),
    "project-global-update": dict(mode="project", scope="global", space="update"),
    "conflict-tensor-update": dict(mode="conflict", scope="tensor", space="update", references="samples"),
    # p.grad is a view into DDP's bucket: the surgery must change it in place; two
    # objectives, damping, and a closure objective (through the DDP module) refreshed every 2 steps
    "mixed-bucket-view": dict(
        mode="project", scope="global", space="grad", damping=0.5, bucket_view=True, closure=True
    ),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def _train(name: str, rank: int | None) -> dict:
    """Train one configuration. ``rank`` None: single process on the mean of both ranks' losses."""
    cfg = dict(CONFIGS[name])
    bucket_view = cfg.pop("bucket_view", False)
    with_closure = cfg.pop("closure", False)
    space = cfg["space"]
    loss_fn = torch.nn.functional.cross_entropy

    model = _model()
    # protected samples: the same seeded data on every rank (and in the reference)
    xp, yp = _data(1, 32)
    samples = gradsafe.collect_gradients(
        model, lambda b: loss_fn(model(b[0]), b[1]), [(xp[i : i + 8], yp[i : i + 8]) for i in range(0, 32, 8)]
    )
    net = model
    if rank is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    params = list(net.parameters())
    opt = ProtectedOptimizer(
        torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01),
        {"safety": samples},
        rank=3,
        backend="torch",
        **cfg,
    )
    if with_closure:
        xc, yc = _data(2, 16)
        # the closure runs the DDP-wrapped module: gradsafe differentiates it with
        # torch.autograd.grad, which fires no DDP hook; same data, same result on every rank
        opt.protect("task-a", closure=lambda: loss_fn(net(xc), yc), mode="conflict", refresh_every=2)

    checks: list[dict] = []
    for step in range(STEPS):
        x, y = _data(100 + step, WORLD * LOCAL_BATCH)
        opt.zero_grad()
        if rank is None:
            loss = sum(loss_fn(net(x[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]), y[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]) for r in range(WORLD)) / WORLD
        else:
            sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            loss = loss_fn(net(x[sl]), y[sl])
        loss.backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        # the vector handed on, over the parameters: the changed gradient or the update made
        if space == "grad":
            handed = _flat(p.grad for p in params)
        else:
            handed = _flat(b - p.detach() for b, p in zip(before, params))
        obj = opt.objectives["safety"]
        basis = obj.basis.to(torch.float64)
        refs = obj.sample_refs if obj.config.references == "samples" else obj.mean_ref[None]
        refs = refs.to(torch.float64)
        # tensor scope: every constraint holds on each tensor's slice on its own
        parts = obj.slices() if obj.config.scope == "tensor" else [slice(0, obj.numel)]
        checks.append(
            dict(
                # a conflict objective keeps no basis (rank 0): nothing can leak into it
                basis_leak=max((float((basis[:, sl] @ handed[sl]).abs().max()) for sl in parts if basis.shape[0]),
                               default=0.0) / float(handed.norm()),
                ref_dot=min(float((refs[:, sl] @ handed[sl]).min()) for sl in parts) / float(handed.norm() * refs.norm()),
                energy_removed=opt.report["safety"]["energy_removed"],
            )
        )
    return dict(
        params=[p.detach().clone() for p in params],
        memory={n: (o.basis.clone(), o.mean_ref.clone(), o.fisher.clone()) for n, o in opt.objectives.items()},
        report=opt.report,
        checks=checks,
        steps=opt.gradsafe_steps,
        refreshes={n: o.num_refreshes for n, o in opt.objectives.items()},
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(rank, init_file, out_dir, WORLD, 60, lambda: {name: _train(name, rank) for name in CONFIGS})


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[int, dict]:
    return run_spawned(_worker, tmp_path_factory.mktemp("ddp"), WORLD, JOIN_TIMEOUT_S, "DDP")


@pytest.fixture(scope="module")
def reference_results() -> dict[str, dict]:
    return {name: _train(name, None) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replicas_bit_identical(ddp_results, name):
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    assert r0["steps"] == r1["steps"] == STEPS
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert torch.equal(a, b), f"{name}: parameter {i} differs across ranks (max {float((a - b).abs().max())})"
    assert r0["memory"].keys() == r1["memory"].keys()
    for obj in r0["memory"]:
        for a, b in zip(r0["memory"][obj], r1["memory"][obj]):
            assert torch.equal(a, b), f"{name}: memory of {obj!r} differs across ranks"
    assert r0["report"] == r1["report"]
    assert r0["refreshes"] == r1["refreshes"]
    if CONFIGS[name].get("closure"):
        assert r0["refreshes"]["task-a"] >= 2  # the closure objective was recomputed under DDP
    # the parameters moved: a run that did nothing would also be identical
    init = list(_model().parameters())
    assert max(float((a - p.detach()).abs().max()) for a, p in zip(r0["params"], init)) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_single_process_on_averaged_gradient(ddp_results, reference_results, name):
    got, ref = ddp_results[0][name], reference_results[name]
    for i, (a, b) in enumerate(zip(got["params"], ref["params"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: parameter {i}: {m}")
    assert got["report"].keys() == ref["report"].keys()
    for obj in ref["report"]:
        for stat, value in ref["report"][obj].items():
            assert got["report"][obj][stat] == pytest.approx(value, rel=1e-3, abs=1e-5), (name, obj, stat)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_surgery_acted_on_every_rank(ddp_results, name):
    cfg = CONFIGS[name]
    for rank in range(WORLD):
        checks = ddp_results[rank][name]["checks"]
        assert len(checks) == STEPS
        if cfg["mode"] == "project":
            # the handed-on vector is orthogonal to the protected basis (DDP's averaged grad)
            assert max(c["basis_leak"] for c in checks) < 1e-4, (name, rank, checks)
        else:
            # conflict: never against the protected reference
            assert min(c["ref_dot"] for c in checks) > -1e-4, (name, rank, checks)
        assert max(c["energy_removed"] for c in checks) > 1e-3, (name, rank, checks)
