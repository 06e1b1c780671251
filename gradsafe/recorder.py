"""What a step leaves behind: the report (computed on first access), metrics and sinks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .backends.base import StepRecord
from .objective import ProtectedObjective
from .plan import Plan
from .report import step_report

__all__ = ["Recorder", "Report", "Sink"]

Sink = Callable[[int, dict[str, float]], None]


class Report(dict):
    """The report of the last step: objective name -> its statistics (a plain dict otherwise).

    Asking for an objective that has no entry says why, instead of a bare ``KeyError``.
    """

    def __init__(self, *args, known: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._known = known

    def __missing__(self, name: str):
        if name in self._known:
            raise KeyError(
                f"no report for objective {name!r} yet: the report describes the last step, and no step "
                f"has run with {name!r} since it was protected (or since load_state_dict)"
            )
        raise KeyError(f"no protected objective named {name!r}; the report has {sorted(self)}")


@dataclass
class _LastStep:
    """What the report of the last step is computed from."""

    plan: Plan
    record: StepRecord
    step_scale: np.ndarray
    fisher_step: dict[str, torch.Tensor]
    penalties: dict[str, torch.Tensor]
    alignment_after: bool


class Recorder:
    """The last booked step, its report (lazy), and the sinks that want it."""

    def __init__(self, per_tensor: bool = False, fisher_metrics: bool = False) -> None:
        self.per_tensor = per_tensor
        self.fisher_metrics = fisher_metrics
        self.sinks: list[tuple[Sink, int]] = []
        self._last: _LastStep | None = None
        self._cache: dict[str, dict[str, float]] | None = None
        self._nonfinite = 0  # steps with a non-finite gradient, seen on the host
        self._nonfinite_device: torch.Tensor | None = None  # ... and decided on a device
        self._warned_nonfinite = False
        self._penalties: dict[str, torch.Tensor] = {}

    def note_penalties(self, penalties: dict[str, torch.Tensor]) -> None:
        """The EWC penalties of the step about to be booked (0-d device tensors, by objective)."""
        self._penalties = penalties

    def clear(self) -> None:
        self._last = None
        self._cache = None

    # ------------------------------------------------------------------ non-finite steps
    def count_nonfinite(self, record: StepRecord, plan: Plan, step: int, policy: str) -> list[int]:
        """Count the step if its gradient was not finite, warn the first time; returns the
        parameter indices whose squared norm is not finite (empty if unknown or finite).

        A device flag (a backend that does not synchronise) is added up on the device.
        """
        flag = record.finite
        if isinstance(flag, torch.Tensor) and flag.device.type != "cpu":
            miss = (~flag).to(torch.int64)
            self._nonfinite_device = miss if self._nonfinite_device is None else self._nonfinite_device + miss
            return []
        if bool(flag):
            return []
        coefs = record.host()[0]
        return self.note_nonfinite(coefs[plan.norms_offset : plan.norms_offset + plan.num_tensors], plan, step, policy)

    def note_nonfinite(self, hh: np.ndarray, plan: Plan, step: int, policy: str) -> list[int]:
        """Count a non-finite step whose tensors' squared norms are ``hh`` (per plan position),
        warn the first time; returns the parameter indices whose norm is not finite."""
        self._nonfinite += 1
        bad = [plan.param_indices[p] for p in np.flatnonzero(~np.isfinite(hh))]
        self._warn_nonfinite(f"at step {step} the gradient of parameter(s) {bad or '(a sum overflowed)'} is not finite", policy)
        return bad

    def _warn_nonfinite(self, what: str, policy: str) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        action = {"pass": "the surgery was left out of that step (the gradient passed through as it came)",
                  "skip": "the step was skipped", "raise": "an error was raised"}[policy]
        warnings.warn(f"gradsafe: {what}; {action} (nonfinite={policy!r}; warned once, counted in "
                      "opt.nonfinite_steps and the report)", RuntimeWarning, stacklevel=5)

    def nonfinite_count(self) -> int:
        device = 0 if self._nonfinite_device is None else int(self._nonfinite_device)
        if device and not self._warned_nonfinite:
            self._warn_nonfinite(f"{device} step(s) had a non-finite gradient", "pass")
        return self._nonfinite + device

    def book(
        self,
        plan: Plan,
        record: StepRecord,
        tensors: list[torch.Tensor] | None,
        step_scale: np.ndarray,
        objectives: Mapping[str, ProtectedObjective],
        alignment_after: bool = True,
    ) -> bool:
        """Book a finished step; False if it is not a real step. ``alignment_after``: SafeGrad
        terms were added after the surgery (space "grad").

        A step whose covered gradients were all exactly zero (the fake step with which
        torch.distributed.checkpoint materialises state) is not booked.
        """
        if plan.num_tensors and isinstance(record.coefs, np.ndarray) and not record.coefs[plan.norms_offset :].any():
            return False
        fisher_step = self._fisher_step(plan, tensors, step_scale, objectives) if tensors is not None else {}
        self._last = _LastStep(plan, record, step_scale, fisher_step, self._penalties, alignment_after)
        self._penalties = {}
        self._cache = None
        if any(o.had_closure for o in objectives.values()) and record.is_finite():
            for name, stats in self.report(objectives).items():
                obj = objectives.get(name)
                if obj is not None and obj.had_closure:
                    obj.schedule.predicted_since_refresh += stats["predicted_change"]
        return True

    def emit(self, step: int, objectives: Mapping[str, ProtectedObjective]) -> None:
        """Hand the booked step, as step number ``step``, to the sinks due at it."""
        if self.sinks:
            flat = self.flat_metrics(objectives)
            for sink, every in self.sinks:
                if step % every == 0:
                    sink(step, flat)

    def _fisher_step(
        self, plan: Plan, tensors: list[torch.Tensor], scale: np.ndarray, objectives: Mapping[str, ProtectedObjective]
    ) -> dict[str, torch.Tensor]:
        """``sum F (delta theta)^2`` per objective, on the device (only with ``fisher_metrics``)."""
        if not self.fisher_metrics:
            return {}
        out = {}
        for b in plan.blocks:
            obj = objectives[b.name]
            if obj.fisher is None:  # factored objectives without damping keep no Fisher
                continue
            cols = obj.memory_slices()
            parts = [
                (obj.fisher[cols[obj.coverage.index(plan.param_indices[p])]] * tensors[p].detach().reshape(-1).float().square()).sum()
                * float(scale[p]) ** 2
                for p in b.positions
            ]
            total = torch.stack(parts).sum()
            out[b.name] = out[b.name] + total if b.name in out else total
        return out

    def report(self, objectives: Mapping[str, ProtectedObjective]) -> dict[str, dict[str, float]]:
        """The last booked step, per objective, as floats (docs/monitor.md has the formulas)."""
        if self._last is None:
            return Report(known=tuple(objectives))
        if self._cache is None:
            last = self._last
            coefs, weights = last.record.host()
            report = step_report(last.plan, coefs, weights, last.step_scale, per_tensor=self.per_tensor,
                                 alignment_after=last.alignment_after)
            for name, stats in report.items():
                obj = objectives.get(name)
                if obj is not None and obj.schedule.staleness is not None:
                    stats["staleness"] = float(obj.schedule.staleness)
                if name in last.fisher_step:
                    stats["fisher_step"] = float(last.fisher_step[name])
            for name, penalty in last.penalties.items():  # an EWC penalty alone has no block
                report.setdefault(name, {})["ewc_penalty"] = float(penalty)
            self._cache = Report(report)
        self._cache._known = tuple(objectives)  # objectives protected since the step have no entry yet
        count = self.nonfinite_count()
        if count:
            for stats in self._cache.values():
                stats["nonfinite_steps"] = float(count)
        return self._cache

    def flat_metrics(self, objectives: Mapping[str, ProtectedObjective]) -> dict[str, float]:
        return {f"gradsafe/{name}/{stat}": v for name, stats in self.report(objectives).items() for stat, v in stats.items()}

    def add_sink(self, sink: Sink, every: int = 1) -> None:
        if not callable(sink):
            raise TypeError("sink must be callable as sink(step, metrics)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.sinks.append((sink, every))

    def remove_sink(self, sink: Sink) -> None:
        self.sinks = [(s, e) for s, e in self.sinks if s is not sink]
