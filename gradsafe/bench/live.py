"""``gradsafe bench --live``: live conflict references (a closure refreshed every step)
against the loops a fine-tuning engineer writes by hand.

SafeGrad (Yi et al. 2025) and A-GEM (Chaudhry et al. 2019) keep the task gradient ``g`` from
increasing an alignment loss whose gradient ``r`` is recomputed every step:
``g <- g - min(0, <g, r>) / |r|^2 r``. GEM (Lopez-Paz and Ranzato 2017) does the same for
several references through the dual QP ``min_{lam >= 0} 1/2 lam^T (R R^T) lam + (R g)^T lam``,
``g <- g + R^T lam`` (docs/math.md section 3). Each variant trains its own copy of the same
model with AdamW (lr 1e-4):

- (a) plain AdamW: one backward;
- (b) the hand-written SafeGrad / A-GEM loop: ``torch.autograd.grad`` of the alignment loss,
  the task backward, a dot product, a conditional subtraction on ``.grad``, the base step;
- (c) gradsafe with one live conflict objective (``mode="conflict"``, the alignment loss as
  the closure, ``refresh_every=1``);
- (d) gradsafe with four live conflict objectives (GEM over four alignment batches);
- (e) the hand-written GEM loop: four ``torch.autograd.grad`` calls, the 4 x 4 Gram, the
  dual QP solved on the host with quadprog, the projected gradient;
- (f) as (c), with ``space="update"`` (the surgery acts on AdamW's update);
- (g) the hand-written loop for (f): (b)'s reference and backward, a copy of the
  parameters (into buffers kept across steps), AdamW's step, ``u = before - after``, the
  dot product, and on a conflict the parameters moved to ``before - u'``
  (``after + <u, r> / |r|^2 r``).

Before timing, (b) and (c), (g) and (f), and (d) and (e) take the same steps from the same
state and must agree (``check_pair``); then all variants are timed round-robin (each turn a
repeat of ``steps`` steps) and the medians are reported with their time ratios (lower is
better).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import MissingDependency, require
from ..optimizer import ProtectedOptimizer
from .common import device_label, emit, pick_device, sync

__all__ = [
    "PROBLEMS",
    "VARIANTS",
    "LiveProblem",
    "make_mlp_problem",
    "make_gpt2_problem",
    "make_live_problem",
    "PlainAdamW",
    "HandAGEM",
    "HandGEM",
    "HandAGEMUpdate",
    "GradsafeLive",
    "CheckResult",
    "relative_error",
    "check_pair",
    "time_interleaved",
    "format_live_table",
    "run_live",
    "TOLERANCE",
]

PROBLEMS = ("mlp512", "mlp1024", "gpt2")
LR = 1e-4
ALIGN_BATCHES = 4  # GEM's references in (d) and (e)
TOLERANCE = 1e-5  # relative; fp32 arithmetic in a different order differs by ~1e-7
CHECK_STEPS = 2  # the first step reads the reference computed at protect(); the second, a refresh

VARIANTS = {
    "a": "(a) plain AdamW",
    "b": "(b) hand SafeGrad/A-GEM loop",
    "c": "(c) gradsafe, 1 live conflict",
    "d": "(d) gradsafe, 4 live conflicts (GEM)",
    "e": "(e) hand GEM loop, 4 refs, quadprog",
    "f": "(f) gradsafe, 1 live, space=update",
    "g": "(g) hand A-GEM loop on the update",
}
HAND_FOR = {"c": "b", "f": "g", "d": "e"}  # each gradsafe variant's matching hand loop

Loss = Callable[[torch.nn.Module], torch.Tensor]


@dataclass
class LiveProblem:
    """A model every variant copies, its task loss and four alignment losses (fixed batches)."""

    name: str
    label: str
    model: torch.nn.Module
    task_loss: Loss
    align_losses: list[Loss]
    device: torch.device

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _conflicting_first(model: torch.nn.Module, task_loss: Loss, draw: Callable[[], Loss], count: int) -> list[Loss]:
    """``count`` alignment losses from ``draw``, the first one conflicting with the task at the start.

    The correctness check compares the projected steps; with an alignment gradient that does
    not conflict with the task's (``<g, r> >= 0``), both sides would take the unprojected step
    and the check would prove nothing. Up to 64 draws; then the order is kept as drawn.
    """
    params = _params(model)
    g = _flat_grad(task_loss(model), params)
    losses = [draw() for _ in range(count)]
    for _ in range(64):
        dots = [float(_flat_grad(loss(model), params) @ g) for loss in losses]
        first = next((i for i, d in enumerate(dots) if d < 0), None)
        if first is not None:
            losses.insert(0, losses.pop(first))
            return losses
        losses = [draw() for _ in range(count)]
    return losses


def make_mlp_problem(
    width: int, depth: int = 6, classes: int = 10, batch: int = 64, seed: int = 0,
    device: str | torch.device = "cpu", name: str | None = None,
) -> LiveProblem:
    """``depth`` x (Linear(width, width) + GELU), a head to ``classes``; random seeded batches."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, classes)).to(device)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch_loss() -> Loss:
        x = torch.randn(batch, width, generator=gen).to(device)
        y = torch.randint(0, classes, (batch,), generator=gen).to(device)
        return lambda m: F.cross_entropy(m(x), y)

    task = batch_loss()
    align = _conflicting_first(model, task, batch_loss, ALIGN_BATCHES)
    label = f"MLP {depth}x{width}"
    return LiveProblem(name or f"mlp{width}", label, model, task, align, device)


def make_gpt2_problem(
    n_layer: int = 2, n_embd: int = 128, n_head: int = 4, vocab: int = 512, seq: int = 64, batch: int = 16,
    seed: int = 0, device: str | torch.device = "cpu", name: str = "gpt2",
) -> LiveProblem:
    """A GPT-2 from a transformers config (no download, no dropout); next-token loss on random tokens.

    Raises ``MissingDependency`` when transformers (a dev dependency) is not installed.
    """
    transformers = require("transformers", "dev", "gradsafe bench --live --problems gpt2")
    device = torch.device(device)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=seq,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config).to(device)
    model.loss_type = "ForCausalLM"  # the default it would pick, named (else a warning each run)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch_loss() -> Loss:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        return lambda m: m(input_ids=ids, labels=ids).loss

    task = batch_loss()
    align = _conflicting_first(model, task, batch_loss, ALIGN_BATCHES)
    label = f"GPT-2 {n_layer}L d{n_embd}"
    return LiveProblem(name, label, model, task, align, device)


def make_live_problem(name: str, quick: bool = False, device: str | torch.device = "cpu") -> LiveProblem:
    """One of ``PROBLEMS``, full size or (``quick``) a tiny version of it."""
    if name == "mlp512":
        return make_mlp_problem(32 if quick else 512, batch=8 if quick else 64, device=device, name=name)
    if name == "mlp1024":
        return make_mlp_problem(48 if quick else 1024, batch=8 if quick else 64, device=device, name=name)
    if name == "gpt2":
        if quick:
            return make_gpt2_problem(n_layer=1, n_embd=32, n_head=2, vocab=64, seq=16, batch=4, device=device)
        return make_gpt2_problem(device=device)
    raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}")


# ------------------------------------------------------------------------------ the variants
class PlainAdamW:
    """(a): ``zero_grad``, the task loss's backward, AdamW's step."""

    def __init__(self, problem: LiveProblem) -> None:
        self.problem = problem
        self.model = copy.deepcopy(problem.model)
        self.params = _params(self.model)
        self.opt: torch.optim.Optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.active = 0  # constraints the last step's projection used (the hand loops set it)

    def backward(self) -> None:
        self.opt.zero_grad()
        self.problem.task_loss(self.model).backward()

    def step(self) -> None:
        self.backward()
        self.opt.step()


class HandAGEM(PlainAdamW):
    """(b): SafeGrad / A-GEM as a user writes it, on ``.grad``, before AdamW's step."""

    def step(self) -> None:
        ref = torch.autograd.grad(self.problem.align_losses[0](self.model), self.params)
        self.backward()
        dot = sum((p.grad * r).sum() for p, r in zip(self.params, ref))
        self.active = 0
        if dot < 0:
            scale = dot / sum((r * r).sum() for r in ref)
            for p, r in zip(self.params, ref):
                p.grad.sub_(scale * r)
            self.active = 1
        self.opt.step()


class HandAGEMUpdate(PlainAdamW):
    """(g): A-GEM on AdamW's update ``u = theta_before - theta_after``, as a careful user writes
    it: the copy of the parameters in buffers kept across steps (a fresh copy each step costs
    the CPU a page fault per 4 KiB, as much again as the copy), ``u`` computed into them."""

    def __init__(self, problem: LiveProblem) -> None:
        super().__init__(problem)
        self.before = [torch.empty_like(p) for p in self.params]

    def step(self) -> None:
        ref = torch.autograd.grad(self.problem.align_losses[0](self.model), self.params)
        self.backward()
        for b, p in zip(self.before, self.params):
            b.copy_(p.detach())
        self.opt.step()
        u = [torch.sub(b, p.detach(), out=b) for b, p in zip(self.before, self.params)]
        dot = sum((x * r).sum() for x, r in zip(u, ref))
        self.active = 0
        if dot < 0:  # theta_before - (u - scale r) = theta_after + scale r
            scale = dot / sum((r * r).sum() for r in ref)
            for p, r in zip(self.params, ref):
                p.detach().add_(scale * r)
            self.active = 1


class HandGEM(PlainAdamW):
    """(e): GEM over the four alignment losses as a user writes it (flattened gradients, quadprog)."""

    def __init__(self, problem: LiveProblem, quadprog) -> None:
        super().__init__(problem)
        self.quadprog = quadprog

    def step(self) -> None:
        params = self.params
        R = torch.stack([_flat_grad(loss(self.model), params) for loss in self.problem.align_losses])
        self.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        Rg = R @ g
        self.active = 0
        if (Rg < 0).any():
            m = R.shape[0]
            gram = (R @ R.T).double().cpu().numpy()
            # min 1/2 lam^T gram lam + Rg^T lam, lam >= 0; quadprog: min 1/2 x^T G x - a^T x, C^T x >= b
            lam = self.quadprog.solve_qp(gram, -Rg.double().cpu().numpy(), np.eye(m), np.zeros(m))[0]
            self.active = int((lam > 0).sum())
            g = g + R.T @ torch.from_numpy(lam).to(R)
            offset = 0
            for p in params:
                p.grad.copy_(g[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.opt.step()


class GradsafeLive(PlainAdamW):
    """(c), (d), (f): ``ProtectedOptimizer(AdamW)`` with ``objectives`` live conflict closures."""

    def __init__(self, problem: LiveProblem, objectives: int = 1, space: str = "grad", backend: str | None = None):
        super().__init__(problem)
        self.opt = ProtectedOptimizer(self.opt, space=space, backend=backend)
        for j in range(objectives):
            self.opt.protect(f"align{j}", closure=partial(problem.align_losses[j], self.model),
                             mode="conflict", refresh_every=1)

    @property
    def backend_name(self) -> str:
        be = self.opt._backend
        return getattr(be, "last", None) or be.name


def make_variants(problem: LiveProblem, backend: str | None, quadprog) -> dict[str, PlainAdamW]:
    """The variants, by letter; without quadprog (None) no (d) and (e)."""
    out: dict[str, PlainAdamW] = {
        "a": PlainAdamW(problem),
        "b": HandAGEM(problem),
        "c": GradsafeLive(problem, 1, backend=backend),
    }
    if quadprog is not None:
        out["d"] = GradsafeLive(problem, ALIGN_BATCHES, backend=backend)
        out["e"] = HandGEM(problem, quadprog)
    out["f"] = GradsafeLive(problem, 1, space="update", backend=backend)
    out["g"] = HandAGEMUpdate(problem)
    return out


# ------------------------------------------------------------------------------ the check
@dataclass
class CheckResult:
    """One step of a reference loop and gradsafe from the same state, compared."""

    pair: str
    step: int
    grad_error: float  # |g_gradsafe - g_hand| / |g_hand|: the projected gradients AdamW stepped with
    param_error: float  # |theta_gradsafe - theta_hand| / |theta_hand| after the step
    active: int  # constraints the hand loop's projection used in this step
    constraints: int

    @property
    def ok(self) -> bool:
        return self.grad_error <= TOLERANCE and self.param_error <= TOLERANCE

    def __str__(self) -> str:
        return (f"{self.pair} step {self.step}: projected gradient {self.grad_error:.1e}, parameters "
                f"{self.param_error:.1e} relative; {self.active}/{self.constraints} constraint(s) active")


def relative_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all the tensors, in float64 (``inf`` when ``b`` is zero and ``a`` is not)."""
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    norm = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def check_pair(pair: str, hand: PlainAdamW, gradsafe: PlainAdamW, constraints: int,
               steps: int = CHECK_STEPS) -> list[CheckResult]:
    """Step both ``steps`` times from the same state; compare after each step.

    Compared: the gradients AdamW stepped with (``.grad`` after the step: in space "grad" both
    project it in place), the sharp test of the surgery there; and the parameters, the test in
    space "update", where ``.grad`` is left as the backward made it. Not the update ``theta -
    theta_start`` itself: AdamW's first steps are ``g / (|g| + eps)`` per entry, which turns the
    fp32 rounding of entries with ``|g|`` near eps into relative differences of 1e-4 in the
    update while the gradients agree to 1e-6.
    """
    out = []
    for k in range(1, steps + 1):
        hand.step()
        gradsafe.step()
        grad_error = relative_error([p.grad for p in gradsafe.params], [p.grad for p in hand.params])
        param_error = relative_error([p.detach() for p in gradsafe.params], [p.detach() for p in hand.params])
        out.append(CheckResult(pair, k, grad_error, param_error, hand.active, constraints))
    return out


# ------------------------------------------------------------------------------ timing
def time_interleaved(steps_of: dict[str, Callable[[], None]], repeats: int, steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per step, one entry per repeat: round-robin over the variants, ``steps`` steps a turn.

    ``warmup`` untimed steps per variant first; on CUDA the clock is read after a synchronisation.
    """
    for fn in steps_of.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for _ in range(repeats):
        for name, fn in steps_of.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


@dataclass
class ProblemTimes:
    problem: LiveProblem
    times: dict[str, list[float]]  # seconds per step, one per repeat, by variant letter

    @property
    def median(self) -> dict[str, float]:
        return {k: statistics.median(ts) for k, ts in self.times.items()}

    def ratio(self, key: str, over: str) -> float | None:
        """The median over repeats of ``key``'s time over ``over``'s in the same repeat (paired:
        a load that changes between repeats cancels); None without ``over``."""
        if over not in self.times:
            return None
        return statistics.median(a / b for a, b in zip(self.times[key], self.times[over]))


def format_live_table(results: Sequence[ProblemTimes]) -> str:
    """One row per problem and variant: ms/step, and its paired time ratios (``ProblemTimes.ratio``)
    over the matching hand loop's, the hand SafeGrad loop's and AdamW's."""
    wheres = [f"{res.problem.name} ({res.problem.label}, {res.problem.numel / 1e6:.2f}M)" for res in results]
    width = max([26, *map(len, wheres)])
    head = f"{'problem':{width}s} {'variant':38s} {'ms/step':>9s} {'/ hand':>7s} {'/ (b)':>7s} {'/ AdamW':>8s}"
    lines = [head, "-" * len(head)]
    for res, where in zip(results, wheres):
        for key, t in res.median.items():
            hand = res.ratio(key, HAND_FOR.get(key, ""))
            safegrad = res.ratio(key, "b") if key not in "ab" else None
            adamw = res.ratio(key, "a") if key != "a" else None
            vs_hand = f"{hand:6.2f}x" if hand else f"{'-':>7s}"
            vs_b = f"{safegrad:6.2f}x" if safegrad else f"{'-':>7s}"
            vs_adamw = f"{adamw:7.2f}x" if adamw else f"{'-':>8s}"
            lines.append(f"{where:{width}s} {VARIANTS[key]:38s} {t * 1e3:9.2f} {vs_hand} {vs_b} {vs_adamw}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def _quadprog():
    try:
        return require("quadprog", "dev", "gradsafe bench --live (d) and (e)")
    except MissingDependency as exc:
        print(f"{exc}; skipping (d) and (e)", flush=True)
        return None


def run_live(args: argparse.Namespace) -> int:
    """``gradsafe bench --live``: per problem check, time and print; 1 when a check fails."""
    device = pick_device(getattr(args, "device", None))
    quick = bool(getattr(args, "quick", False))
    repeats = getattr(args, "rounds", None) or (2 if quick else 5)
    steps = getattr(args, "steps", None) or (2 if quick else 20)
    warmup = 2 if quick else 3
    backend = getattr(args, "backend", None)
    names = getattr(args, "problems", None) or PROBLEMS
    quadprog = _quadprog()
    results: list[ProblemTimes] = []
    backend_used = backend
    for name in names:
        try:
            problem = make_live_problem(name, quick=quick, device=device)
        except MissingDependency as exc:
            print(f"{exc}; skipping {name}", flush=True)
            continue
        variants = make_variants(problem, backend, quadprog)
        print(f"{name}: {problem.label}, {problem.numel:,} parameters; checking (b)=(c), (g)=(f)"
              f"{' and (d)=(e)' if 'd' in variants else ''}, then timing {len(variants)} variants x "
              f"{repeats} repeats x {steps} steps", flush=True)
        checks = check_pair("(b) vs (c)", variants["b"], variants["c"], 1)
        checks += check_pair("(g) vs (f)", variants["g"], variants["f"], 1)
        if "d" in variants:
            checks += check_pair("(e) vs (d)", variants["e"], variants["d"], ALIGN_BATCHES)
        for c in checks:
            print(f"  check {c}", flush=True)
        bad = [c for c in checks if not c.ok]
        if bad:
            for c in bad:
                print(f"gradsafe bench --live: CHECK FAILED on {name}: {c} (tolerance {TOLERANCE:.0e}); "
                      "the loops compared do not compute the same step, so their times mean nothing",
                      file=sys.stderr, flush=True)
            return 1
        times = time_interleaved({k: v.step for k, v in variants.items()}, repeats, steps, warmup, device)
        results.append(ProblemTimes(problem, times))
        backend_used = variants["c"].backend_name
        if len(names) > 1:  # this problem's rows now (a full run takes minutes); the table at the end
            print("\n".join(format_live_table(results[-1:]).splitlines()[2:]), flush=True)
    text = (
        f"gradsafe bench --live: AdamW lr {LR:.0e}, fp32, {device_label(device)}, gradsafe backend {backend_used}; "
        f"per problem {repeats} repeats x {steps} steps, round-robin over the variants, median"
        + (" (--quick: tiny models)" if quick else "") + "\n"
        "ms/step: median over repeats of (a repeat's time / its steps). Ratios: the median over repeats of the "
        "time over another variant's in the same repeat; / hand: over the matching hand loop's ((c) over (b), "
        "(f) over (g), (d) over (e)); / (b): over the hand SafeGrad loop's; / AdamW: over (a)'s. Time ratios: "
        "lower is better.\n"
        + format_live_table(results)
        + "\n(b)=(c), (g)=(f) and (d)=(e) were checked to take the same step (tolerance "
        f"{TOLERANCE:.0e} relative); (f) and (g) project AdamW's update, a different step from (b)'s and (c)'s."
    )
    emit(text, getattr(args, "out", None))
    return 0
