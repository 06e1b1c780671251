"""Orthogonal projection off a protected subspace: OGD and GPM.

OGD (Farajtabar et al., 2020, "Orthogonal Gradient Descent for Continual Learning") and
GPM (Saha et al., 2021, "Gradient Projection Memory for Continual Learning") keep an
orthonormal basis ``U`` of directions that matter to earlier tasks and step along

    g' = g - U^T (U g),

so that, to first order, the protected loss does not move. OGD's basis spans gradients;
GPM's spans what each layer reads (``gradsafe.collect_activation_bases``, scope
"factored"). gradsafe builds ``U`` from gradient samples with an energy threshold (GPM's
criterion): ``merge_flat_basis`` below. Several objectives and scopes are solved jointly
(docs/math.md): with hard projections only, the result is the projection off the sum of
their subspaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..subspace import merge_basis
from .base import Operator, RowSpan, RuleRows

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["OrthogonalProjection", "merge_flat_basis"]


class OrthogonalProjection(Operator):
    mode = "project"
    title = "orthogonal projection (OGD / GPM)"
    paper = "Farajtabar et al. 2020 (OGD); Saha et al. 2021 (GPM)"

    def selects(self, config: "ObjectiveConfig") -> bool:
        return config.mode == "project" and config.strength == 1.0

    def penalty(self, config: "ObjectiveConfig") -> float:
        """The penalty on the basis coefficients: 0, a hard constraint."""
        return 0.0

    def rule_rows(self, config: "ObjectiveConfig", span: RowSpan, energies=None) -> RuleRows:
        return RuleRows(
            basis_rows=tuple(range(span.n_basis)),
            penalty=self.penalty(config),
            apply_rows=slice(0, span.n_basis),
            acts=True,
        )

    def factored_strength(self, config: "ObjectiveConfig") -> float | None:
        return float(config.strength)

    def acts(self, config: "ObjectiveConfig") -> bool:
        return True


def merge_flat_basis(
    basis: torch.Tensor | None,
    energies: torch.Tensor | None,
    F: torch.Tensor,
    slices: list[slice],
    *,
    per_tensor: bool,
    rank: int,
    energy: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge sample rows ``F`` (m, N) into a flat basis; returns the new ``(basis, energies)``.

    One orthonormal basis over all N columns (``per_tensor=False``: energies ``(k,)``), or
    one per tensor's columns ``slices`` (energies ``(T, k)``; zero rows pad a tensor whose
    rank is lower). ``basis=None`` starts afresh. At least one row is always kept (zeros
    when there is nothing to keep), so that the row storage has a basis part.
    """
    N = F.shape[1]
    if basis is None:
        basis = F.new_zeros(0, N)
        energies = F.new_zeros(0) if not per_tensor else F.new_zeros(len(slices), 0)
    if not per_tensor:
        keep = energies > 0
        new_b, new_e = merge_basis(basis[keep], energies[keep], F, rank=rank, energy=energy)
        out = F.new_zeros(max(1, new_b.shape[0]), N)
        out[: new_b.shape[0]] = new_b
        out_e = F.new_zeros(out.shape[0])
        out_e[: new_e.shape[0]] = new_e
        return out, out_e
    parts = []
    for t, sl in enumerate(slices):
        e_t = energies[t] if energies.shape[1] else energies.new_zeros(0)
        keep = e_t > 0
        parts.append(merge_basis(basis[: e_t.shape[0], sl][keep], e_t[keep], F[:, sl], rank=rank, energy=energy))
    k = max([1] + [b.shape[0] for b, _ in parts])
    out = F.new_zeros(k, N)
    out_e = F.new_zeros(len(parts), k)
    for t, (sl, (b, e)) in enumerate(zip(slices, parts)):
        out[: b.shape[0], sl] = b
        out_e[t, : e.shape[0]] = e
    return out, out_e
