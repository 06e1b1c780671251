"""``gradsafe bench`` (flat scopes): the surgery's cost against a naive loop, the base
optimizer's step and the bytes-moved floor.

Every variant is timed in the same run, interleaved round by round (machines are noisy), and
reported as a median with its ratios. Gradients are rotated between two sets, each larger
than a GPU's L2 in the GPU tables, so that no run starts from a warm cache of the previous
one.

- ``gradsafe bench`` (one configuration): the stream probe (the fused surgery's reads and
  writes without its arithmetic, ``floor_case``), the naive per-parameter loop, the torch
  backend (with ``--cpu-kernels`` also with its compiled CPU loops), on a GPU the Triton
  backend (float32 and bfloat16 basis), and the AdamW step
  (default and fused), all timed; and the bytes floor, derived from them: the surgery's bytes
  at the higher of fused AdamW's and the probe's bandwidth (``floor_seconds``). Every ratio
  column is a time ratio, lower is better: the row's median over the floor's, the naive
  loop's and the default AdamW step's. The header (problem, device, threads, what the
  columns mean) is printed before anything is timed, one progress line per warm-up and
  round on stderr.
- ``gradsafe bench --sweep`` (GPU): one row per configuration (k = 1, 4, 16, 64; float32 and
  bfloat16 basis; global and tensor scope; 1 to 500 tensors) with the floor time (bytes at
  the measured copy bandwidth), every variant's median, the Triton backend's ratio to the
  floor, its speed-up over the naive loop and over the torch backend, its GB/s and its
  kernel launches per step; then the targets of issue 3, checked.
- ``gradsafe bench --scope factored``: the factored scope, in ``gradsafe.bench.factored``.

Bytes-moved floors per parameter, with s_g, s_U the bytes of a gradient
and a basis element: fused surgery ``(2k + 1) s_U + 3 s_g`` (the coefficient pass reads the
k basis rows and the mean reference, the apply pass the k basis rows; the gradient is read
twice and written once: it does not stay in cache between the passes, which the global
coefficients separate); the naive loop ``2 k s_U + 3 s_g`` at best; AdamW 28 bytes (fp32:
parameter, both moments read and written, the gradient read).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._optional import UserError, require
from ..backends import TorchBackend, get_backend, triton_available
from ..backends.cpu_kernels import load_cpu_kernels
from ..backends.triton_backend import TritonBackend
from ..memory import Memory, pack_rows
from ..objective import ProtectedObjective
from ..options import ObjectiveConfig
from ..plan import Plan, build_plan
from .common import device_label, emit, measure, pick_device, stderr_progress, sync

__all__ = [
    "run_flat",
    "make_problem",
    "Problem",
    "naive_bases",
    "naive_step",
    "cases_for",
    "format_table",
    "sweep",
    "SweepRow",
    "copy_bandwidth",
    "surgery_floor_bytes",
    "floor_case",
    "floor_seconds",
    "format_header",
    "FLOOR",
    "PROBE",
]


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


def make_problem(
    numel: int, tensors: int, rank: int, scope: str = "global", seed: int = 0, device: str | torch.device = "cpu"
) -> Problem:
    """``tensors`` parameters of (about) ``numel`` entries in all, a rank-``rank`` project objective.

    On a CUDA device everything is generated there (a batched QR per scope), so that large
    problems build in seconds.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    base = numel // tensors
    sizes = [base + (1 if i < numel - base * tensors else 0) for i in range(tensors)]
    total = sum(sizes)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    params = [torch.nn.Parameter(randn(n)) for n in sizes]
    grad_sets = [[randn(n) for n in sizes] for _ in range(2)]
    obj = ProtectedObjective("bench", ObjectiveConfig(rank=rank, scope=scope), range(tensors), [p.shape for p in params])
    if scope == "global":
        q, _ = torch.linalg.qr(randn(total, rank))
        basis = q.T.contiguous()
        energies = torch.ones(rank, device=device)
    else:  # per tensor: orthonormalise each slice on its own
        basis = torch.zeros(rank, total, device=device)
        slices = obj.slices()
        if len(set(sizes)) == 1 and sizes[0] >= rank:  # one batched QR
            qt, _ = torch.linalg.qr(randn(tensors, sizes[0], rank))
            basis.view(rank, tensors, sizes[0]).copy_(qt.permute(2, 0, 1))
        else:
            for sl in slices:
                r = min(rank, sl.stop - sl.start)
                qt, _ = torch.linalg.qr(randn(sl.stop - sl.start, r))
                basis[:r, sl] = qt.T
        energies = torch.ones(tensors, rank, device=device)
    storage = pack_rows(basis, randn(total), None)
    del basis
    fisher = torch.rand(total, generator=gen, device=device)
    obj.replace_memory(Memory(storage=storage, n_basis=rank, energies=energies, fisher=fisher, num_samples=1))
    return Problem(params, grad_sets, obj, build_plan([obj], params), rank)


def naive_bases(problem: Problem, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per parameter, the basis as a user would hold it: ``(n, k)``, in ``dtype``."""
    return [problem.objective.basis[:, sl].T.contiguous().to(dtype) for sl in problem.objective.slices()]


def naive_step(problem: Problem, naive_bases: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The loop a user would write: ``g <- g - U (U^T g)`` per parameter, ``U`` of shape (n, k).

    A low-precision basis is materialised in float32 first (``U.float()``), as it must be.
    """
    for g, U in zip(grads, naive_bases):
        if U.dtype != g.dtype:
            U = U.to(g.dtype)
        g.copy_(g - U @ (U.T @ g))


def surgery_floor_bytes(k: int, basis_bytes: int, grad_bytes: int = 4) -> int:
    """Bytes per parameter a fused step must move: (2k + 1) basis reads, 3 gradient passes."""
    return (2 * k + 1) * basis_bytes + 3 * grad_bytes


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, rounds: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # written: never the zero page
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    ts = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        ts.append(time.perf_counter() - t0)
    del x, y
    return 2 * nbytes / statistics.median(ts)


# ------------------------------------------------------------------------------ one configuration
FLOOR = "bytes floor (derived, below)"
PROBE = "stream probe (surgery's bytes)"
NAIVE = "naive per-parameter loop"
ADAMW = "AdamW step (default)"
ADAMW_FUSED = "AdamW step (fused)"
CPU_KERNELS = "gradsafe torch + CPU kernels"


def floor_case(problem: Problem) -> Callable[[int], None]:
    """The fused surgery's memory traffic without its arithmetic, as a timed case (the stream probe).

    Per parameter: the k + 1 rows the coefficient pass reads and the k rows the apply pass
    reads (``torch.sum`` over the row storage), the gradient read once (``_foreach_norm``) and
    read and written once (``_foreach_mul_(g, 1)``): ``surgery_floor_bytes(k, 4)`` bytes.
    """
    rows = problem.objective.memory.storage
    k = problem.rank

    def stream(r: int) -> None:
        grads = problem.grad_sets[r % 2]
        torch.sum(rows[: k + 1])
        torch._foreach_norm(grads)
        torch.sum(rows[:k])
        torch._foreach_mul_(grads, 1.0)

    return stream


def cases_for(problem: Problem, backend: str = "torch", device: torch.device | None = None, cpu_kernels: bool = False):
    """The variants compared on one problem, and their floor bytes per parameter.

    ``cpu_kernels``: on the CPU, also the torch backend with its compiled CPU loops
    (``TorchBackend(cpu_kernels=True)``)."""
    device = torch.device(device) if device is not None else problem.plan.device
    # the torch row times the torch ops, GRADSAFE_CPU_KERNELS or not; the compiled loops get their own row
    be = TorchBackend(cpu_kernels=False) if backend == "torch" else get_backend(backend)
    nb = naive_bases(problem)
    adamw = torch.optim.AdamW(problem.params, lr=1e-3)
    adamw_fused = torch.optim.AdamW(problem.params, lr=1e-3, fused=True)

    def with_grads(r: int) -> list[torch.Tensor]:
        grads = problem.grad_sets[r % 2]
        for p, g in zip(problem.params, grads):
            p.grad = g
        return grads

    k = problem.rank
    name = f"gradsafe {be.name} backend"
    cases = {
        PROBE: floor_case(problem),
        NAIVE: lambda r: naive_step(problem, nb, with_grads(r)),
        name: lambda r: be.run(problem.plan, with_grads(r)),
    }
    floors = {PROBE: surgery_floor_bytes(k, 4), NAIVE: 2 * k * 4 + 12, name: surgery_floor_bytes(k, 4)}
    if device.type == "cpu" and backend == "torch" and cpu_kernels:
        compiled = TorchBackend(cpu_kernels=True)
        cases[CPU_KERNELS] = lambda r: compiled.run(problem.plan, with_grads(r))
        floors[CPU_KERNELS] = surgery_floor_bytes(k, 4)
    if device.type == "cuda" and backend != "triton":
        if triton_available():
            for label, dt, sb in (("fp32", torch.float32, 4), ("bf16", torch.bfloat16, 2)):
                tb = TritonBackend(basis_dtype=dt)
                cases[f"gradsafe triton ({label} basis)"] = lambda r, tb=tb: tb.run(problem.plan, with_grads(r))
                floors[f"gradsafe triton ({label} basis)"] = surgery_floor_bytes(k, sb)
    cases[ADAMW] = lambda r: (with_grads(r), adamw.step())
    cases[ADAMW_FUSED] = lambda r: (with_grads(r), adamw_fused.step())
    floors[ADAMW] = floors[ADAMW_FUSED] = 28
    return cases, floors


cpu_cases = cases_for  # the former name

TABLE_LEGEND = (
    "ratio columns: this row's median time over the named row's (lower is better): "
    "/ floor over the bytes floor, / naive over the naive loop, / AdamW over the default AdamW step; "
    "B/param: the bytes per parameter the variant must move at least."
)


def format_header(problem: Problem, scope: str, device: torch.device, rounds: int) -> str:
    """What is measured and how to read the table (printed before anything is timed)."""
    k = problem.rank
    return (
        f"gradsafe bench: {problem.numel:,} parameters in {len(problem.params)} tensors, k={k}, "
        f"scope={scope}, fp32 gradients; {device_label(device)}; {rounds} interleaved rounds\n"
        f"{TABLE_LEGEND}\n"
        f"bytes floor: the surgery's {surgery_floor_bytes(k, 4)} B/param ((2k+1) basis-row reads of 4 B, the gradient "
        f"read twice and written once) at the higher bandwidth measured in these rounds: fused AdamW's (28 B/param) "
        f"or the stream probe's (the same bytes through torch.sum, _foreach_norm and _foreach_mul_)."
    )


def floor_seconds(med: dict[str, float], floors: dict[str, float], numel: int) -> tuple[float, dict[str, float]] | None:
    """The surgery's bytes at the higher of the fused AdamW and stream-probe bandwidths (bytes/s per source)."""
    rates = {name: floors[name] * numel / med[name] for name in (ADAMW_FUSED, PROBE) if med.get(name)}
    if not rates:
        return None
    return floors.get(PROBE, 0) * numel / max(rates.values()), rates


def format_table(times: dict[str, list[float]], floors: dict[str, float], numel: int) -> str:
    """The one-configuration table: per variant its median and its time ratios; then the bandwidths."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    derived = floor_seconds(med, floors, numel)
    if derived is not None:
        med = {FLOOR: derived[0], **med}
        floors = {FLOOR: floors[PROBE], **floors}
    head = f"{'variant':34s} {'median ms':>10s} {'B/param':>8s} {'/ floor':>8s} {'/ naive':>8s} {'/ AdamW':>8s}"
    lines = [head, "-" * len(head)]

    def ratio(m: float, ref: str) -> str:
        return f"{m / med[ref]:7.2f}x" if med.get(ref) else f"{'-':>8s}"

    for name, m in med.items():
        lines.append(f"{name:34s} {m * 1e3:10.3f} {floors.get(name, 0):8.0f} {ratio(m, FLOOR)} {ratio(m, NAIVE)} "
                     f"{ratio(m, ADAMW)}")
    if derived is not None:
        rates = derived[1]
        best = max(rates, key=rates.get)
        lines.append(f"bytes floor: {floors[FLOOR]:.0f} B/param at {rates[best] / 1e9:.1f} GB/s ({best}); "
                     + ", ".join(f"{name}: {rate / 1e9:.1f} GB/s" for name, rate in rates.items()) + ".")
        for name, m in med.items():
            if name.startswith("gradsafe "):  # over its own bytes (a bfloat16 basis moves fewer)
                own = floors[name] * numel / rates[best]
                lines.append(f"{name}: {m / own:.2f}x its bytes floor ({floors[name]:.0f} B/param at that rate).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the GPU sweep
@dataclass
class SweepRow:
    k: int
    basis: str
    scope: str
    tensors: int
    numel: int
    floor_s: float
    times: dict[str, float]  # median seconds per variant
    launches: int | None
    floor_bytes: float

    def ratio(self, name: str) -> float:
        return self.times[name] / self.floor_s

    def gbs(self, name: str) -> float:
        return self.floor_bytes / self.times[name] / 1e9


SWEEP_VARIANTS = ("naive", "torch", "triton", "adamw", "adamw_fused")
# parameters per sweep configuration, by k: 512 MB of fp32 gradient for k <= 4, 256 MB at
# k = 16, 64 MB at k = 64 (floors from ~0.7 ms to ~2 ms on an H200)
SWEEP_NUMEL = {1: 1 << 27, 4: 1 << 27, 16: 1 << 26, 64: 1 << 24}


def sweep(
    device: torch.device | str,
    ks=(1, 4, 16, 64),
    bases=("fp32", "bf16"),
    scopes=("global", "tensor"),
    tensor_counts=(1, 200, 500),
    numel: int | dict[int, int] | None = None,
    rounds: int = 10,
    with_triton: bool = True,
    peak: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[SweepRow], float]:
    """Measure every configuration; returns the rows and the copy bandwidth used for floors.

    ``numel``: parameters per configuration, one number or per k (default ``SWEEP_NUMEL``:
    every floor near a millisecond or more, every gradient set far larger than L2, the
    largest problem ~20 GB of device memory).
    """
    device = torch.device(device)
    if numel is None:
        numel = SWEEP_NUMEL
    numel_of = (lambda k: numel.get(k, 1 << 24)) if isinstance(numel, dict) else (lambda k: int(numel))
    peak = peak if peak is not None else copy_bandwidth(device)
    if with_triton:
        require("triton", "triton", "gradsafe bench --sweep")
        from .. import kernels  # imports triton: only here
    rows: list[SweepRow] = []
    for tensors in tensor_counts:
        for scope in scopes:
            if scope == "tensor" and tensors == 1:
                continue  # the same problem as global
            for k in ks:
                n = numel_of(k)
                problem = make_problem(n, tensors, k, scope, seed=k + tensors, device=device)
                for basis in bases:
                    dt, sb = (torch.float32, 4) if basis == "fp32" else (torch.bfloat16, 2)
                    nb = naive_bases(problem, dt)
                    opt = torch.optim.AdamW(problem.params, lr=1e-3)
                    opt_f = torch.optim.AdamW(problem.params, lr=1e-3, fused=device.type == "cuda")
                    torch_be = get_backend("torch")

                    def with_grads(r: int, problem=problem) -> list[torch.Tensor]:
                        grads = problem.grad_sets[r % 2]
                        for p, g in zip(problem.params, grads):
                            p.grad = g
                        return grads

                    cases = {
                        "naive": lambda r, nb=nb, problem=problem, wg=with_grads: naive_step(problem, nb, wg(r)),
                        "torch": lambda r, be=torch_be, problem=problem, wg=with_grads: be.run(problem.plan, wg(r)),
                    }
                    tb = None
                    if with_triton:
                        tb = TritonBackend(basis_dtype=dt)
                        cases["triton"] = lambda r, tb=tb, problem=problem, wg=with_grads: tb.run(problem.plan, wg(r))
                    cases["adamw"] = lambda r, o=opt, wg=with_grads: (wg(r), o.step())
                    cases["adamw_fused"] = lambda r, o=opt_f, wg=with_grads: (wg(r), o.step())
                    times = measure(cases, rounds, device)
                    launches = None
                    if tb is not None:
                        kernels.launches.reset()
                        tb.run(problem.plan, with_grads(0))
                        launches = kernels.launches.total
                    fb = surgery_floor_bytes(k, sb) * problem.numel
                    row = SweepRow(k, basis, scope, tensors, problem.numel, fb / peak,
                                   {name: statistics.median(ts) for name, ts in times.items()}, launches, fb)
                    rows.append(row)
                    if log is not None:
                        log(format_sweep_row(row))
                    del nb, opt, opt_f, cases, tb
                del problem
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, peak


SWEEP_HEADER = (
    f"{'k':>3s} {'basis':5s} {'scope':6s} {'tensors':>7s} {'params':>10s} {'floor ms':>9s} {'naive':>8s} "
    f"{'torch':>8s} {'triton':>8s} {'AdamW':>8s} {'fused':>8s} {'tri/floor':>9s} {'naive/tri':>9s} "
    f"{'torch/tri':>9s} {'tri GB/s':>8s} {'launch':>6s}"
)


def _ms(row: SweepRow, name: str) -> str:
    return f"{row.times[name] * 1e3:8.3f}" if name in row.times else f"{'-':>8s}"


def format_sweep_row(row: SweepRow) -> str:
    tri = "triton" in row.times
    return (
        f"{row.k:3d} {row.basis:5s} {row.scope:6s} {row.tensors:7d} {row.numel:10,d} {row.floor_s * 1e3:9.3f} "
        f"{_ms(row, 'naive')} {_ms(row, 'torch')} {_ms(row, 'triton')} {_ms(row, 'adamw')} {_ms(row, 'adamw_fused')} "
        + (f"{row.ratio('triton'):8.2f}x {row.times['naive'] / row.times['triton']:8.2f}x "
           f"{row.times['torch'] / row.times['triton']:8.2f}x {row.gbs('triton'):8.0f} {row.launches:6d}"
           if tri else f"{'-':>9s} {'-':>9s} {'-':>9s} {'-':>8s} {'-':>6s}")
    )


def check_targets(rows: list[SweepRow]) -> list[tuple[str, bool, str]]:
    """Issue 3's targets on the measured rows: (target, met, worst case)."""
    out = []
    tri = [r for r in rows if "triton" in r.times]
    if not tri:
        return out

    def worst(sel, key, best_high=False):
        vals = [(key(r), r) for r in sel]
        v, r = (min if best_high else max)(vals, key=lambda t: t[0])
        return v, f"{v:.2f}x at k={r.k} {r.basis} {r.scope} T={r.tensors}"

    big = [r for r in tri if r.tensors == 1]
    many = [r for r in tri if r.tensors >= 200]
    lowp = [r for r in tri if r.basis == "bf16" and r.k >= 8]
    if big:
        v, s = worst(big, lambda r: r.ratio("triton"))
        out.append(("fused surgery <= 1.25x the bytes floor, large tensors", v <= 1.25, s))
    if many:
        v, s = worst(many, lambda r: r.ratio("triton"))
        out.append(("fused surgery <= 1.5x the bytes floor, 200+ tensors", v <= 1.5, s))
    if lowp:
        v, s = worst(lowp, lambda r: r.times["naive"] / r.times["triton"], best_high=True)
        out.append((">= 3x faster than the naive loop, bf16 basis, k >= 8", v >= 3.0, s))
    mx = max(r.launches for r in tri)
    out.append(("<= 4 kernel launches per step", mx <= 4, f"max {mx}"))
    return out


def format_sweep(rows: list[SweepRow], peak: float, device_name: str) -> str:
    lines = [
        f"gradsafe bench --sweep on {device_name}: copy bandwidth {peak / 1e9:.0f} GB/s (floors use it); "
        f"medians of interleaved rounds; two rotating gradient sets larger than L2",
        SWEEP_HEADER,
        "-" * len(SWEEP_HEADER),
    ]
    lines += [format_sweep_row(r) for r in rows]
    lines += [
        "times in ms. floor: (2k+1) basis reads + 3 fp32 gradient passes per parameter at the copy bandwidth.",
        "naive: per-parameter g - U (U^T g) with U (n, k) in the basis dtype (bf16 materialised as fp32);",
        "torch: the torch backend (fp32 rows whatever the basis column); AdamW / fused: the base step alone.",
        "tri/floor: Triton time / floor; naive/tri, torch/tri: speed-ups; tri GB/s: floor bytes / Triton time.",
    ]
    targets = check_targets(rows)
    if targets:
        lines.append("targets:")
        lines += [f"  [{'met' if ok else 'MISSED'}] {name}: {detail}" for name, ok, detail in targets]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def run_flat(args: argparse.Namespace) -> int:
    """``gradsafe bench`` for the global and tensor scopes (and ``--sweep``): time, print, write ``--out``."""
    device = pick_device(args.device)
    rank = args.rank if args.rank is not None else 8
    if args.sweep:
        if device.type != "cuda":
            raise UserError("--sweep measures the Triton kernels against the memory floor: it needs a CUDA device")
        require("triton", "triton", "gradsafe bench --sweep")
        kw = dict(ks=args.ks, tensor_counts=args.tensor_counts, rounds=args.rounds or 10)
        if args.quick:
            kw.update(ks=(1, 16), tensor_counts=(1, 200), numel=1 << 24, rounds=args.rounds or 5)
        elif args.numel:
            kw.update(numel=args.numel)
        print(SWEEP_HEADER, flush=True)
        rows, peak = sweep(device, log=lambda s: print(s, flush=True), **kw)
        emit(format_sweep(rows, peak, torch.cuda.get_device_name(device)), args.out)
        return 0
    default_numel = 10_000_000 if device.type == "cpu" else 1 << 25
    numel = 1_000_000 if args.quick else (args.numel or default_numel)
    rounds = 5 if args.quick else (args.rounds or 15)
    if args.cpu_kernels and (device.type != "cpu" or args.backend != "torch"):
        raise UserError("--cpu-kernels times the torch backend's CPU loops: it needs --device cpu and --backend torch")
    progress = stderr_progress()
    progress(f"building the problem ({numel:,} parameters, k={rank}, scope={args.scope})")
    problem = make_problem(numel, args.tensors, rank, args.scope, device=device)
    header = format_header(problem, args.scope, device, rounds)
    print(header, flush=True)  # before anything is timed
    if args.cpu_kernels:
        progress("building the CPU kernels (cached after the first build)")
        try:
            load_cpu_kernels()
        except RuntimeError as exc:  # why they cannot be built, in one line
            raise UserError(str(exc)) from exc
    cases, floors = cases_for(problem, args.backend, device, cpu_kernels=args.cpu_kernels)
    times = measure(cases, rounds, device, progress=progress)
    table = format_table(times, floors, problem.numel)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(header + "\n" + table + "\n")
    return 0
