"""``gradsafe bench --scope factored``: the factored projection against the floor of
reading and writing the gradient once.

The factored scope keeps, per weight matrix ``G`` (m, n), an orthonormal left basis ``P``
(r, m) and right basis ``Q`` (r, n) and projects ``G <- (I - P^T P) G (I - Q^T Q)``
(gradsafe.factored). Every variant is timed on the same gradients, interleaved round by
round with ``gradsafe.bench.common.measure``, two gradient sets rotating:

- ``floor: read+write G once``: ``torch._foreach_mul_(grads, 1.0)``, an in-place pass that
  reads and writes every gradient element once (8 bytes per fp32 parameter): no projection
  that updates ``G`` in place can move less;
- ``naive two-sided``: per layer ``G -= P^T (P G)`` then ``G -= (G Q^T) Q``, each a separate
  in-place op (each side also writes and reads back a dense (m, n) temporary);
- ``gradsafe factored (torch backend)``: ``TorchBackend().run(plan, grads)``: per layer the
  small products ``P G`` and ``G Q^T`` through torch.matmul, then one rank-2r ``addmm_``
  (plus the statistics the monitor reads: ``|G|^2``, the reference dots);
- ``AdamW step (default)`` and ``AdamW step (fused)``: the base optimizer's step alone.

The table gives each median, its time over the floor's, over the default AdamW step, and the
speed-up over the naive projection; then the factored memory (bases and projected
reference, measured from the tensors) against a flat tensor-scope basis of the same rank and
the parameters' own bytes.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.torch_backend import TorchBackend
from ..factored import FactorMemory, from_bases
from ..objective import ProtectedObjective
from ..options import SIDES, ObjectiveConfig
from ..plan import Plan, build_plan
from .common import device_label, emit, measure, pick_device

__all__ = [
    "FactoredProblem",
    "make_factored_problem",
    "naive_two_sided",
    "factored_cases",
    "memory_bytes",
    "format_factored_table",
    "run_factored",
    "FLOOR",
    "NAIVE",
    "GRADSAFE",
    "ADAMW",
    "ADAMW_FUSED",
]

FLOOR = "floor: read+write G once"
NAIVE = "naive two-sided"
GRADSAFE = "gradsafe factored (torch backend)"
ADAMW = "AdamW step (default)"
ADAMW_FUSED = "AdamW step (fused)"


@dataclass
class FactoredProblem:
    """``layers`` (m, n) weights, two rotating gradient sets, one factored project objective."""

    params: list[torch.nn.Parameter]
    grad_sets: list[list[torch.Tensor]]
    objective: ProtectedObjective
    plan: Plan
    rank: int
    sides: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.params[0].shape)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def memories(self) -> list[FactorMemory]:
        return [self.objective.factors[t] for t in sorted(self.objective.factors)]


def make_factored_problem(
    layers: int,
    m: int,
    n: int,
    rank: int,
    sides: str = "both",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FactoredProblem:
    """A factored problem built directly (no sample merging): random orthonormal ``P``, ``Q``.

    Per layer: ``P`` (rank, m) and ``Q`` (rank, n) with orthonormal rows (the transposed Q
    factor of a random matrix's QR; only the sides ``sides`` names) and a random mean
    reference, projected into the factored subspace by ``from_bases``. Everything is
    generated on ``device``.
    """
    if sides not in SIDES:
        raise ValueError(f"unknown sides {sides!r}; expected one of {SIDES}")
    if layers < 1 or m < 1 or n < 1:
        raise ValueError(f"need at least one layer of a non-empty matrix, got layers={layers}, shape=({m}, {n})")
    if sides in ("both", "left") and rank > m:
        raise ValueError(f"rank {rank} exceeds the left dimension m={m}")
    if sides in ("both", "right") and rank > n:
        raise ValueError(f"rank {rank} exceeds the right dimension n={n}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def orthonormal_rows(dim: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(randn(dim, rank))
        return q.T.contiguous()

    params = [torch.nn.Parameter(randn(m, n)) for _ in range(layers)]
    grad_sets = [[randn(m, n) for _ in range(layers)] for _ in range(2)]
    config = ObjectiveConfig(scope="factored", rank=rank, sides=sides)
    obj = ProtectedObjective("bench-factored", config, range(layers), [p.shape for p in params])
    factors = {}
    for t in range(layers):
        P = orthonormal_rows(m) if sides in ("both", "left") else None
        Q = orthonormal_rows(n) if sides in ("both", "right") else None
        factors[t] = from_bases(shape=(m, n), left=P, left_energy=None, right=Q, right_energy=None,
                                mean=randn(m, n), device=device)
    obj.set_bases(factors)  # the empty flat part, as for given (activation) bases; bumps version
    return FactoredProblem(params, grad_sets, obj, build_plan([obj], params), rank, sides)


def naive_two_sided(memories: list[FactorMemory], grads: list[torch.Tensor]) -> None:
    """What a user would write: per layer ``G -= P^T (P G)``, then ``G -= (G Q^T) Q``, in place.

    Only the sides a memory has (``P`` or ``Q`` with 0 rows is skipped).
    """
    for fm, g in zip(memories, grads):
        G = g.view(fm.shape)
        if fm.rank_left:
            P = fm.left
            G -= P.T @ (P @ G)
        if fm.rank_right:
            Q = fm.right
            G -= (G @ Q.T) @ Q


def factored_cases(problem: FactoredProblem, adamw_fused: bool = True) -> dict[str, Callable[[int], None]]:
    """The variants, each a function of the round (which gradient set it works on)."""
    backend = TorchBackend()
    memories = problem.memories
    adamw = torch.optim.AdamW(problem.params, lr=1e-3)

    def with_grads(r: int) -> list[torch.Tensor]:
        grads = problem.grad_sets[r % 2]
        for p, g in zip(problem.params, grads):
            p.grad = g
        return grads

    cases: dict[str, Callable[[int], None]] = {
        FLOOR: lambda r: torch._foreach_mul_(problem.grad_sets[r % 2], 1.0),
        NAIVE: lambda r: naive_two_sided(memories, problem.grad_sets[r % 2]),
        GRADSAFE: lambda r: backend.run(problem.plan, problem.grad_sets[r % 2]),
        ADAMW: lambda r: (with_grads(r), adamw.step()),
    }
    if adamw_fused:
        fused = torch.optim.AdamW(problem.params, lr=1e-3, fused=True)
        cases[ADAMW_FUSED] = lambda r: (with_grads(r), fused.step())
    return cases


def memory_bytes(problem: FactoredProblem) -> dict[str, int]:
    """Bytes in all layers: the factored memory's parts (from the tensors), a flat basis, the parameters."""
    out = {"left": 0, "right": 0, "ref_left": 0, "ref_right": 0}
    for fm in problem.memories:
        for name in out:
            out[name] += 4 * getattr(fm, name).numel()
    out["factored"] = sum(out[k] for k in ("left", "right", "ref_left", "ref_right"))
    out["flat_basis"] = sum(4 * problem.rank * p.numel() for p in problem.params)  # tensor scope, rank k
    out["params"] = sum(4 * p.numel() for p in problem.params)
    return out


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


def format_factored_table(times: dict[str, list[float]], problem: FactoredProblem) -> str:
    """The table: per variant its median and ratios, then the factored memory against a flat basis."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor, adamw, naive = med.get(FLOOR), med.get(ADAMW), med.get(NAIVE)
    head = f"{'variant':34s} {'median ms':>10s} {'vs floor':>9s} {'vs AdamW':>9s} {'vs naive':>9s}"
    lines = [head, "-" * len(head)]

    def ratio(x: float | None) -> str:
        return f"{x:8.2f}x" if x is not None else f"{'-':>9s}"

    for name, t in med.items():
        lines.append(
            f"{name:34s} {t * 1e3:10.3f} {ratio(t / floor if floor else None)} "
            f"{ratio(t / adamw if adamw else None)} {ratio(naive / t if naive else None)}"
        )
    lines.append("vs floor: time / floor time; vs AdamW: time / default AdamW step; "
                 "vs naive: speed-up over the naive two-sided projection (higher is better).")
    if floor:
        lines.append(f"floor: {8 * problem.numel / floor / 1e9:.1f} GB/s (one fp32 read + one write per gradient element).")
    mem = memory_bytes(problem)
    layers = len(problem.params)
    m, n = problem.shape
    lines.append(
        f"memory ({layers} layers): factored bases + reference {_mb(mem['factored'])} "
        f"(left {_mb(mem['left'])}, right {_mb(mem['right'])}, ref_left {_mb(mem['ref_left'])}, "
        f"ref_right {_mb(mem['ref_right'])}); flat tensor-scope basis of rank {problem.rank} "
        f"{_mb(mem['flat_basis'])} ({mem['flat_basis'] / mem['factored']:.1f}x the factored); "
        f"parameters {_mb(mem['params'])} (factored = {mem['factored'] / mem['params']:.4f} of them)."
    )
    lines.append(f"per layer: factored {mem['factored'] // layers:,} bytes vs flat {mem['flat_basis'] // layers:,} bytes "
                 f"vs parameters {mem['params'] // layers:,} bytes ({m}x{n}, rank {problem.rank}, sides={problem.sides}).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def _settings(args: argparse.Namespace, device: torch.device) -> tuple[int, int, int, int, int]:
    """layers, m, n, rank, rounds: explicit options first, then --quick, then the device's defaults."""
    if getattr(args, "quick", False):
        layers, m, n, rank, rounds = 4, 256, 256, 8, 5
    elif device.type == "cuda":
        layers, m, n, rank, rounds = 16, 4096, 4096, 64, 15
    else:
        layers, m, n, rank, rounds = 8, 1024, 1024, 16, 15
    if getattr(args, "layers", None):
        layers = args.layers
    if getattr(args, "shape", None):
        m, n = args.shape
    if getattr(args, "rank", None):
        rank = args.rank
    if getattr(args, "rounds", None):
        rounds = args.rounds
    return layers, m, n, rank, rounds


def run_factored(args: argparse.Namespace) -> int:
    """``gradsafe bench --scope factored``: build, time, print (and write to ``--out``)."""
    device = pick_device(getattr(args, "device", None))
    layers, m, n, rank, rounds = _settings(args, device)
    sides = getattr(args, "sides", None) or "both"
    problem = make_factored_problem(layers, m, n, rank, sides, device=device)
    times = measure(factored_cases(problem), rounds, device)
    where = device_label(device)
    text = (
        f"gradsafe bench --scope factored: {layers} layers of {m}x{n} ({problem.numel:,} parameters), rank {rank}, "
        f"sides={sides}, fp32 gradients, {where}, {rounds} interleaved rounds\n"
        + format_factored_table(times, problem)
    )
    emit(text, getattr(args, "out", None))
    return 0
