"""Conflict projection off reference gradients: A-GEM, GEM and SafeGrad.

A reference ``r`` is a protected objective's gradient. The step keeps the new gradient's
inner product with every reference non-negative and moves it as little as possible:

    g' = argmin_x |x - g|^2   subject to  <x, r_j> >= 0 for every reference j.

- A-GEM (Chaudhry et al., 2019, "Efficient Lifelong Learning with A-GEM"): one reference,
  the mean protected gradient; closed form ``g' = g - min(0, <g, r>) / |r|^2 r``.
  ``references="mean"``.
- GEM (Lopez-Paz and Ranzato, 2017, "Gradient Episodic Memory for Continual Learning"):
  one constraint per kept sample, solved through the dual non-negative QP
  (``gradsafe.qp``). ``references="samples"`` keeps the most recent ``rank`` samples.
- SafeGrad (Yi et al., 2025): the A-GEM projection off the alignment loss's gradient,
  recomputed every step: a closure objective with ``refresh_every=1``.

The constraints are exact; ``strength`` does not apply. With other objectives the
constraints join the projections in one problem (docs/math.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Operator, RowSpan, RuleRows

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["ConflictProjection", "merge_references"]


class ConflictProjection(Operator):
    mode = "conflict"
    title = "conflict projection (A-GEM / GEM / SafeGrad)"
    paper = "Chaudhry et al. 2019 (A-GEM); Lopez-Paz and Ranzato 2017 (GEM); Yi et al. 2025 (SafeGrad)"
    needs_reference = True

    def check(self, config: "ObjectiveConfig") -> None:
        if config.strength != 1.0:
            raise ValueError("strength applies to mode='project' only; conflict constraints are exact")
        if config.scope == "factored" and config.references == "samples":
            raise ValueError(
                "scope='factored' keeps one (projected) mean reference per objective; "
                "references='samples' needs scope 'global' or 'tensor'"
            )

    def rows_read(self, config: "ObjectiveConfig", n_basis: int, n_samples: int) -> RowSpan:
        # the mean reference, then (GEM) the kept samples; the basis is not read
        return RowSpan(n_basis, 0, 1, n_samples if config.references == "samples" else 0)

    def rule_rows(self, config: "ObjectiveConfig", span: RowSpan, energies=None) -> RuleRows:
        if span.n_refs:  # GEM: one constraint per kept sample
            rows = tuple(range(span.n_mean, span.n_mean + span.n_refs))
            return RuleRows(constraint_rows=rows, apply_rows=slice(rows[0], rows[-1] + 1), acts=True)
        return RuleRows(constraint_rows=(0,), apply_rows=slice(0, 1), acts=True)  # A-GEM

    def acts(self, config: "ObjectiveConfig") -> bool:
        return True


def merge_references(
    mean_ref: torch.Tensor | None,
    sample_refs: torch.Tensor | None,
    num_samples: int,
    F: torch.Tensor,
    *,
    keep_samples: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Merge sample rows ``F`` (m, N) into the references; ``mean_ref=None`` starts afresh.

    Returns the running mean of all samples, the most recent ``keep_samples`` samples
    (None when ``keep_samples`` is None: A-GEM keeps only the mean) and the new count.
    """
    m = F.shape[0]
    if mean_ref is None:
        mean, total = F.mean(dim=0), m
    else:
        total = num_samples + m
        mean = mean_ref * (num_samples / total) + F.sum(dim=0) / total
    kept = None
    if keep_samples is not None:
        prev = sample_refs if sample_refs is not None else F.new_zeros(0, F.shape[1])
        kept = torch.cat([prev, F])[-keep_samples:]
    return mean, kept, total
