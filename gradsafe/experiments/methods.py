"""The methods compared by the study: name -> base optimizer, gradsafe objectives, loss terms.

A method is built per training stage (``build``) from the stage's protected sets
(``Protected``: memory examples and the functions a method needs on them) and its
setting's knobs. It can act in three places, and combinations act in several:

- the base optimizer (AdamW, or SGD for OGD and GPM as in their papers);
- gradsafe objectives on the ``ProtectedOptimizer`` (EWC / online EWC / L2-SP penalties,
  Fisher damping, projections, conflict constraints with live references, SafeGrad's rho);
- extra loss terms (``LossTerms``): replay / safety-data mixing from the memory, LwF's KL to
  the previous model on the new inputs, SafeGrad's KL regulariser on the memory's inputs,
  joint training on all earlier data.

Every method gets the same protected data budget (the memory); ``joint`` is the upper bound
that sees all earlier data. Costs are counted in example-gradients (a backward pass over b
examples counts b).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..activations import collect_activation_bases
from ..collect import collect_gradients
from ..optimizer import ProtectedOptimizer

__all__ = ["Protected", "Method", "METHODS", "QUICK_METHODS", "DEFAULT_METHODS", "FAMILIES", "Built", "build", "method_names", "kl_rows"]

Sample = list["torch.Tensor | None"]
LWF_TEMPERATURE = 2.0  # Li and Hoiem 2017
KL_BATCH = 16  # memory examples per step in the KL-regulariser loss
ONLINE_EWC_GAMMA = 0.9


class Protected:
    """One protected set: its memory and what methods compute on it, each counted.

    ``memory`` is indexable by an index tensor or a slice and has a ``len``; the functions
    take ``(model, subset)``: ``loss`` (mean loss), ``logits`` (rows x classes: every
    position the loss reads), ``target_logit`` (mean ground-truth logit: OGD's model output),
    ``forward`` (the model's forward on the inputs: GPM's activations). ``pool`` is all of
    the set's training data (the joint upper bound only). ``anchor``: the parameters when the
    set was learnt (EWC's theta*).
    """

    def __init__(self, name: str, model: torch.nn.Module, memory: Any, loss: Callable[[Any, Any], torch.Tensor],
                 logits: Callable[[Any, Any], torch.Tensor], target_logit: Callable[[Any, Any], torch.Tensor],
                 forward: Callable[[Any, Any], Any], pool: Any = None) -> None:
        self.name = name
        self.model = model
        self.memory = memory
        self.loss_fn = loss
        self.logits_fn = logits
        self.target_logit_fn = target_logit
        self.forward_fn = forward
        self.pool = memory if pool is None else pool
        self.anchor = [p.detach().clone() for p in model.parameters()]
        self._samples: dict[str, list[Sample]] = {}
        self.activation_bases: dict[float, Any] = {}  # GPM's, by energy threshold
        self.example_grads = 0  # spent building gradient samples

    def __len__(self) -> int:
        return len(self.memory)

    def _subset(self, i: int) -> Any:
        return self.memory[i : i + 1]

    def samples(self, kind: str = "loss") -> list[Sample]:
        """One gradient sample per memory example (``kind``: "loss" or "logit"), at the parameters of the first call."""
        if kind not in self._samples:
            fn = self.loss_fn if kind == "loss" else self.target_logit_fn
            n = len(self.memory)
            self._samples[kind] = collect_gradients(self.model, lambda b: fn(self.model, b),
                                                    [self._subset(i) for i in range(n)])
            self.example_grads += n
        return self._samples[kind]

    def loss(self, subset: Any = None) -> torch.Tensor:
        """The protected loss on ``subset`` of the memory (default: all of it) at the current parameters."""
        return self.loss_fn(self.model, self.memory if subset is None else subset)


class _CountingClosure:
    """A protected loss as a closure; counts the example-gradients gradsafe spends on it."""

    def __init__(self, fn: Callable[[], torch.Tensor], rows: int) -> None:
        self.fn = fn
        self.rows = rows
        self.example_grads = 0

    def __call__(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.example_grads += self.rows
        return self.fn()


def kl_rows(ref_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(softmax(ref / T) || softmax(logits / T))."""
    ref = F.log_softmax(ref_logits / temperature, dim=-1)
    cur = F.log_softmax(logits / temperature, dim=-1)
    return (ref.exp() * (ref - cur)).sum(-1).mean()


def _memory_kl_closure(model: torch.nn.Module, protected: Sequence[Protected]) -> Callable[[], torch.Tensor]:
    """KL(reference || model) on the whole memory's inputs, the reference being the model now (cached)."""
    with torch.no_grad():
        refs = [p.logits_fn(model, p.memory).detach() for p in protected]

    def kl() -> torch.Tensor:
        return torch.stack([kl_rows(ref, p.logits_fn(model, p.memory)) for p, ref in zip(protected, refs)]).mean()

    return kl


@dataclass
class LossTerms:
    """What a method adds to the new-task loss of a step."""

    replay_share: float = 0.0  # share of the batch's slots drawn from the memory
    joint: bool = False  # half of the batch from all earlier training data
    lwf_weight: float = 0.0  # LwF: KL(previous model || model) on the new inputs
    kl_weight: float = 0.0  # SafeGrad's KL regulariser on the memory's inputs
    previous: torch.nn.Module | None = None  # the model at the stage's start, frozen (LwF, KL)


@dataclass
class Built:
    """A method built for one stage: the optimizer, its loss terms, what it counts."""

    optimizer: torch.optim.Optimizer
    terms: LossTerms
    closures: list[_CountingClosure] = field(default_factory=list)
    setup_example_grads: int = 0


Register = Callable[[ProtectedOptimizer, Sequence[Protected], dict[str, float], list[_CountingClosure]], None]


@dataclass(frozen=True)
class Method:
    """One row of the method table: its family, base, space, knobs (grid) and what it registers."""

    name: str
    label: str
    family: str
    base: str = "adamw"  # or "sgd"
    space: str = "grad"
    knobs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    register: Register | None = field(default=None, repr=False)
    terms: Callable[[dict[str, float]], LossTerms] = field(default=lambda k: LossTerms(), repr=False)
    quick: bool = False
    note: str = ""


def _live_closure(protected: Sequence[Protected], closures: list[_CountingClosure]) -> _CountingClosure:
    rows = sum(len(p) for p in protected)
    c = _CountingClosure(lambda: torch.stack([p.loss() for p in protected]).mean(), rows)
    closures.append(c)
    return c


def _agem(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    opt.protect("memory", closure=_live_closure(protected, closures), mode="conflict", refresh_every=1)


def _gem(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:  # one constraint per protected set, each reference recomputed every step (exact QP)
        opt.protect(p.name, closure=_live_closure([p], closures), mode="conflict", refresh_every=1)


def _safegrad(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    c = _CountingClosure(_memory_kl_closure(protected[0].model, protected), sum(len(p) for p in protected))
    closures.append(c)
    opt.protect("alignment", closure=c, mode="conflict", refresh_every=1, rho=float(k["rho"]))


def _ewc(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:  # one penalty per learnt set, anchored where it was learnt (Kirkpatrick et al. 2017)
        opt.protect(p.name, p.samples(), mode="observe", ewc=float(k["lam"]), anchor=p.anchor)


def _online_ewc(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    first, *rest = protected  # one penalty, Fisher gamma-averaged, anchor moved to the latest set (Schwarz et al. 2018)
    opt.protect("tasks", first.samples(), mode="observe", ewc=float(k["lam"]), ewc_gamma=ONLINE_EWC_GAMMA,
                anchor=first.anchor)
    for p in rest:
        opt.consolidate("tasks", p.samples())


def _l2sp(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    opt.protect("start", mode="observe", ewc=float(k["lam"]), fisher="identity")  # anchor: the stage's start


def _damping(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:
        opt.protect(p.name, p.samples(), mode="observe", damping=float(k["lam"]))


def _ogd(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:  # the gradients of the ground-truth logit (Farajtabar et al. 2020, OGD-GTL)
        opt.protect(p.name, p.samples("logit"), mode="project", rank=len(p))


def _gpm(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:  # bases of each layer's inputs on the set's memory, taken when it was learnt (Saha et al. 2021)
        energy = float(k["energy"])
        if energy not in p.activation_bases:
            p.activation_bases[energy] = collect_activation_bases(
                p.model, [p.memory], energy=energy, forward=lambda m, b, p=p: p.forward_fn(m, b))
        opt.protect(p.name, bases=p.activation_bases[energy], mode="project")


def _sgp(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:
        opt.protect(p.name, p.samples(), mode="project", rank=len(p), importance="sgp", scale=float(k["alpha"]))


def _ewc_ogd(opt: ProtectedOptimizer, protected: Sequence[Protected], k: dict[str, float], closures: list) -> None:
    for p in protected:  # EWC's penalty gradient enters before the projection (one joint rule)
        opt.protect(p.name, p.samples(), mode="project", rank=len(p), ewc=float(k["lam"]), anchor=p.anchor)


FAMILIES = ("baseline", "data", "loss", "penalty", "preconditioner", "projection", "conflict", "combination", "upper bound")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("plain", "plain AdamW", "baseline", quick=True, note="AdamW alone"),
        Method("replay", "replay", "data", knobs={"share": (0.25, 0.5)}, quick=True,
               terms=lambda k: LossTerms(replay_share=float(k["share"])),
               note="a share of each batch from the memory (safety: safety-data mixing)"),
        Method("lwf", "LwF", "loss", knobs={"weight": (1.0, 10.0)},
               terms=lambda k: LossTerms(lwf_weight=float(k["weight"])), note="KL(previous || model) on the new inputs, T = 2"),
        Method("kl", "KL regulariser", "loss", knobs={"weight": (1.0, 10.0)},
               terms=lambda k: LossTerms(kl_weight=float(k["weight"])), note="SafeGrad's KL on the memory's inputs, as a loss"),
        Method("ewc", "EWC", "penalty", knobs={"lam": (100.0, 1000.0)}, register=_ewc, quick=True,
               note="empirical Fisher, anchor where each set was learnt"),
        Method("online_ewc", "online EWC", "penalty", knobs={"lam": (100.0, 1000.0)}, register=_online_ewc,
               note="one penalty, gamma 0.9, consolidated per task"),
        Method("l2sp", "L2-SP", "penalty", knobs={"lam": (0.1, 1.0)}, register=_l2sp, note="fisher='identity'"),
        Method("damping", "Fisher damping", "preconditioner", space="update", knobs={"lam": (1.0, 10.0)},
               register=_damping, note="g / (1 + lam F): a preconditioner, not EWC"),
        Method("ogd", "OGD (SGD)", "projection", base="sgd", register=_ogd, note="off the ground-truth logit gradients"),
        Method("gpm", "GPM (SGD)", "projection", base="sgd", knobs={"energy": (0.95, 0.99)}, register=_gpm,
               note="off activation bases"),
        Method("sgp", "SGP", "projection", space="update", knobs={"alpha": (1.0, 10.0)}, register=_sgp,
               note="per-direction importance, gradient basis"),
        Method("agem", "A-GEM live", "conflict", space="update", register=_agem, quick=True,
               note="one reference, recomputed every step"),
        Method("gem", "GEM live", "conflict", space="update", register=_gem,
               note="one constraint per set, recomputed every step"),
        Method("safegrad", "SafeGrad", "conflict", space="update", knobs={"rho": (0.1, 1.0)}, register=_safegrad, quick=True,
               note="conflict vs live KL gradient, + rho r"),
        Method("replay_agem", "replay+A-GEM", "combination", space="update", knobs={"share": (0.25, 0.5)},
               register=_agem, terms=lambda k: LossTerms(replay_share=float(k["share"]))),
        Method("ewc_ogd", "EWC+projection", "combination", space="update", knobs={"lam": (100.0, 1000.0)},
               register=_ewc_ogd),
        Method("joint", "joint (upper)", "upper bound", terms=lambda k: LossTerms(joint=True),
               note="half of each batch from all earlier data"),
    )
}
QUICK_METHODS = tuple(name for name, m in METHODS.items() if m.quick)
# the default demo's subset of the report (docs/study.md, fixed before the report runs): the
# literature's first baselines (replay, the KL loss, EWC), the thesis's live operators
# (A-GEM, SafeGrad) and the upper bound; ``--full`` reports every method
DEFAULT_METHODS = ("plain", "replay", "kl", "ewc", "agem", "safegrad", "joint")


def method_names(names: Sequence[str] | None = None, quick: bool = False) -> tuple[str, ...]:
    """Validated method names, the baseline first; None: all (or the quick subset)."""
    if names is None:
        names = QUICK_METHODS if quick else tuple(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {tuple(METHODS)}")
    return tuple(dict.fromkeys(("plain", *names)))


def build(method: str, model: torch.nn.Module, protected: Sequence[Protected], lr: float, knobs: dict[str, float],
          weight_decay: float = 0.01) -> Built:
    """The method ``method`` for one stage over ``model``'s parameters."""
    m = METHODS[method]
    missing = set(m.knobs) - set(knobs)
    if missing:
        raise ValueError(f"method {method!r}: knobs {sorted(missing)} have no value")
    params = list(model.parameters())
    if m.base == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    else:
        base = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    before = sum(p.example_grads for p in protected)
    closures: list[_CountingClosure] = []
    opt: torch.optim.Optimizer = base
    if m.register is not None:
        opt = ProtectedOptimizer(base, space=m.space)
        m.register(opt, protected, knobs, closures)
    terms = m.terms(knobs)
    if terms.lwf_weight > 0 or terms.kl_weight > 0:
        terms.previous = copy.deepcopy(model).eval()
        for p in terms.previous.parameters():
            p.requires_grad_(False)
    setup = sum(p.example_grads for p in protected) - before + sum(c.example_grads for c in closures)
    for c in closures:
        c.example_grads = 0  # the registration's evaluation counts as setup
    return Built(opt, terms, closures, setup)
