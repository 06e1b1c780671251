"""The options of a protected objective, declared once.

``ObjectiveConfig`` is the one declaration: ``ProtectedOptimizer(...)`` takes its fields as
keyword defaults for every objective, ``protect(...)`` as per-objective overrides, the state
dict saves it with ``dataclasses.asdict``, and docs/api.md's options table is checked
against it (``option_table()``). Each field's ``metadata["doc"]`` says what it means.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Optional, Union

from .operators import Operator, operator_for

__all__ = [
    "ObjectiveConfig",
    "MODES",
    "SCOPES",
    "REFERENCES",
    "SIDES",
    "FISHER_KINDS",
    "OPTION_NAMES",
    "config_from",
    "with_overrides",
    "option_table",
]

Mode = Literal["project", "conflict", "observe"]
Scope = Literal["global", "tensor", "factored"]
References = Literal["mean", "samples"]
Sides = Literal["both", "left", "right"]
FisherKind = Literal["samples", "identity"]
Importance = Optional[Literal["sgp"]]

MODES: tuple[str, ...] = typing.get_args(Mode)
SCOPES: tuple[str, ...] = typing.get_args(Scope)
REFERENCES: tuple[str, ...] = typing.get_args(References)
SIDES: tuple[str, ...] = typing.get_args(Sides)
FISHER_KINDS: tuple[str, ...] = typing.get_args(FisherKind)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class ObjectiveConfig:
    """How an objective is protected. Validated on construction."""

    mode: Mode = field(default="project", metadata=_doc(
        "`project`: remove the gradient's component in the protected subspace (OGD/GPM; a scaled projection "
        "with `strength` < 1; SGP with `importance='sgp'`); `conflict`: keep `<g, r> >= 0` for the references "
        "(A-GEM; GEM with `references='samples'`; SafeGrad with a closure refreshed every step and `rho`); "
        "`observe`: surgery off, monitor on (with `ewc` > 0: plain EWC)"))
    rank: int = field(default=16, metadata=_doc(
        "most basis directions kept (per tensor with `scope='tensor'`, per side and matrix with "
        "`'factored'`); also the number of samples kept with `references='samples'`"))
    scope: Scope = field(default="global", metadata=_doc(
        "`global`: one basis over all covered parameters; `tensor`: one per parameter; `factored`: "
        "left/right bases per weight matrix (1-D parameters per tensor)"))
    strength: float = field(default=1.0, metadata=_doc(
        "fraction of the protected component removed, in [0, 1] (`project` only), the same for every direction"))
    importance: Importance = field(default=None, metadata=_doc(
        "`'sgp'`: scale each basis direction by SGP's importance `(scale + 1) sigma_i / (scale sigma_i + sigma_max)` "
        "(`project`, scopes `global` / `tensor`); None: `strength` for every direction"))
    scale: float = field(default=1.0, metadata=_doc(
        "SGP's `alpha` in the importance above, > 0 (`importance='sgp'` only)"))
    ewc: float = field(default=0.0, metadata=_doc(
        "EWC: add the gradient of `ewc/2 sum F (theta - theta*)^2` (anchor `theta*`: the parameters at "
        "registration) before any surgery, >= 0, any mode"))
    fisher: FisherKind = field(default="samples", metadata=_doc(
        "the EWC penalty's `F`: `samples` (mean of the squared gradient samples, or `fisher_diagonal=` given to "
        "`protect`), `identity` (`F = 1`: L2-SP)"))
    ewc_gamma: float = field(default=1.0, metadata=_doc(
        "online EWC: `consolidate` makes the Fisher `ewc_gamma F_old + F_new`, in [0, 1]"))
    rho: float = field(default=0.0, metadata=_doc(
        "after the surgery, add `rho r` (r: the mean reference, the protected loss's gradient) to the step's "
        "gradient (SafeGrad's `rho`), >= 0, any mode"))
    damping: float = field(default=0.0, metadata=_doc(
        "Fisher damping `g / (1 + damping F_hat)`, a preconditioner at the current point (not EWC: no anchor), "
        ">= 0, any mode"))
    references: References = field(default="mean", metadata=_doc(
        "conflict references: `mean` (one, A-GEM) or `samples` (the last `rank` samples, GEM)"))
    refresh_every: Union[int, Literal["auto"], None] = field(default=None, metadata=_doc(
        "closure objectives: recompute the memory every N steps, `'auto'` (when the loss leaves the "
        "first-order prediction), or never"))
    energy: float = field(default=1.0, metadata=_doc(
        "keep the fewest directions that capture this share of the samples' energy, in (0, 1] (GPM's threshold)"))
    fisher_decay: float = field(default=0.5, metadata=_doc(
        "online Fisher average across merges: `F <- decay F + (1 - decay) F_new`, in [0, 1)"))
    sides: Sides = field(default="both", metadata=_doc(
        "`factored` scope: which bases a matrix keeps (`both`, `left`, `right`)"))
    memory_budget: Union[int, float, None] = field(default=None, metadata=_doc(
        "bytes (int) or a fraction of the covered parameters' bytes (float) the memory must fit; "
        "bases are truncated by energy per byte"))

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("scope", SCOPES), ("references", REFERENCES), ("sides", SIDES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (isinstance(self.strength, (int, float)) and 0.0 <= self.strength <= 1.0):
            raise ValueError(f"strength must be a number in [0, 1], got {self.strength!r}")
        for name in ("damping", "ewc", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"unknown fisher {self.fisher!r}; expected one of {FISHER_KINDS}")
        if isinstance(self.ewc_gamma, bool) or not (isinstance(self.ewc_gamma, (int, float)) and 0.0 <= self.ewc_gamma <= 1.0):
            raise ValueError(f"ewc_gamma must be a number in [0, 1], got {self.ewc_gamma!r}")
        if self.importance not in (None, "sgp"):
            raise ValueError(f"unknown importance {self.importance!r}; expected None or 'sgp'")
        if isinstance(self.scale, bool) or not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if self.refresh_every is not None and self.refresh_every != "auto":
            if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int):
                raise TypeError(f"refresh_every must be an int, 'auto' or None, got {self.refresh_every!r}")
            if self.refresh_every < 1:
                raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0.0 <= self.fisher_decay < 1.0:
            raise ValueError(f"fisher_decay must be in [0, 1), got {self.fisher_decay}")
        budget = self.memory_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise TypeError(f"memory_budget must be bytes (int), a fraction (float) or None, got {budget!r}")
            if isinstance(budget, int) and budget < 1:
                raise ValueError(f"memory_budget in bytes must be >= 1, got {budget}")
            if isinstance(budget, float) and not 0.0 < budget <= 1.0:
                raise ValueError(f"memory_budget as a fraction of the parameters' bytes must be in (0, 1], got {budget}")
        self.operator.check(self)

    @property
    def operator(self) -> Operator:
        """The operator family that implements this configuration (``gradsafe.operators``)."""
        return operator_for(self)

    @property
    def acts(self) -> bool:
        """Whether the objective changes the gradient (besides damping)."""
        return self.operator.acts(self)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ObjectiveConfig))


def _check_names(options: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}; objective options are {list(OPTION_NAMES)}")


def config_from(options: Mapping[str, Any], where: str) -> ObjectiveConfig:
    """An ``ObjectiveConfig`` from keyword options (unknown names raise ``TypeError`` naming ``where``)."""
    _check_names(options, where)
    return ObjectiveConfig(**options)


def with_overrides(base: ObjectiveConfig, overrides: Mapping[str, Any], where: str) -> ObjectiveConfig:
    """``base`` with the given options replaced; ``None`` values keep the base's.

    Raises ``TypeError`` naming ``where`` for a keyword that is not an objective option.
    """
    _check_names(overrides, where)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def option_table() -> str:
    """The options as a Markdown table (name, default, meaning): the one in docs/api.md."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields(ObjectiveConfig):
        lines.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines)
