"""The factored scope: left and right bases per weight matrix instead of a flat basis.

A weight of shape ``(m, *rest)`` is viewed as an ``(m, n)`` matrix (``n = prod(rest)``;
conv kernels and fused QKV weights alike). An objective keeps, per such matrix, an
orthonormal left basis ``P`` (``(r_L, m)``, rows) and right basis ``Q`` (``(r_R, n)``), and
its mean reference projected into the factored subspace, in factored form. The projection
off the subspace is

    Phi(G) = (I - P^T P) G (I - Q^T Q)

(GPM when ``Q`` spans the layer's inputs). Memory per matrix is ``r_L (m + n) + r_R (m + n)``
numbers instead of ``k m n`` for a flat basis. See docs/math.md section 7.

This module holds the memory (``FactorMemory``), its construction from gradient samples
(randomized SVD of the stacked rows / columns, GPM's energy threshold), and the per-step
operator stage (``FactorOp``, ``run_factor_ops``). A factored reference enters the joint
rule as a low-rank row (``gradsafe.numerics.LowRankRow``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .numerics import LowRankRow, equilibrated_pinv
from .subspace import merge_basis

__all__ = [
    "matrix_shape",
    "FactorMemory",
    "FactorOp",
    "FactorStat",
    "run_factor_ops",
]

# per factored (objective, tensor) the operator stage writes these numbers into the
# block's row of coefficients
STAT_DOT, STAT_LEFT, STAT_RIGHT, STAT_BOTH, STAT_DOT_AFTER = range(5)
NUM_STATS = 5


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The ``(m, n)`` matrix view of a weight of shape ``(m, *rest)``."""
    if len(shape) < 2:
        raise ValueError(f"a factored basis needs a weight with at least 2 dimensions, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


# ---------------------------------------------------------------------- memory
@dataclass
class FactorMemory:
    """One matrix's factored memory (float32, on the parameter's device).

    ``left`` (r_L, m) and ``right`` (r_R, n): orthonormal rows (either may have 0 rows);
    ``left_energy`` / ``right_energy``: their singular values; the projected mean reference
    ``Pi(g) = P^T ref_left + ref_right Q`` with ``ref_left = P g`` (r_L, n) and
    ``ref_right = (g - P^T P g) Q^T`` (m, r_R); the two terms are orthogonal.
    """

    shape: tuple[int, int]
    left: torch.Tensor
    left_energy: torch.Tensor
    right: torch.Tensor
    right_energy: torch.Tensor
    ref_left: torch.Tensor
    ref_right: torch.Tensor

    @property
    def rank_left(self) -> int:
        return self.left.shape[0]

    @property
    def rank_right(self) -> int:
        return self.right.shape[0]

    def nbytes(self) -> dict[str, int]:
        """Bytes of the bases and of the reference."""
        return {
            "basis": 4 * (self.left.numel() + self.right.numel()),
            "reference": 4 * (self.ref_left.numel() + self.ref_right.numel()),
        }

    def reference(self) -> torch.Tensor:
        """The projected mean reference as a dense ``(m, n)`` matrix (tests and reports)."""
        return self.left.T @ self.ref_left + self.ref_right @ self.right

    def reference_row(self) -> "LowRankRow":
        """The projected mean reference as a low-rank operand ``X Y``."""
        X = torch.cat([self.left.T, self.ref_right], dim=1)
        Y = torch.cat([self.ref_left, self.right], dim=0)
        return LowRankRow(X.contiguous(), Y.contiguous())

    def with_mean(self, samples: torch.Tensor, prev_count: int) -> "FactorMemory":
        """The same bases with the running mean of ``prev_count`` earlier samples and ``samples`` (s, m, n)."""
        mean = samples.mean(dim=0)
        if prev_count > 0:
            total = prev_count + samples.shape[0]
            mean = self.reference() * (prev_count / total) + samples.sum(dim=0) / total
        return _with_reference(self.shape, self.left, self.left_energy, self.right, self.right_energy, mean)

    def truncate(self, rank_left: int, rank_right: int) -> "FactorMemory":
        """Keep the leading ``rank_left`` / ``rank_right`` directions (the reference is re-projected)."""
        ref = self.reference()
        return _with_reference(self.shape, self.left[:rank_left], self.left_energy[:rank_left],
                               self.right[:rank_right], self.right_energy[:rank_right], ref)

    def state_dict(self) -> dict[str, torch.Tensor | list[int]]:
        return {
            "shape": list(self.shape),
            "left": self.left,
            "left_energy": self.left_energy,
            "right": self.right,
            "right_energy": self.right_energy,
            "ref_left": self.ref_left,
            "ref_right": self.ref_right,
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | None = None) -> "FactorMemory":
        def load(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32).clone()

        return cls(
            tuple(state["shape"]),
            load(state["left"]),
            load(state["left_energy"]),
            load(state["right"]),
            load(state["right_energy"]),
            load(state["ref_left"]),
            load(state["ref_right"]),
        )


def _with_reference(shape, left, left_energy, right, right_energy, mean: torch.Tensor) -> FactorMemory:
    ref_left = left @ mean
    ref_right = (mean - left.T @ ref_left) @ right.T
    return FactorMemory(tuple(shape), left.contiguous(), left_energy, right.contiguous(), right_energy,
                        ref_left.contiguous(), ref_right.contiguous())


def merge_factors(
    prev: FactorMemory | None,
    samples: torch.Tensor,
    *,
    sides: str,
    rank: int,
    energy: float,
    prev_count: int,
) -> FactorMemory:
    """Merge gradient samples ``(s, m, n)`` of one matrix into its factored memory.

    The right basis summarises the rows of every sample (the space the gradient's rows live
    in: the layer's inputs), the left basis their columns; both are merged with the previous
    basis by energy (``merge_basis``: CGS2, or ``svd_lowrank`` for many rows) and truncated
    by ``rank`` and ``energy``. The mean reference (running mean over ``prev_count`` earlier
    samples, whose mean is known only through its projection) is re-projected on the new bases.
    """
    s, m, n = samples.shape
    empty_l, empty_r = samples.new_zeros(0, m), samples.new_zeros(0, n)
    if prev is None:
        prev_left, prev_le, prev_right, prev_re = empty_l, samples.new_zeros(0), empty_r, samples.new_zeros(0)
    else:
        prev_left, prev_le, prev_right, prev_re = prev.left, prev.left_energy, prev.right, prev.right_energy
    left, left_energy = empty_l, samples.new_zeros(0)
    right, right_energy = empty_r, samples.new_zeros(0)
    if sides in ("both", "left"):
        cols = samples.transpose(1, 2).reshape(s * n, m)
        left, left_energy = merge_basis(prev_left, prev_le, cols, rank=rank, energy=energy)
    if sides in ("both", "right"):
        rows = samples.reshape(s * m, n)
        right, right_energy = merge_basis(prev_right, prev_re, rows, rank=rank, energy=energy)
    mean = samples.mean(dim=0)
    if prev is not None and prev_count > 0:
        total = prev_count + s
        mean = prev.reference() * (prev_count / total) + samples.sum(dim=0) / total
    return _with_reference((m, n), left, left_energy, right, right_energy, mean)


def from_bases(
    shape: tuple[int, int],
    left: torch.Tensor | None,
    left_energy: torch.Tensor | None,
    right: torch.Tensor | None,
    right_energy: torch.Tensor | None,
    mean: torch.Tensor | None,
    device: torch.device,
) -> FactorMemory:
    """A memory from given bases (e.g. activation bases); ``mean`` (m, n) or None (no reference)."""
    m, n = shape
    f32 = dict(device=device, dtype=torch.float32)

    def side(b, e, dim):
        if b is None:
            return torch.zeros(0, dim, **f32), torch.zeros(0, **f32)
        b = b.to(**f32)
        e = torch.ones(b.shape[0], **f32) if e is None else e.to(**f32)
        return b, e

    left, le = side(left, left_energy, m)
    right, re = side(right, right_energy, n)
    mean = torch.zeros(m, n, **f32) if mean is None else mean.to(**f32)
    return _with_reference(shape, left, le, right, re, mean)


# ---------------------------------------------------------------------- the operator stage
@dataclass
class FactorStat:
    """A factored (objective, tensor) whose statistics the stage writes (``NUM_STATS`` numbers)."""

    memory: FactorMemory
    offset: int  # where its numbers go in the flat coefficients
    left_rows: slice | None  # its rows in the op's stacked left basis (None: not acting)
    right_rows: slice | None


@dataclass
class FactorOp:
    """The factored operator on one tensor: ``h <- (I - L) h (I - R)``.

    ``L = P^T K_L^+ P`` with ``P`` the acting objectives' stacked left bases and
    ``K_L = P P^T + E`` (``E`` the soft-strength penalties; ``K_L^+`` is None when it is the
    identity: one hard objective); the same for the right side. The stage also writes each
    factored objective's statistics (``stats``), the squared norm of the tensor before, and
    the energy the operator removed.
    """

    position: int
    shape: tuple[int, int]
    left: torch.Tensor | None  # (r_L, m) stacked acting left bases
    left_kinv: torch.Tensor | None
    right: torch.Tensor | None  # (r_R, n)
    right_kinv: torch.Tensor | None
    stats: list[FactorStat] = field(default_factory=list)
    norm_offset: int = 0  # |h|^2 before the operator
    removed_offset: int = 0  # |h - Phi h|^2

    @property
    def acts(self) -> bool:
        return self.left is not None or self.right is not None


def side_kinv(rows: list[torch.Tensor], strengths: list[float], shard=None) -> torch.Tensor | None:
    """``(B B^T + E)^+`` for stacked rows ``B`` with penalties ``E = (1 - s) / s``; None if it is ``I``.

    ``shard``: the rows hold this rank's columns only (a left basis under FSDP2); their Gram
    is summed across ranks.
    """
    if len(rows) == 1 and strengths[0] == 1.0:
        return None
    B = torch.cat(rows).double()
    E = torch.cat([torch.full((r.shape[0],), (1.0 - s) / s, dtype=torch.float64, device=B.device) for r, s in zip(rows, strengths)])
    gram = B @ B.T
    if shard is not None:
        shard.all_reduce_(gram, kind="plan_all_reduce")
    K = gram + torch.diag(E)
    return torch.from_numpy(equilibrated_pinv(K.cpu().numpy())).to(device=B.device, dtype=torch.float32)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum()


@dataclass
class _Staged:
    """One tensor between the two phases of the factored stage."""

    op: FactorOp
    h: torch.Tensor  # (m, n) view of the tensor (this rank's rows when sharded)
    per_stat: list[dict]  # per FactorStat: S (P h), T (h Q^T), C (P T), PA (P A), AtV (A^T V)
    A: torch.Tensor | None
    TK: torch.Tensor | None
    AtA: torch.Tensor | None


def factor_partials(ops: list[FactorOp], work: list[torch.Tensor], coefs: torch.Tensor) -> tuple[list[_Staged], list[torch.Tensor]]:
    """Phase 1 of the factored stage: everything that reads ``h``, nothing that changes it.

    Writes to ``coefs`` what is a sum over this rank's rows (``|h|^2``, ``|T_o|^2``,
    ``<T_o, V_o>``), and returns the small matrices that are also such sums (``S_o = P_o h``,
    ``P_o T_o``, ``P_o A``, ``A^T V_o``, ``A^T A``): under FSDP2 they are all-reduced before
    phase 2 (``factor_finish``); in one process they are already whole.
    """
    staged, partials = [], []
    for op in ops:
        m, n = op.shape
        h = work[op.position].view(m, n)
        flat = work[op.position].view(-1)
        torch.dot(flat, flat, out=coefs[op.norm_offset])  # no (m, n) temporary
        per_stat, T_parts = [], []
        for st in op.stats:
            mem = st.memory
            S_o = mem.left @ h if mem.rank_left else None
            T_o = h @ mem.right.T if mem.rank_right else None
            per_stat.append({"S": S_o, "T": T_o})
            if st.right_rows is not None and T_o is not None:
                T_parts.append(T_o)
            right = [_sq(T_o), (T_o * mem.ref_right).sum()] if T_o is not None else [h.new_zeros(())] * 2
            # DOT and DOT_AFTER start as <T_o, V_o>; LEFT and BOTH as 0: phase 2 adds the rest
            coefs[st.offset : st.offset + NUM_STATS] = torch.stack([right[1], h.new_zeros(()), right[0], h.new_zeros(()), right[1]])
        A = TK = AtA = None
        if op.acts:
            T = torch.cat(T_parts, dim=1) if T_parts else None
            TK = None if T is None else (T if op.right_kinv is None else T @ op.right_kinv)
            A = torch.cat([x for x in (TK, None if op.left is None else op.left.T) if x is not None], dim=1)
            AtA = A.T @ A
            partials.append(AtA)
        for st, ps in zip(op.stats, per_stat):
            mem = st.memory
            if ps["S"] is not None:
                ps["C"] = mem.left @ ps["T"] if ps["T"] is not None else None
                ps["PA"] = mem.left @ A if A is not None else None
                partials += [x for x in (ps["S"], ps["C"], ps["PA"]) if x is not None]
            if ps["T"] is not None and A is not None:
                ps["AtV"] = A.T @ mem.ref_right
                partials.append(ps["AtV"])
        staged.append(_Staged(op, h, per_stat, A, TK, AtA))
    return staged, partials


def factor_finish(staged: list[_Staged], coefs: torch.Tensor, scale: float = 1.0) -> None:
    """Phase 2: the statistics that need the whole ``S``, then ``h -= A B`` on every tensor.

    ``scale``: 1, or under FSDP2 when ``coefs`` is summed across ranks afterwards, 1 on rank
    0 and 0 elsewhere (values computed from whole matrices are counted once).
    """
    for sg in staged:
        op, A = sg.op, sg.A
        B = None
        if A is not None:
            acting = [(st, ps) for st, ps in zip(op.stats, sg.per_stat) if st.left_rows is not None and ps["S"] is not None]
            if acting:
                S = torch.cat([ps["S"] for _, ps in acting])
                if sg.TK is not None:  # P T K_R^+ = the acting rows of P_o A's first columns
                    S = S - torch.cat([ps["PA"][:, : sg.TK.shape[1]] for _, ps in acting]) @ op.right
                SK = S if op.left_kinv is None else op.left_kinv @ S
                B = torch.cat([op.right, SK], dim=0) if sg.TK is not None else SK
            else:
                B = op.right
        for st, ps in zip(op.stats, sg.per_stat):
            mem = st.memory
            S_o = ps["S"]
            zero = sg.h.new_zeros(())
            left_dot = zero if S_o is None else (S_o * mem.ref_left).sum()
            both = zero if ps.get("C") is None else _sq(ps["C"])
            after = left_dot
            if B is not None:
                # <r, Phi h> from the small factors: P_o Phi h = S_o - (P_o A) B, and
                # <Phi h Q_o^T, V_o> = <T_o, V_o> - <B Q_o^T, A^T V_o>
                after = zero if S_o is None else ((S_o - ps["PA"] @ B) * mem.ref_left).sum()
                if ps["T"] is not None:
                    after = after - ((B @ mem.right.T) * ps["AtV"]).sum()
            left = zero if S_o is None else _sq(S_o)
            coefs[st.offset : st.offset + NUM_STATS] += scale * torch.stack([left_dot, left, zero, both, after])
        if B is not None:
            coefs[op.removed_offset] = scale * (sg.AtA * (B @ B.T)).sum()
            sg.h.addmm_(A, B, alpha=-1.0)
        else:
            coefs[op.removed_offset] = 0.0


def partials_finite(partials: list[torch.Tensor]) -> bool:
    """Whether phase 1's matrices are finite (a host read). A non-finite entry of a tensor the
    stage acts on reaches them (``T = h Q^T``, ``A^T A``); under FSDP2 they are read after
    their all-reduce, so that every rank decides alike."""
    if not partials:
        return True
    return bool(torch.isfinite(torch.cat([x.reshape(-1) for x in partials])).all())


def run_factor_ops(ops: list[FactorOp], work: list[torch.Tensor], coefs: torch.Tensor, shard=None) -> bool:
    """Apply every tensor's factored operator in place and write the stage's numbers.

    Returns False, and changes nothing, when a tensor the stage acts on holds a non-finite
    value (``partials_finite``): the operator would spread it over the whole matrix.

    Per tensor: ``S_o = P_o h`` and ``T_o = h Q_o^T`` for each factored objective (the
    stacked acting ``S``, ``T`` are their concatenation, no extra pass), then one rank-``r``
    ``addmm_``: ``h -= A B`` with ``A = [T K_R^+ | P^T]``, ``B = [Q ; K_L^+ (S - P T K_R^+ Q)]``.

    ``shard`` (FSDP2): the phase-1 partial matrices are all-reduced here, in one call for
    all tensors; ``coefs`` keeps this rank's share (the coefficients' own all-reduce adds
    them up). The torch backend avoids this extra all-reduce when no rule row shares a
    tensor with a factored operator: it sums the partials with the coefficients instead.
    """
    staged, partials = factor_partials(ops, work, coefs)
    if shard is not None and partials:
        sum_across_ranks(partials, shard)
    if not partials_finite(partials):
        return False
    factor_finish(staged, coefs, 1.0 if shard is None or shard.rank == 0 else 0.0)
    return True


def sum_across_ranks(tensors: list[torch.Tensor], shard, extra: torch.Tensor | None = None) -> None:
    """All-reduce several tensors (and ``extra``, e.g. the coefficients) in one call, in place."""
    parts = ([extra] if extra is not None else []) + tensors
    flat = torch.cat([x.reshape(-1) for x in parts])
    shard.all_reduce_(flat)
    off = 0
    for x in parts:
        x.copy_(flat[off : off + x.numel()].view_as(x))
        off += x.numel()
