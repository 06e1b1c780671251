"""The largest error of each named operator against an independent reference, on random problems.

Run: ``python benchmarks/operator_errors.py``. Each row is the maximum, over random problems of
several shapes, of ``|gradsafe - reference|_inf / |reference|_inf`` for one wrapper step
(SGD, learning rate 1, so the step is the operator's output), float32 memory and float64
parameters. References: the paper's formula by hand, numpy's SVD / QR, quadprog.
"""

from __future__ import annotations

import numpy as np
import torch

from gradsafe import ProtectedOptimizer

RNG = np.random.default_rng(0)


def _step(n: int, protect, g: np.ndarray, space: str = "grad", setup=None) -> np.ndarray:
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0), space=space)
    protect(opt)
    if setup is not None:
        setup(p)
    before = p.detach().clone()
    p.grad = torch.tensor(g)
    opt.step()
    return (before - p.detach()).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def projection() -> float:
    worst = 0.0
    for n, m in ((20, 3), (200, 16), (1000, 40)):
        M = RNG.standard_normal((m, n))
        g = RNG.standard_normal(n)
        Q, _ = np.linalg.qr(M.T)
        ref = g - Q @ (Q.T @ g)
        got = _step(n, lambda o: o.protect("a", [[torch.tensor(r)] for r in M], rank=m), g)
        worst = max(worst, _rel(got, ref))
    return worst


def sgp() -> float:
    worst = 0.0
    for n, m, alpha in ((20, 3, 0.5), (200, 16, 2.0), (1000, 40, 10.0)):
        M = RNG.standard_normal((m, n)) * np.geomspace(1, 0.01, m)[:, None]
        g = RNG.standard_normal(n)
        _, s, Vt = np.linalg.svd(M, full_matrices=False)
        lam = (alpha + 1) * s / (alpha * s + s[0])
        ref = g - Vt.T @ (lam * (Vt @ g))
        got = _step(n, lambda o: o.protect("a", [[torch.tensor(r)] for r in M], rank=m, importance="sgp", scale=alpha), g)
        worst = max(worst, _rel(got, ref))
    return worst


def agem() -> float:
    worst = 0.0
    for n in (20, 200, 1000):
        r = RNG.standard_normal(n)
        g = RNG.standard_normal(n)
        g -= (abs(g @ r) + 1.0) / (r @ r) * r  # a conflict
        ref = g - min(g @ r, 0.0) / (r @ r) * r
        got = _step(n, lambda o: o.protect("a", [torch.tensor(r)], mode="conflict"), g)
        worst = max(worst, _rel(got, ref))
    return worst


def gem() -> float:
    import quadprog

    worst = 0.0
    for n, m in ((20, 4), (200, 16), (300, 64)):
        R = RNG.standard_normal((m, n)) * np.geomspace(1e-3, 1e3, m)[:, None]
        g = RNG.standard_normal(n)
        ref = quadprog.solve_qp(np.eye(n), g, R.T, np.zeros(m))[0]
        got = _step(n, lambda o: o.protect("a", [[torch.tensor(r)] for r in R], mode="conflict",
                                           references="samples", rank=m), g)
        worst = max(worst, _rel(got, ref))
    return worst


def ewc() -> float:
    worst = 0.0
    for n, m, lam in ((20, 3, 0.5), (200, 16, 5.0), (1000, 40, 100.0)):
        S = RNG.standard_normal((m, n))
        F = (S.astype(np.float32).astype(np.float64) ** 2).mean(0)
        shift = RNG.standard_normal(n)
        g = RNG.standard_normal(n)

        def setup(p):
            with torch.no_grad():
                p.add_(torch.tensor(shift))

        got = _step(n, lambda o: o.protect("a", [[torch.tensor(r)] for r in S], mode="observe", ewc=lam), g, setup=setup)
        worst = max(worst, _rel(got, g + lam * F * shift))
    return worst


def l2sp() -> float:
    n, lam = 500, 0.3
    shift, g = RNG.standard_normal(n), RNG.standard_normal(n)

    def setup(p):
        with torch.no_grad():
            p.add_(torch.tensor(shift))

    got = _step(n, lambda o: o.protect("a", mode="observe", ewc=lam, fisher="identity"), g, setup=setup)
    return _rel(got, g + lam * shift)


def safegrad() -> float:
    worst = 0.0
    for n, rho in ((20, 0.1), (200, 0.5), (1000, 1.0)):
        r = RNG.standard_normal(n)
        g = RNG.standard_normal(n)
        g -= (abs(g @ r) + 1.0) / (r @ r) * r
        ref = g - min(g @ r, 0.0) / (r @ r) * r + rho * r
        got = _step(n, lambda o: o.protect("a", [torch.tensor(r)], mode="conflict", rho=rho), g)
        worst = max(worst, _rel(got, ref))
    return worst


def main() -> None:
    rows = [
        ("OGD / GPM projection", "numpy QR projector", projection),
        ("SGP (importance='sgp')", "numpy SVD, Saha and Roy's lambda_i", sgp),
        ("A-GEM", "closed form", agem),
        ("GEM (references='samples', 4-64 refs, norms 1e-3..1e3)", "quadprog primal", gem),
        ("EWC (ewc=lam)", "g + lam F (theta - theta*)", ewc),
        ("L2-SP (fisher='identity')", "g + lam (theta - theta*)", l2sp),
        ("SafeGrad (conflict + rho)", "A-GEM + rho r", safegrad),
    ]
    print("| operator | reference | max relative error |")
    print("|---|---|---|")
    for name, ref, fn in rows:
        print(f"| {name} | {ref} | {fn():.1e} |")


if __name__ == "__main__":
    main()
