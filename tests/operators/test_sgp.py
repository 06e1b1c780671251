"""SGP (Saha and Roy 2023): each basis direction removed by its importance
lam_i = (alpha + 1) sigma_i / (alpha sigma_i + sigma_max), against a numpy SVD."""

import numpy as np
import pytest
import torch

from gradsafe import ProtectedOptimizer
from gradsafe.operators.sgp import sgp_importance
from gradsafe.surgery import joint_surgery


def _svd_reference(M: np.ndarray, g: np.ndarray, alpha: float, rank: int) -> np.ndarray:
    """The paper's step for one objective: g - U^T diag(lam) U g from the samples' SVD."""
    _, sigma, Vt = np.linalg.svd(M, full_matrices=False)
    keep = min(rank, int((sigma > 1e-9 * sigma[0]).sum()))
    U, sigma = Vt[:keep], sigma[:keep]
    lam = (alpha + 1) * sigma / (alpha * sigma + sigma[0])
    return g - U.T @ (lam * (U @ g))


def test_importance_formula():
    sigma = np.array([4.0, 2.0, 1.0, 0.0])
    lam = sgp_importance(sigma, 3.0)
    np.testing.assert_allclose(lam, [1.0, 8.0 / 10.0, 4.0 / 7.0, 0.0])
    assert np.all(sgp_importance(np.array([[1.0, 0.5], [2.0, 2.0]]), 1.0)[1] == 1.0)  # per tensor sigma_max


@pytest.mark.parametrize("alpha", [0.5, 2.0, 20.0])
@pytest.mark.parametrize("shape,m", [((12,), 3), ((5, 4), 6)])
def test_global_scope_matches_the_svd(alpha, shape, m):
    rng = np.random.default_rng(int(alpha * 10) + m)
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    M = rng.standard_normal((m, p.numel())) * np.geomspace(1, 0.05, m)[:, None]
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.protect("old", [[torch.tensor(row.reshape(shape))] for row in M], importance="sgp", scale=alpha, rank=16)
    g = rng.standard_normal(p.numel())
    p.grad = torch.tensor(g.reshape(shape))
    opt.step()
    np.testing.assert_allclose(-p.detach().reshape(-1).numpy(), _svd_reference(M, g, alpha, 16), rtol=1e-5, atol=1e-6)


def test_tensor_scope_uses_each_tensors_own_sigma_max():
    rng = np.random.default_rng(1)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (7, 9)]
    Ms = [rng.standard_normal((4, n)) * scale for n, scale in ((7, 1.0), (9, 100.0))]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0))
    samples = [[torch.tensor(Ms[0][j]), torch.tensor(Ms[1][j])] for j in range(4)]
    opt.protect("old", samples, importance="sgp", scale=1.5, scope="tensor", rank=8)
    gs = [rng.standard_normal(n) for n in (7, 9)]
    for p, g in zip(params, gs):
        p.grad = torch.tensor(g)
    opt.step()
    for p, M, g in zip(params, Ms, gs):
        np.testing.assert_allclose(-p.detach().numpy(), _svd_reference(M, g, 1.5, 8), rtol=1e-5, atol=1e-6)


def test_jointly_with_a_hard_objective_matches_the_reference_rule():
    """Each direction is its own soft basis in the joint rule (penalty (1 - lam_i) / lam_i)."""
    rng = np.random.default_rng(2)
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    M = rng.standard_normal((3, 10)) * np.array([[3.0], [1.0], [0.2]])
    hard = rng.standard_normal(10)
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.protect("sgp", [[torch.tensor(r)] for r in M], importance="sgp", scale=1.0)
    opt.protect("hard", [torch.tensor(hard)])
    g = rng.standard_normal(10)
    p.grad = torch.tensor(g)
    opt.step()
    _, sigma, Vt = np.linalg.svd(M, full_matrices=False)
    lam = sgp_importance(sigma, 1.0)
    bases = [(torch.tensor(Vt[i : i + 1]), float(lam[i])) for i in range(3)]
    bases.append((torch.tensor(hard / np.linalg.norm(hard))[None], 1.0))
    expect = joint_surgery(torch.tensor(g), bases=bases).numpy()
    np.testing.assert_allclose(-p.detach().numpy(), expect, rtol=1e-5, atol=1e-6)


def test_sgp_options_are_checked():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
    for bad, match in (
        (dict(importance="sgp", mode="conflict"), "mode='project' only"),
        (dict(importance="sgp", strength=0.5), "leave strength at 1"),
        (dict(importance="sgp", scope="factored"), "scope 'global' or 'tensor'"),
        (dict(importance="sgp", scale=0.0), "scale must be"),
        (dict(importance="svd"), "unknown importance"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.protect("x", [torch.ones(3)], **bad)
