"""What every operator family provides, and the plain record of its part of a step.

An operator reads an objective's configuration and the row counts of its memory and says
which rows the step reads, which of them enter the joint rule as basis columns (with what
penalty) or as conflict constraints, and which can receive weights. It never sees a
gradient: the rule and the backends do the arithmetic for every operator alike.

Memory rows of a flat objective are ordered ``[basis (k); mean reference (1); kept
samples (m)]`` (see ``gradsafe.memory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..options import ObjectiveConfig

__all__ = ["Operator", "RowSpan", "RuleRows"]


@dataclass(frozen=True)
class RowSpan:
    """The contiguous rows of the memory storage the step reads: ``[start, start + n_basis +
    n_mean + n_refs)``, in that order."""

    start: int
    n_basis: int
    n_mean: int
    n_refs: int

    @property
    def stop(self) -> int:
        return self.start + self.n_basis + self.n_mean + self.n_refs


@dataclass(frozen=True)
class RuleRows:
    """An operator's part of the joint rule, as indices into the rows its block reads.

    ``basis_rows`` enter as basis columns A with penalty ``penalty`` (0: a hard
    constraint; a float for every row, or an array with one per basis row, ``(k,)``, or
    per tensor and basis row, ``(T, k)`` for scope "tensor"); ``constraint_rows`` as conflict constraints ``<x, r> >= 0``;
    ``apply_rows``: the contiguous rows that can get non-zero weights (the apply pass reads
    only these); ``acts``: whether the rule gives the block any weight.
    """

    basis_rows: tuple[int, ...] = ()
    penalty: Union[float, np.ndarray] = 0.0
    constraint_rows: tuple[int, ...] = ()
    apply_rows: slice = field(default_factory=lambda: slice(0, 0))
    acts: bool = False


class Operator:
    """One operator family. Subclasses set ``mode``, ``title`` and ``paper`` and override
    what differs; the defaults describe an operator that reads the basis and the mean
    reference and changes nothing (the monitor's view)."""

    mode: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    #: whether the operator's memory must come from gradients (samples or a closure), not
    #: from bases alone
    needs_reference: ClassVar[bool] = False

    def selects(self, config: "ObjectiveConfig") -> bool:
        """Whether this operator implements ``config`` (the registry asks in order)."""
        return config.mode == self.mode

    def check(self, config: "ObjectiveConfig") -> None:
        """Raise ``ValueError`` for option combinations the operator does not define."""

    def rows_read(self, config: "ObjectiveConfig", n_basis: int, n_samples: int) -> RowSpan:
        """The rows of the memory storage the step reads (basis and mean reference)."""
        return RowSpan(0, n_basis, 1, 0)

    def rule_rows(self, config: "ObjectiveConfig", span: RowSpan, energies: "np.ndarray | None" = None) -> RuleRows:
        """The block's part of the joint rule (rows indexed within ``span``).

        ``energies``: the basis directions' singular values (``(k,)``, or ``(T, k)`` per
        tensor), for operators whose penalties depend on them."""
        return RuleRows()

    def factored_strength(self, config: "ObjectiveConfig") -> float | None:
        """Scope "factored": the strength with which the objective's factored operator
        ``(I - L) G (I - R)`` acts, or None when it only measures."""
        return None

    def acts(self, config: "ObjectiveConfig") -> bool:
        """Whether the operator changes the gradient (damping aside)."""
        return False
