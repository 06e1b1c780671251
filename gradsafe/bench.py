"""``gradsafe bench``: the surgery's cost against a naive loop and the base optimizer's step.

Every variant is timed in the same run, interleaved round by round (machines here are
noisy), and reported as a median with its ratio to the naive per-parameter loop and to the
default ``torch.optim.AdamW`` step on the same parameters. Gradients are rotated between
two sets so that no run starts from a warm cache of the previous one. ``GB/s`` is the
bytes-moved floor of the variant divided by its median time (see ../shared/PERF.md):
surgery ``(2 k + 2) * 4 + 12`` bytes per parameter with the mean-reference row read once,
AdamW 28 bytes per parameter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends import get_backend
from .objective import ObjectiveConfig, ProtectedObjective
from .plan import Plan, build_plan

__all__ = ["add_arguments", "run", "make_problem", "measure", "Problem"]


@dataclass
class Problem:
    """Parameters, two rotating gradient sets and one objective with a random orthonormal basis."""

    params: list[torch.nn.Parameter]
    grad_sets: list[list[torch.Tensor]]
    objective: ProtectedObjective
    plan: Plan
    rank: int

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_problem(numel: int, tensors: int, rank: int, scope: str = "global", seed: int = 0) -> Problem:
    """``tensors`` parameters of (about) ``numel`` entries in all, a rank-``rank`` project objective."""
    gen = torch.Generator().manual_seed(seed)
    base = numel // tensors
    sizes = [base + (1 if i < numel - base * tensors else 0) for i in range(tensors)]
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    grad_sets = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(2)]
    total = sum(sizes)
    obj = ProtectedObjective("bench", ObjectiveConfig(rank=rank, scope=scope), range(tensors), [p.shape for p in params])
    q, _ = torch.linalg.qr(torch.randn(total, rank, generator=gen))
    if scope == "global":
        basis = q.T.contiguous()
        energies = torch.ones(rank)
    else:  # per tensor: orthonormalise each slice on its own
        basis = torch.zeros(rank, total)
        for sl in obj.slices():
            r = min(rank, sl.stop - sl.start)
            qt, _ = torch.linalg.qr(torch.randn(sl.stop - sl.start, r, generator=gen))
            basis[:r, sl] = qt.T
        energies = torch.ones(tensors, rank)
    obj._pack(basis, torch.randn(total, generator=gen), None)
    obj.energies = energies
    obj.fisher = torch.rand(total, generator=gen)
    obj.num_samples = 1
    obj.version = 1
    return Problem(params, grad_sets, obj, build_plan([obj], params), rank)


def naive_step(problem: Problem, naive_bases: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The loop a user would write: ``g <- g - U (U^T g)`` per parameter, ``U`` of shape (n, k)."""
    for g, U in zip(grads, naive_bases):
        g.copy_(g - U @ (U.T @ g))


def measure(cases: dict[str, Callable[[int], None]], rounds: int) -> dict[str, list[float]]:
    """Time each case once per round, interleaved; returns seconds per case."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up
        fn(0)
    for r in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_cases(problem: Problem, backend: str = "torch") -> tuple[dict[str, Callable[[int], None]], dict[str, float]]:
    """The variants compared on one problem, and their floor bytes per parameter."""
    be = get_backend(backend)
    naive_bases = [problem.objective.basis[:, sl].T.contiguous() for sl in problem.objective.slices()]
    adamw = torch.optim.AdamW(problem.params, lr=1e-3)
    adamw_fused = torch.optim.AdamW(problem.params, lr=1e-3, fused=True)

    def with_grads(r: int) -> list[torch.Tensor]:
        grads = problem.grad_sets[r % 2]
        for p, g in zip(problem.params, grads):
            p.grad = g
        return grads

    k = problem.rank
    cases = {
        "naive per-parameter loop": lambda r: naive_step(problem, naive_bases, with_grads(r)),
        f"gradsafe {be.name} backend": lambda r: be.run(problem.plan, with_grads(r)),
        "AdamW step (default)": lambda r: (with_grads(r), adamw.step()),
        "AdamW step (fused)": lambda r: (with_grads(r), adamw_fused.step()),
    }
    floors = {
        "naive per-parameter loop": (2 * k) * 4 + 12,
        f"gradsafe {be.name} backend": (2 * k + 1) * 4 + 12,
        "AdamW step (default)": 28,
        "AdamW step (fused)": 28,
    }
    return cases, floors


def format_table(times: dict[str, list[float]], floors: dict[str, float], numel: int) -> str:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    naive = next((v for k, v in med.items() if k.startswith("naive")), None)
    adamw = med.get("AdamW step (default)")
    lines = [
        f"{'variant':32s} {'median ms':>10s} {'vs naive':>9s} {'vs AdamW':>9s} {'GB/s':>7s}",
        "-" * 71,
    ]
    for name, m in med.items():
        vs_naive = f"{naive / m:8.2f}x" if naive else "-"
        vs_adamw = f"{m / adamw:8.2f}x" if adamw else "-"
        gbs = floors.get(name, 0) * numel / m / 1e9
        lines.append(f"{name:32s} {m * 1e3:10.2f} {vs_naive:>9s} {vs_adamw:>9s} {gbs:7.1f}")
    lines.append("vs naive: speed-up over the naive loop (higher is better); vs AdamW: time / default AdamW step.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numel", type=int, default=10_000_000, help="parameters in all (default 10M)")
    parser.add_argument("--tensors", type=int, default=50, help="number of parameter tensors (default 50)")
    parser.add_argument("--rank", type=int, default=8, help="basis rank k (default 8)")
    parser.add_argument("--scope", choices=("global", "tensor"), default="global")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant (default 15)")
    parser.add_argument("--backend", default="torch", help="gradsafe backend to time (default torch)")
    parser.add_argument("--quick", action="store_true", help="1M parameters, 5 rounds")


def run(args: argparse.Namespace) -> int:
    numel, rounds = (1_000_000, 5) if args.quick else (args.numel, args.rounds)
    problem = make_problem(numel, args.tensors, args.rank, args.scope)
    cases, floors = cpu_cases(problem, args.backend)
    times = measure(cases, rounds)
    print(
        f"gradsafe bench: {problem.numel:,} parameters in {args.tensors} tensors, k={args.rank}, "
        f"scope={args.scope}, fp32, {torch.get_num_threads()} threads, {rounds} interleaved rounds"
    )
    print(format_table(times, floors, problem.numel))
    return 0
