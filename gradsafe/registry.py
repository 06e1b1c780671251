"""The optimizer's objectives by name, built from samples, closures or bases, and the plan
compiled from them (cached until an objective's memory or the parameters change; rows
rewritten in place, a live reference's refresh, only update the plan's numbers that depend
on them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .objective import ProtectedObjective
from .options import ObjectiveConfig
from .plan import Plan, build_plan
from .refresh import closure_gradient
from .report import ReportConstants
from .samples import bases_by_index, normalize_samples, pack_samples
from .sharding import shard_spec

__all__ = ["ObjectiveRegistry"]

Closure = Callable[[], torch.Tensor]


class ObjectiveRegistry:
    """Named objectives in registration order, and the plan of the last step.

    Adding, removing and replacing objectives, and taking a snapshot of them (what the state
    dict saves), hold a lock: ``protect`` from one thread and ``state_dict`` from another do
    not interfere. Steps are not meant to run concurrently on one wrapper.
    """

    def __init__(self) -> None:
        self.objectives: dict[str, ProtectedObjective] = {}
        self.plan: Plan | None = None
        self._plan_params: list[torch.Tensor] = []
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        # a copy compiles its own plan (a plan holds views and, for the kernels, addresses)
        state = {**self.__dict__, "plan": None, "_plan_params": []}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def snapshot(self) -> dict[str, ProtectedObjective]:
        """The objectives now, as a new dict (safe to iterate while another thread protects)."""
        with self._lock:
            return dict(self.objectives)

    def __iter__(self) -> Iterator[ProtectedObjective]:
        return iter(self.objectives.values())

    def get(self, name: str) -> ProtectedObjective:
        try:
            return self.objectives[name]
        except KeyError:
            raise KeyError(f"no protected objective named {name!r}; known: {sorted(self.objectives)}") from None

    def invalidate(self) -> None:
        self.plan = None

    def replace_all(self, objectives: dict[str, ProtectedObjective]) -> None:
        with self._lock:
            self.objectives = objectives
            self.invalidate()

    # ------------------------------------------------------------------ registration
    def register(
        self,
        name: str,
        config: ObjectiveConfig,
        params: list[torch.Tensor],
        step: int,
        *,
        grads: Any = None,
        closure: Closure | None = None,
        bases: Any = None,
    ) -> ProtectedObjective:
        """Build an objective's memory from samples, a closure's gradient or given bases, and add it."""
        loss = None
        samples = None
        if closure is not None:
            loss, sample = closure_gradient(name, closure, params)
            samples = [sample]
        elif grads is not None:
            samples = normalize_samples(grads, name)
        given = {}
        if bases is None:
            coverage, S = pack_samples(samples, params, name)
        else:
            if config.operator.needs_reference and samples is None:
                raise ValueError(f"objective {name!r} in mode {config.mode!r} needs gradient samples or a closure (its reference)")
            given = bases_by_index(bases, params, name)
            cov = set(given)
            if samples is not None:
                cov |= {i for sample in samples for i, t in enumerate(sample) if t is not None}
            coverage = tuple(sorted(cov))
            S = None if samples is None else pack_samples(samples, params, name, coverage=coverage)[1]
        obj = ProtectedObjective(name, config, coverage, [params[i].shape for i in coverage], closure=closure)
        obj.param_bytes = sum(params[i].numel() * params[i].element_size() for i in coverage)
        if given:
            obj.set_bases({coverage.index(i): fm for i, fm in given.items()})
        if S is not None:
            obj.add_samples(S)
        spec = shard_spec(params, coverage)
        if spec is not None:
            obj.shard_to(spec)
        obj.schedule.restart(step, loss)
        with self._lock:
            if name in self.objectives:
                raise ValueError(f"an objective named {name!r} is already protected; unprotect it first")
            self.objectives[name] = obj
            self.invalidate()
        return obj

    def remove(self, name: str) -> ProtectedObjective:
        with self._lock:
            obj = self.get(name)
            del self.objectives[name]
            self.invalidate()
        return obj

    def add_samples(self, name: str, grads: Any, params: list[torch.Tensor]) -> None:
        obj = self.get(name)
        _, S = pack_samples(normalize_samples(grads, name), params, name, coverage=obj.coverage)
        obj.add_samples(S)
        self.invalidate()

    # ------------------------------------------------------------------ the plan
    def current_plan(self, params: list[torch.Tensor], active: frozenset[int] | None = None) -> Plan:
        """The plan for these parameters (those in ``active`` take part), rebuilt when stale."""
        with self._lock:
            objs = list(self.objectives.values())
        if active is None:
            active = frozenset(range(len(params)))
        plan = self.plan
        if (
            plan is None
            or len(self._plan_params) != len(params)
            or any(a is not b for a, b in zip(self._plan_params, params))
            or plan.versions != tuple(o.version for o in objs)
            or plan.active != active
        ):
            for obj in objs:
                for i, shape in zip(obj.coverage, obj.shapes):
                    if i >= len(params) or params[i].shape != shape:
                        got = "missing" if i >= len(params) else tuple(params[i].shape)
                        raise ValueError(
                            f"objective {obj.name!r} covers parameter {i} with shape {tuple(shape)}, "
                            f"but the optimizer's parameter {i} is {got}"
                        )
            plan = self._build(objs, params, active)
        elif plan.rows_versions != tuple(o.rows_version for o in objs):
            plan = self._update(plan, objs, params, active)
        return plan

    @torch.compiler.disable
    def _update(self, plan: Plan, objs: list[ProtectedObjective], params: list[torch.Tensor], active: frozenset[int]) -> Plan:
        """Objectives whose rows were rewritten in place (same shape): update the plan's numbers
        that depend on those rows only (a sharded plan is rebuilt)."""
        if plan.shard is not None:
            return self._build(objs, params, active)
        stale = {o.name: o for o, seen in zip(objs, plan.rows_versions) if o.rows_version != seen}
        changed = [bi for bi, b in enumerate(plan.blocks) if b.name in stale]
        own = {(name, i): g for name, o in stale.items() for i, g in o.row_grams.items()}
        plan.update_rows(changed, own)
        plan.rows_versions = tuple(o.rows_version for o in objs)
        return plan

    @torch.compiler.disable
    def _build(self, objs: list[ProtectedObjective], params: list[torch.Tensor], active: frozenset[int]) -> Plan:
        # host-side bookkeeping (numpy, Python containers): never traced by torch.compile
        plan = build_plan(objs, params, active)
        if plan.shard is not None:
            ReportConstants.of(plan)  # its Grams need a collective: every rank builds them now
        self.plan, self._plan_params = plan, list(params)
        return plan
