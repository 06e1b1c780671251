"""The bottom layer: numerical constants and the small linear algebra everything shares.

Imports nothing of gradsafe. The constants are the tolerances of the joint rule; the
kernels receive them as launch arguments (``gradsafe.backends.triton_layout``), never by
importing this module.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

__all__ = [
    "PINV_RTOL",
    "equilibrated_pinv",
    "DEGENERATE",
    "NULL_RTOL",
    "single_threaded_blas",
    "LowRankRow",
    "operand_rows",
    "operand_inner",
    "operand_gram",
]

# Directions whose independent part is below sqrt(1e-6) = 1e-3 of their norm are treated as
# dependent: the coefficients come from fp32 passes, and resolving finer would amplify
# their rounding.
PINV_RTOL = 1e-6

# A reference whose diagonal of H fell below this fraction of its squared norm before
# projection lies (up to float rounding) inside the hard-projected subspace: the projection
# already satisfies its constraint to rounding, and its q is rounding noise, so its
# multiplier is fixed at 0 instead of being the ratio of two noises. The Grams accumulate in
# float32 (relative rounding ~1e-7 of |r|^2), so the cut is 1e-6: an independent part below
# 1e-3 of the reference's norm, the same share at which PINV_RTOL calls directions dependent.
DEGENERATE = 1e-6

# In a QP on unit references, a reference whose squared part independent of the free ones
# is at most this counts as dependent on them (H's numerical null space).
NULL_RTOL = 1e-12


# ---------------------------------------------------------------------- host BLAS threads
_controller: ThreadpoolController | None = None
_lock = threading.Lock()
_depth = 0  # how many threads are inside single_threaded_blas
_limiter = None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the enclosed numpy linear algebra with one BLAS thread.

    The rule's matrices are tiny (tens of rows); numpy's multi-threaded BLAS on them fights
    the threads torch is using, which can make a small ``eigh`` many times slower.

    The BLAS thread count is process-wide state, and OpenBLAS can lose a change made while
    another thread is inside a BLAS call. So the limit is set only while this is the
    process's one Python thread (a training loop without helper threads); with other threads
    alive the BLAS settings are left alone (the small matrices are then solved with the
    process's BLAS threads). Nested and concurrent entries count: the last to leave restores.
    """
    global _controller, _depth, _limiter
    with _lock:
        if _depth == 0 and threading.active_count() == 1:
            if _controller is None:
                _controller = ThreadpoolController()
            _limiter = _controller.limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None


def equilibrated_pinv(K: np.ndarray) -> np.ndarray:
    """A pseudo-inverse of the PSD ``K`` (or a batch ``(..., m, m)``) whose rank cut does not
    depend on the columns' scales.

    A cut relative to the largest eigenvalue of ``K`` would drop a column whose norm is tiny
    beside another's (a reference 1e-6 times smaller; a hard basis column beside a soft one's
    penalty ``E = 1e6``). With ``D = diag(K)^(-1/2)`` (1 on zero columns), ``D K D`` has a
    unit diagonal and the cut (``PINV_RTOL``) sees only dependence between columns: a column
    whose independent part is below 1e-3 of its norm. ``D (D K D)^+ D`` solves ``K mu = a``
    for every ``a`` in ``K``'s range, which is all its callers need.
    """
    d = np.diagonal(K, axis1=-2, axis2=-1)
    scale = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0)
    outer = scale[..., :, None] * scale[..., None, :]
    return np.linalg.pinv(K * outer, rcond=PINV_RTOL, hermitian=True) * outer


# ---------------------------------------------------------------------- low-rank operands
@dataclass
class LowRankRow:
    """A direction over one ``(m, n)`` matrix given as ``X @ Y`` (``X`` (m, s), ``Y`` (s, n)).

    The joint rule treats it as one row: its inner product with a gradient costs one
    ``(s, m) x (m, n)`` matmul and the rank-``s`` update is one ``addmm_``.
    """

    X: torch.Tensor
    Y: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape[0], self.Y.shape[1]

    def dot(self, h2d: torch.Tensor) -> torch.Tensor:
        """``<X Y, h>`` as a 0-d tensor (no host synchronisation)."""
        return ((self.X.T @ h2d) * self.Y).sum()

    def add_to(self, h2d: torch.Tensor, weight: torch.Tensor) -> None:
        """``h += weight * X Y`` in place (``weight`` a 0-d or 1-element device tensor)."""
        h2d.addmm_(self.X * weight, self.Y)

    def dense(self) -> torch.Tensor:
        return self.X @ self.Y


def operand_rows(op: torch.Tensor | LowRankRow) -> int:
    return 1 if isinstance(op, LowRankRow) else op.shape[0]


def operand_inner(a: torch.Tensor | LowRankRow, b: torch.Tensor | LowRankRow) -> np.ndarray:
    """Inner products ``(rows of a, rows of b)`` between two operands on one tensor: dense rows
    ``(r, n)`` or a ``LowRankRow`` (1 row); float64 on the host.

    The sums accumulate in float32 (nothing parameter-sized is cast to float64): the rows
    are float32, and the coefficients the rule combines them with come from float32 passes
    of the same length, so float64 sums would not make the rule more accurate.
    """
    if isinstance(a, LowRankRow) and isinstance(b, LowRankRow):
        v = ((a.X.T @ b.X) * (a.Y @ b.Y.T)).sum()
        return np.array([[float(v)]])
    if isinstance(a, LowRankRow):
        return operand_inner(b, a).T
    if isinstance(b, LowRankRow):
        m, n = b.shape
        # <a_i, X Y> = sum((X^T a_i) * Y), batched over the rows of a
        proj = torch.einsum("ms,rmn->rsn", b.X, a.reshape(-1, m, n))
        return (proj * b.Y).sum(dim=(1, 2)).double().cpu().numpy()[:, None]
    if a.shape[0] == 1:  # one row against several: a matrix-vector product reads each row once
        return torch.mv(b, a[0]).double().cpu().numpy()[None, :]
    if b.shape[0] == 1:
        return torch.mv(a, b[0]).double().cpu().numpy()[:, None]
    return (a @ b.T).double().cpu().numpy()


def operand_gram(ops: list[torch.Tensor | LowRankRow]) -> np.ndarray:
    """The Gram matrix (float64, host; float32 sums, see ``operand_inner``) of the stacked rows
    of several operands on one tensor."""
    sizes = [operand_rows(o) for o in ops]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    G = np.zeros((offs[-1], offs[-1]))
    for i, a in enumerate(ops):
        for j in range(i, len(ops)):
            block = operand_inner(a, ops[j])
            if i == j:  # float32 products need not come out exactly symmetric
                block = 0.5 * (block + block.T)
            G[offs[i] : offs[i + 1], offs[j] : offs[j + 1]] = block
            G[offs[j] : offs[j + 1], offs[i] : offs[i + 1]] = block.T
    return G
