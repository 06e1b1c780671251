"""Protected objectives: memory built from samples, merges, refresh, state round trip."""

from __future__ import annotations

import pytest
import torch

from gradsafe import ProtectedOptimizer, collect_gradients
from gradsafe.objective import ProtectedObjective
from gradsafe.options import ObjectiveConfig
from gradsafe.samples import normalize_samples, pack_samples
from gradsafe.subspace import orthogonality_error

SHAPES = [(7, 5), (5,), (1,), (33, 3)]


def make_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def random_samples(params, m, cover=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cover = range(len(params)) if cover is None else cover
    return [[torch.randn(p.shape, generator=gen) if i in cover else None for i, p in enumerate(params)] for _ in range(m)]


def new_objective(params, samples, **config):
    coverage, S = pack_samples(samples, params, "obj")
    obj = ProtectedObjective("obj", ObjectiveConfig(**config), coverage, [params[i].shape for i in coverage])
    obj.add_samples(S)
    return obj, S


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_bases_stay_orthonormal_after_every_merge(scope):
    params = make_params()
    obj, _ = new_objective(params, random_samples(params, 3), rank=6, scope=scope)
    for step in range(25):
        obj.add_samples(pack_samples(random_samples(params, 1 + step % 3, seed=step + 10), params, "obj", obj.coverage)[1])
        if scope == "global":
            assert orthogonality_error(obj.basis[obj.energies > 0]) <= 1e-5
            assert obj.basis.shape[0] <= 6
        else:
            for t, sl in enumerate(obj.slices()):
                live = obj.energies[t] > 0
                assert orthogonality_error(obj.basis[:, sl][live]) <= 1e-5
                assert int(live.sum()) <= min(6, sl.stop - sl.start)
                # padded rows are exactly zero
                assert torch.count_nonzero(obj.basis[:, sl][~live]) == 0


def test_basis_spans_samples_when_rank_allows():
    params = make_params()
    samples = random_samples(params, 4)
    obj, S = new_objective(params, samples, rank=8)
    assert obj.basis.shape[0] == 4
    residual = S - (S @ obj.basis.T) @ obj.basis
    assert residual.norm() <= 1e-5 * S.norm()


def test_energy_threshold_trims_rank():
    params = make_params()
    gen = torch.Generator().manual_seed(3)
    n = sum(p.numel() for p in params)
    direction = torch.randn(n, generator=gen)
    # one dominant direction plus small noise: energy 0.9 keeps one direction
    rows = torch.stack([direction * (1 + 0.1 * i) + 1e-3 * torch.randn(n, generator=gen) for i in range(5)])
    samples = []
    for r in rows:
        parts, off = [], 0
        for p in params:
            parts.append(r[off : off + p.numel()].view(p.shape))
            off += p.numel()
        samples.append(parts)
    obj, _ = new_objective(params, samples, rank=5, energy=0.9)
    assert int((obj.energies > 0).sum()) == 1
    full, _ = new_objective(params, samples, rank=5, energy=1.0)
    assert int((full.energies > 0).sum()) == 5


def test_mean_reference_is_running_mean_and_samples_are_capped():
    params = make_params()
    s1 = random_samples(params, 3, seed=1)
    s2 = random_samples(params, 4, seed=2)
    obj, S1 = new_objective(params, s1, rank=5, references="samples")
    S2 = pack_samples(s2, params, "obj", obj.coverage)[1]
    obj.add_samples(S2)
    expected = torch.cat([S1, S2]).mean(0)
    torch.testing.assert_close(obj.mean_ref, expected, rtol=1e-5, atol=1e-6)
    assert obj.sample_refs.shape[0] == 5  # capped at rank, most recent kept
    torch.testing.assert_close(obj.sample_refs, torch.cat([S1, S2])[-5:])
    assert obj.num_samples == 7


def test_fisher_is_mean_square_then_online_average():
    params = make_params()
    s1 = random_samples(params, 3, seed=1)
    obj, S1 = new_objective(params, s1, fisher_decay=0.25)
    torch.testing.assert_close(obj.fisher, (S1**2).mean(0))
    S2 = pack_samples(random_samples(params, 2, seed=2), params, "obj", obj.coverage)[1]
    obj.add_samples(S2)
    torch.testing.assert_close(obj.fisher, 0.25 * (S1**2).mean(0) + 0.75 * (S2**2).mean(0))


def test_refresh_replaces_basis_and_reference():
    params = make_params()
    obj, _ = new_objective(params, random_samples(params, 3), rank=4)
    S = pack_samples(random_samples(params, 1, seed=9), params, "obj", obj.coverage)[1]
    obj.refresh(S)
    torch.testing.assert_close(obj.mean_ref, S[0])
    assert obj.basis.shape[0] == 1
    torch.testing.assert_close(obj.basis[0].abs(), (S[0] / S[0].norm()).abs(), rtol=1e-5, atol=1e-6)
    assert obj.num_refreshes == 1


def test_partial_coverage_and_fixed_layout():
    params = make_params()
    obj, _ = new_objective(params, random_samples(params, 2, cover={0, 3}))
    assert obj.coverage == (0, 3)
    assert obj.numel == params[0].numel() + params[3].numel()
    with pytest.raises(ValueError, match=r"parameters \[1\]"):
        pack_samples(random_samples(params, 1, cover={0, 1}), params, "obj", obj.coverage)


def test_state_dict_round_trip_is_exact():
    params = make_params()
    obj, _ = new_objective(params, random_samples(params, 3), rank=3, scope="tensor", references="samples", damping=0.5)
    restored = ProtectedObjective.from_state_dict("obj", obj.state_dict())
    assert restored.config == obj.config
    for attr in ("basis", "energies", "mean_ref", "sample_refs", "fisher"):
        assert torch.equal(getattr(restored, attr), getattr(obj, attr)), attr
    rows, *split = restored.direction_rows()
    rows0, *split0 = obj.direction_rows()
    assert torch.equal(rows, rows0) and split == split0


def test_direction_rows_are_views_of_one_storage():
    params = make_params()
    obj, _ = new_objective(params, random_samples(params, 3), mode="conflict", references="samples")
    rows, n_basis, n_mean, n_refs = obj.direction_rows()
    assert (n_basis, n_mean, n_refs) == (0, 1, 3)
    assert rows.untyped_storage().data_ptr() == obj.basis.untyped_storage().data_ptr()
    assert torch.equal(rows[0], obj.mean_ref) and torch.equal(rows[1:], obj.sample_refs)


def test_normalize_samples_accepts_one_or_many():
    params = make_params()
    one = [torch.zeros(p.shape) for p in params]
    assert len(normalize_samples(one, "x")) == 1
    assert len(normalize_samples([one, one], "x")) == 2
    with pytest.raises(TypeError):
        normalize_samples(torch.zeros(3), "x")
    with pytest.raises(ValueError):
        normalize_samples([None, None], "x")


def test_collect_gradients_matches_backward_and_leaves_grad_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    x = torch.randn(6, 4)
    batches = [x[:3], x[3:]]
    samples = collect_gradients(model, lambda b: model(b).pow(2).sum(), batches)
    assert len(samples) == 2
    assert samples[0][1] is None  # frozen bias
    assert all(p.grad is None for p in model.parameters())
    model(x[:3]).pow(2).sum().backward()
    for p, g in zip(model.parameters(), samples[0]):
        if g is not None:
            torch.testing.assert_close(g, p.grad)


def test_collect_gradients_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="no batches"):
        collect_gradients([p], lambda b: p.sum(), [])
    with pytest.raises(TypeError, match="scalar"):
        collect_gradients([p], lambda b: p * 2, [0])
    with pytest.raises(ValueError, match="no parameter requires grad"):
        collect_gradients([torch.randn(3)], lambda b: torch.tensor(1.0), [0])


def test_protect_through_optimizer_uses_closure_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x = torch.randn(8, 5)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    obj = opt.protect("c", closure=lambda: model(x).pow(2).mean(), mode="conflict")
    expected = collect_gradients(model, lambda b: model(b).pow(2).mean(), [x])[0]
    torch.testing.assert_close(obj.mean_ref, torch.cat([g.reshape(-1) for g in expected]))
