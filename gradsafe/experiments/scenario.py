"""The scenario plug-in interface: what the protocol, methods, tables and plots know of a scenario.

A scenario brings its data, model and metrics, and declares:

- ``conditions``: the fine-tuning datasets or settings it runs (``tuned_condition`` is the
  one the protocol tunes on); ``pretrain_key(condition)`` says which pretrained model a
  condition starts from;
- ``protected`` and ``new``: its protected metric and its new-task metric (``Metric``:
  key, label, direction), read by the Pareto plot; ``metrics``: the table's columns;
  ``criterion(final)``: the one scalar the tuning selects on (higher is better);
- ``steps_grid`` and ``lr_grid``: the protocol's per-stage steps and learning rates;
- ``pretrain(seed, key)`` and ``run(seed, condition, method, setting, pretrained,
  monitor)``: a run returns ``final`` (the metrics), ``stages`` (per stage: ``cosine``,
  ``curve``, ``windows``), ``cost`` (``example_grads``, ``train_seconds``).

``runner.run_stage`` does a stage's training for any scenario and method; a new scenario
(as ``lm_safety``, a pretrained language model, did) subclasses ``Scenario`` and is added to
``FACTORIES`` in ``jobs``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Metric", "Setting", "Scenario", "safety_condition", "harmful_share"]


def safety_condition(name: str, scenario: str = "safety") -> tuple[str, float]:
    """A safety-domain condition by name: ``"harmful-<p>"`` (0 < p < 1) -> ("harmful", p);
    ``"identity-shift"``, ``"benign-only"`` -> (name, 0). Another name is a ValueError naming ``scenario``."""
    if name in ("identity-shift", "benign-only"):
        return name, 0.0
    if name.startswith("harmful-"):
        try:
            p = float(name[len("harmful-"):])
        except ValueError:
            p = -1.0
        if 0.0 < p < 1.0:
            return "harmful", p
    raise ValueError(f"unknown {scenario} condition {name!r}; expected harmful-<p> (0 < p < 1), identity-shift "
                     "or benign-only (which is p = 0)")


def harmful_share(name: str) -> float | None:
    """The share p of harmful examples in a condition on the harmful-ratio curve (``benign-only``
    is p = 0); None for any other name (``identity-shift``, another scenario's conditions)."""
    try:
        kind, p = safety_condition(name)
    except ValueError:
        return None
    return p if kind in ("harmful", "benign-only") else None

@dataclass(frozen=True)
class Metric:
    """A metric a scenario reports: its key in ``final``, its label, its direction."""

    key: str
    label: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Setting:
    """One point of the tuning grid: learning rate, steps per stage, the method's own knobs."""

    lr: float
    steps: int
    knobs: tuple[tuple[str, float], ...] = ()

    @property
    def knob_dict(self) -> dict[str, float]:
        return dict(self.knobs)

    def key(self) -> str:
        """A short stable text key, e.g. ``lr=0.001 steps=100 lam=100``."""
        return " ".join([f"lr={self.lr:g}", f"steps={self.steps}"] + [f"{k}={v:g}" for k, v in self.knobs])

    def as_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": self.steps, "knobs": dict(self.knobs)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Setting:
        return Setting(float(d["lr"]), int(d["steps"]), tuple(sorted((str(k), float(v)) for k, v in d["knobs"].items())))


@dataclass
class Scenario(ABC):
    """A scenario plug-in (see the module docstring)."""

    name: str = ""
    title: str = ""
    conditions: tuple[str, ...] = ()
    tuned_condition: str = ""
    protected: Metric = field(default_factory=lambda: Metric("protected", "protected"))
    new: Metric = field(default_factory=lambda: Metric("new", "new task"))
    metrics: tuple[Metric, ...] = ()
    criterion_label: str = ""
    steps_grid: tuple[int, ...] = ()
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per base optimizer
    methods: tuple[str, ...] | None = None  # the methods the protocol runs here (None: every method)
    # the default demo's subset here: its methods on the tuned condition (None: ``DEFAULT_METHODS``) and whether
    # plain also runs on the other conditions
    demo_methods: tuple[str, ...] | None = None
    demo_plain_conditions: bool = True

    def runs_method(self, method: str) -> bool:
        """Whether the protocol runs ``method`` on this scenario (plain always)."""
        return method == "plain" or self.methods is None or method in self.methods

    def in_demo(self, method: str) -> bool:
        """Whether the default demo runs ``method`` on this scenario's tuned condition (plain always)."""
        return self.runs_method(method) and (self.demo_methods is None or method == "plain" or method in self.demo_methods)

    def pretrain_key(self, condition: str) -> str:
        """Which pretrained model ``condition`` starts from (default: one per scenario)."""
        return "default"

    @abstractmethod
    def pretrain(self, seed: int, key: str) -> dict[str, Any]:
        """The model every method starts from (a state dict and whatever ``run`` needs)."""

    @abstractmethod
    def run(self, seed: int, condition: str, method: str, setting: Setting, pretrained: dict[str, Any],
            monitor: bool = True) -> dict[str, Any]:
        """One method's run from ``pretrained`` (see the module docstring for what it returns)."""

    @abstractmethod
    def criterion(self, final: dict[str, float]) -> float:
        """The tuning's selection criterion (higher is better)."""

    def describe(self) -> dict[str, Any]:
        """The configuration as recorded in the results."""
        return {"name": self.name, "title": self.title, "conditions": list(self.conditions),
                "tuned_condition": self.tuned_condition, "criterion": self.criterion_label}
