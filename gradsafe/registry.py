"""The optimizer's objectives by name, built from samples, closures or bases, and the plan
compiled from them (cached until an objective's memory or the parameters change; rows
rewritten in place, a live reference's refresh, only update the plan's numbers that depend
on them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .objective import ProtectedObjective
from .options import ObjectiveConfig
from .plan import Plan, build_plan
from .refresh import closure_gradient
from .report import ReportConstants
from .samples import bases_by_index, normalize_samples, pack_samples
from .sharding import full, is_dtensor, local, shard_spec

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
        anchor: Any = None,
        fisher_diagonal: Any = None,
    ) -> ProtectedObjective:
        """Build an objective's memory from samples, a closure's gradient or given bases, and add it.

        ``anchor`` / ``fisher_diagonal`` (EWC): sequences aligned with the parameters like a
        sample. An objective with an EWC penalty alone (``fisher="identity"`` or a given
        diagonal, ``mode="observe"``) needs no samples: it covers what they cover.
        """
        loss = None
        samples = None
        if closure is not None:
            loss, sample = closure_gradient(name, closure, params)
            samples = [sample]
        elif grads is not None:
            samples = normalize_samples(grads, name)
        given = {}
        penalty_only = samples is None and bases is None
        if penalty_only:
            coverage = _penalty_coverage(name, config, params, anchor, fisher_diagonal)
            S = None
        elif bases is None:
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
        if fisher_diagonal is not None:
            if config.ewc <= 0 or config.fisher != "samples":
                raise ValueError(f"objective {name!r}: fisher_diagonal is the EWC penalty's F; it needs ewc > 0 and fisher='samples'")
            obj.set_fisher(pack_samples(normalize_samples([fisher_diagonal], name), params, name, coverage=coverage,
                                        allow_zero=True)[1][0])
        if S is not None:
            obj.add_samples(S)
        spec = shard_spec(params, coverage)
        if spec is not None:
            obj.shard_to(spec)
        if anchor is not None and config.ewc <= 0:
            raise ValueError(f"objective {name!r}: an anchor is the EWC penalty's theta*; it needs ewc > 0")
        if config.ewc > 0:
            obj.anchor = anchor_tensors(name, anchor, params, coverage)
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

    def consolidate(self, name: str, grads: Any, params: list[torch.Tensor]) -> None:
        """Online EWC: consolidate a new task's samples into ``name`` (Fisher ``gamma F + F_new``,
        anchor moved to the current parameters)."""
        obj = self.get(name)
        if obj.config.ewc <= 0:
            raise ValueError(f"objective {name!r} has no EWC penalty (ewc=0); consolidate is online EWC's update")
        _, S = pack_samples(normalize_samples(grads, name), params, name, coverage=obj.coverage)
        obj.consolidate(S, anchor_tensors(name, None, params, obj.coverage))
        self.invalidate()

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
        plan.update_rows(changed, {name: o.row_norms2 for name, o in stale.items()},
                         {name: o.lent_rows for name, o in stale.items()})
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


def anchor_tensors(name: str, anchor: Any, params: list[torch.Tensor], coverage: tuple[int, ...]) -> list[torch.Tensor]:
    """EWC's anchor per covered tensor, in the parameter's dtype (this rank's part when
    sharded): copies of ``anchor`` (aligned with the parameters) or of the parameters now."""
    if anchor is None:
        return [local(params[i]).detach().clone() for i in coverage]
    if isinstance(anchor, torch.Tensor) or not isinstance(anchor, Sequence) or len(anchor) != len(params):
        raise ValueError(f"objective {name!r}: anchor must be a sequence of {len(params)} tensors aligned with the "
                         "optimizer's parameters (None where the objective does not cover one)")
    out = []
    for i in coverage:
        a = anchor[i]
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"objective {name!r}: anchor for covered parameter {i} must be a tensor, got {type(a).__name__}")
        a = local(full(a)) if is_dtensor(a) else a
        p = local(params[i])
        if tuple(a.shape) != tuple(params[i].shape) and tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"objective {name!r}: anchor for parameter {i} has shape {tuple(a.shape)}, "
                             f"the parameter has shape {tuple(params[i].shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"objective {name!r}: anchor for parameter {i} holds inf or nan")
        if tuple(a.shape) != tuple(p.shape):  # a whole anchor for a sharded parameter: this rank's rows
            start, count = shard_spec(params, [i]).rows(0)
            a = a[start : start + count]
        out.append(a.detach().to(device=p.device, dtype=p.dtype).clone())
    return out


def _penalty_coverage(name: str, config: ObjectiveConfig, params: list[torch.Tensor], anchor: Any, fisher_diagonal: Any) -> tuple[int, ...]:
    """What an objective without samples covers: an EWC penalty alone (L2-SP, or a given Fisher)."""
    if config.ewc <= 0 or (config.fisher == "samples" and fisher_diagonal is None):
        raise ValueError(f"objective {name!r} needs gradient samples, a closure or bases "
                         "(an EWC penalty alone needs ewc > 0 with fisher='identity' or a fisher_diagonal)")
    if config.acts:
        raise ValueError(f"objective {name!r} in mode {config.mode!r} needs gradient samples or a closure; "
                         "an EWC penalty alone takes mode='observe'")
    given = fisher_diagonal if fisher_diagonal is not None else anchor
    if given is None:
        return tuple(i for i, p in enumerate(params) if p.requires_grad)
    if isinstance(given, torch.Tensor) or not isinstance(given, Sequence) or len(given) != len(params):
        raise ValueError(f"objective {name!r}: anchor / fisher_diagonal must be sequences of {len(params)} tensors aligned "
                         "with the optimizer's parameters (None where the objective does not cover one)")
    coverage = tuple(i for i, t in enumerate(given) if t is not None)
    if not coverage:
        raise ValueError(f"objective {name!r}: the anchor / fisher_diagonal covers no parameter")
    return coverage
