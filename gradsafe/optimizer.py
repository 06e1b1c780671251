"""ProtectedOptimizer: a drop-in torch.optim wrapper that protects named objectives."""

from __future__ import annotations

import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

import numpy as np
import torch

from .activations import ActivationBases
from .backends import Backend, StepRecord, get_backend
from .factored import FactorMemory, matrix_shape
from .factored import from_bases as factor_from_bases
from .objective import ObjectiveConfig, ProtectedObjective, normalize_samples, pack_samples
from .memory import MemoryReport, memory_rows
from .plan import Plan, build_plan
from .refresh import STALE, closure_gradient, closure_loss, is_due, staleness
from .report import step_report
from .sharding import local, shard_spec

Sink = Callable[[int, dict[str, float]], None]

__all__ = ["ProtectedOptimizer", "SPACES"]

SPACES = ("grad", "update")
_STATE_VERSION = 1
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)

Closure = Callable[[], torch.Tensor]


class ProtectedOptimizer(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` so that each step leaves protected objectives alone.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; its ``param_groups``, ``state`` and
            ``defaults`` are shared live (schedulers drive its learning rate).
        protected_grads: name -> gradient sample(s) (sequences of tensors aligned with the
            optimizer's parameters in ``param_groups`` order, ``None`` for a parameter the
            objective does not cover) or a closure returning the protected loss.
        mode, rank, scope, strength, damping, references, refresh_every, energy, fisher_decay,
        sides, memory_budget: defaults for every objective (see ``protect`` and
            ``ObjectiveConfig``); scope "factored" keeps left/right bases per weight matrix,
            ``sides`` which of them, ``memory_budget`` bytes (int) or a fraction of the
            covered parameters' bytes (float) that the objective's memory must fit.
        space: "grad" (change ``p.grad`` before the base step) or "update" (let the base step
            run, then change the parameter update it made).
        backend: "torch", "triton", "auto", a backend object (e.g. ``TritonBackend(basis_dtype=
            torch.bfloat16)``), or None: the ``GRADSAFE_BACKEND`` environment variable, else
            "auto" (Triton for CUDA tensors when triton imports, torch otherwise).
        per_tensor: also report cosine, energy removed and predicted change per parameter.
        fisher_metrics: also report ``fisher_step = sum F (delta theta)^2`` per objective (an
            extra pass over the covered gradients).
        auto_check_every: with ``refresh_every="auto"``, measure the protected loss every
            this many steps and refresh when its change left the first-order prediction.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        protected_grads: Mapping[str, Any] | None = None,
        *,
        mode: str = "project",
        rank: int = 16,
        scope: str = "global",
        space: str = "grad",
        damping: float = 0.0,
        refresh_every: int | str | None = None,
        backend: str | None = None,
        strength: float = 1.0,
        references: str = "mean",
        energy: float = 1.0,
        fisher_decay: float = 0.5,
        sides: str = "both",
        memory_budget: int | float | None = None,
        per_tensor: bool = False,
        fisher_metrics: bool = False,
        auto_check_every: int = 10,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, ProtectedOptimizer):
            raise TypeError("base_optimizer is already a ProtectedOptimizer; wrap the base optimizer once")
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; expected one of {SPACES}")
        if isinstance(auto_check_every, bool) or not isinstance(auto_check_every, int) or auto_check_every < 1:
            raise ValueError(f"auto_check_every must be an int >= 1, got {auto_check_every!r}")
        self.base_optimizer = base_optimizer
        self.space = space
        self.per_tensor = bool(per_tensor)
        self.fisher_metrics = bool(fisher_metrics)
        self.auto_check_every = auto_check_every
        self.default_config = ObjectiveConfig(
            mode=mode,
            rank=rank,
            scope=scope,
            strength=strength,
            damping=damping,
            references=references,
            refresh_every=refresh_every,
            energy=energy,
            fisher_decay=fisher_decay,
            sides=sides,
            memory_budget=memory_budget,
        )
        self.backend_name = backend
        self._backend: Backend = get_backend(backend)
        self._objectives: dict[str, ProtectedObjective] = {}
        self._plan: Plan | None = None
        self._plan_params: list[torch.Tensor] = []
        self._last: _LastStep | None = None
        self._report_cache: dict[str, dict[str, float]] | None = None
        self._sinks: list[tuple[Sink, int]] = []
        self.gradsafe_steps = 0
        # What Optimizer.__init__ would set up, without touching the base's param_groups.
        for attr in _HOOK_DICTS:
            setattr(self, attr, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        if protected_grads is not None:
            if not isinstance(protected_grads, Mapping):
                raise TypeError(f"protected_grads must be a mapping name -> samples, got {type(protected_grads).__name__}")
            for name, value in protected_grads.items():
                if callable(value):
                    self.protect(name, closure=value)
                else:
                    self.protect(name, value)

    # ------------------------------------------------------------------ live delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        names = ", ".join(f"{n}:{o.config.mode}" for n, o in self._objectives.items()) or "none"
        return f"ProtectedOptimizer({self.base_optimizer.__class__.__name__}, space={self.space!r}, objectives=[{names}])"

    def __getstate__(self) -> dict[str, Any]:
        # "step" is the instance patch an LR scheduler installs; like torch's optimizers, a
        # copy does not carry it (it would step the original through a weak reference)
        state = {k: v for k, v in self.__dict__.items() if k not in _HOOK_DICTS and k != "step"}
        state["_plan"] = None
        state["_plan_params"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # restores the hook dictionaries and the patched step

    # ------------------------------------------------------------------ objectives
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base_optimizer.param_groups for p in group["params"]]

    @property
    def objectives(self) -> Mapping[str, ProtectedObjective]:
        """Read-only mapping name -> ProtectedObjective."""
        return types.MappingProxyType(self._objectives)

    def protect(
        self,
        name: str,
        grads: Any = None,
        *,
        closure: Closure | None = None,
        bases: "ActivationBases | None" = None,
        mode: str | None = None,
        rank: int | None = None,
        scope: str | None = None,
        strength: float | None = None,
        damping: float | None = None,
        references: str | None = None,
        refresh_every: int | str | None = None,
        energy: float | None = None,
        fisher_decay: float | None = None,
        sides: str | None = None,
        memory_budget: int | float | None = None,
    ) -> ProtectedObjective:
        """Register a protected objective from gradient samples or from a closure.

        ``grads``: one sample (tensors aligned with the parameters, None where not covered)
        or a sequence of samples. ``closure``: returns the protected loss; its gradient is
        computed now, and again every ``refresh_every`` steps if given (``"auto"``: when the
        loss leaves the first-order prediction). ``bases``: factored bases given up front
        (``gradsafe.collect_activation_bases``: GPM's representation bases; the scope is then
        "factored"); with them, samples or a closure are optional and give the references,
        the Fisher and the 1-D tensors' bases. Unset options take the wrapper's defaults.
        """
        if not isinstance(name, str):
            raise TypeError(f"objective name must be a string, got {type(name).__name__}")
        if not name:
            raise ValueError("objective name must not be empty")
        if name in self._objectives:
            raise ValueError(f"an objective named {name!r} is already protected; unprotect it first")
        if grads is not None and closure is not None:
            raise ValueError(f"give either grads or closure for {name!r}, not both")
        if grads is None and closure is None and bases is None:
            raise ValueError(f"objective {name!r} needs gradient samples, a closure or bases")
        if closure is not None and not callable(closure):
            raise TypeError(f"closure for {name!r} must be callable")
        overrides = {
            k: v
            for k, v in dict(
                mode=mode,
                rank=rank,
                scope=scope,
                strength=strength,
                damping=damping,
                references=references,
                refresh_every=refresh_every,
                energy=energy,
                fisher_decay=fisher_decay,
                sides=sides,
                memory_budget=memory_budget,
            ).items()
            if v is not None
        }
        if bases is not None:
            if overrides.get("scope", "factored") != "factored":
                raise ValueError(f"bases are factored (left/right per weight); objective {name!r} asked for scope {scope!r}")
            overrides["scope"] = "factored"
        config = replace(self.default_config, **overrides)
        params = self._params()
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
            if config.mode == "conflict" and samples is None:
                raise ValueError(f"objective {name!r} in mode 'conflict' needs gradient samples or a closure (its reference)")
            given = _bases_by_index(bases, params, name)
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
        obj.last_refresh_step = obj.last_check_step = self.gradsafe_steps
        obj.loss_at_refresh = loss
        self._objectives[name] = obj
        self._invalidate()
        return obj

    def unprotect(self, name: str) -> ProtectedObjective:
        """Remove an objective; its memory is returned."""
        if name not in self._objectives:
            raise KeyError(f"no protected objective named {name!r}; known: {sorted(self._objectives)}")
        obj = self._objectives.pop(name)
        self._invalidate()
        return obj

    def add_samples(self, name: str, grads: Any) -> None:
        """Merge new gradient samples into an objective's memory (basis union, online Fisher)."""
        obj = self._get(name)
        samples = normalize_samples(grads, name)
        _, S = pack_samples(samples, self._params(), name, coverage=obj.coverage)
        obj.add_samples(S)
        self._invalidate()

    def attach_closure(self, name: str, closure: Closure) -> None:
        """Give an objective (e.g. one restored by ``load_state_dict``) its closure back."""
        if not callable(closure):
            raise TypeError(f"closure for {name!r} must be callable")
        self._get(name).closure = closure

    def _get(self, name: str) -> ProtectedObjective:
        try:
            return self._objectives[name]
        except KeyError:
            raise KeyError(f"no protected objective named {name!r}; known: {sorted(self._objectives)}") from None

    def _invalidate(self) -> None:
        self._plan = None

    @torch.compiler.disable
    def _refresh_due_objectives(self, params: list[torch.Tensor]) -> None:
        step = self.gradsafe_steps
        for name, obj in self._objectives.items():
            due = is_due(obj.config.refresh_every, step, obj.last_refresh_step, obj.last_check_step, self.auto_check_every)
            if due is None or (obj.closure is None and not obj.had_closure):
                continue  # sample-based memory: nothing to recompute
            if obj.closure is None:
                raise RuntimeError(
                    f"objective {name!r} is due for a refresh but has no closure (closures are not "
                    f"saved in state dicts): call opt.attach_closure({name!r}, fn) after loading"
                )
            if due == "check":
                obj.last_check_step = step
                with torch.no_grad():
                    loss = float(closure_loss(name, obj.closure).detach())
                self._measure_staleness(obj, loss)
                if obj.staleness is None or obj.staleness <= STALE:
                    continue
            loss, fresh = closure_gradient(name, obj.closure, params)
            self._measure_staleness(obj, loss)
            # the memory's layout is fixed at registration: keep covered entries (0 where the
            # loss no longer reaches one), drop parameters the loss reaches only now
            covered = set(obj.coverage)
            sample = [
                (fresh[i] if fresh[i] is not None else torch.zeros_like(params[i])) if i in covered else None
                for i in range(len(params))
            ]
            _, S = pack_samples([sample], params, name, coverage=obj.coverage, allow_zero=True)
            obj.last_refresh_step = obj.last_check_step = step
            obj.loss_at_refresh = loss
            obj.predicted_since_refresh = 0.0
            if not bool(S.any()):
                warnings.warn(
                    f"the protected gradient of {name!r} is exactly zero at step {step}; keeping the previous memory",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            obj.refresh(S)
            self._invalidate()

    @staticmethod
    def _measure_staleness(obj: ProtectedObjective, loss: float) -> None:
        if obj.loss_at_refresh is not None:
            obj.staleness = staleness(loss - obj.loss_at_refresh, obj.predicted_since_refresh, obj.loss_at_refresh)

    # ------------------------------------------------------------------ the step
    def _current_plan(self, params: list[torch.Tensor], active: frozenset[int] | None = None) -> Plan:
        objs = list(self._objectives.values())
        if active is None:
            active = frozenset(range(len(params)))
        plan = self._plan
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
            plan = self._build_plan(objs, params, active)
        return plan

    @torch.compiler.disable
    def _build_plan(self, objs: list[ProtectedObjective], params: list[torch.Tensor], active: frozenset[int]) -> Plan:
        # host-side bookkeeping (numpy, Python containers): never traced by torch.compile
        plan = build_plan(objs, params, active)
        self._plan, self._plan_params = plan, list(params)
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (under grad) if given, then the surgery, then the base step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._objectives:
            self._last = None
            self._report_cache = None
            self.base_optimizer.step()
            return loss
        plan, record, tensors = self._surgery(step_base=True)
        self._record(plan, record, tensors)
        return loss

    @torch.compiler.disable
    def _record(self, plan: Plan, record: StepRecord, tensors: list[torch.Tensor] | None) -> None:
        """Book a finished step: its report source, the counters, closures' predictions, sinks.

        Host-side bookkeeping, never traced by torch.compile. A step whose covered gradients
        were all exactly zero (the fake step with which torch.distributed.checkpoint
        materialises state) is not booked.
        """
        if isinstance(record.coefs, np.ndarray) and not record.coefs[plan.norms_offset :].any():
            return
        step_scale = self._step_scale(plan)
        fisher_step = self._fisher_step(plan, tensors, step_scale) if tensors is not None else {}
        self._last = _LastStep(plan, record, step_scale, fisher_step)
        self._report_cache = None
        self.gradsafe_steps += 1
        if any(o.had_closure for o in self._objectives.values()):
            for name, stats in self.report.items():
                obj = self._objectives.get(name)
                if obj is not None and obj.had_closure:
                    obj.predicted_since_refresh += stats["predicted_change"]
        if self._sinks:
            flat = self._flat_metrics()
            for sink, every in self._sinks:
                if self.gradsafe_steps % every == 0:
                    sink(self.gradsafe_steps, flat)

    def _surgery(self, step_base: bool) -> tuple[Plan, StepRecord, list[torch.Tensor]]:
        """Refresh what is due, run the surgery, and (if ``step_base``) the base step."""
        params = self._params()
        self._refresh_due_objectives(params)
        # parameters without a gradient are not stepped by the base optimizer: leave them
        # out of the surgery too (in both spaces)
        active = frozenset(i for i, p in enumerate(params) if p.grad is not None)
        plan = self._current_plan(params, active)
        covered = [params[i] for i in plan.param_indices]
        for i, p in zip(plan.param_indices, covered):
            _check_grad(p.grad, i)
            if self.space == "grad" and _has_broadcast_strides(p.grad):
                # an expanded gradient (set by hand; autograd never makes one) cannot be
                # changed in place: give the parameter its own copy first
                p.grad = p.grad.contiguous()
        grads = [p.grad for p in covered]
        if plan.shard is not None:  # FSDP2: work on each rank's shards (views of the DTensors)
            covered, grads = [local(p) for p in covered], [local(g) for g in grads]
        if self.space == "grad" or not step_base:
            tensors = grads
            record = self._backend.run(plan, tensors)
            if step_base:
                self.base_optimizer.step()
        else:
            before = [p.detach().clone() for p in covered]
            self.base_optimizer.step()
            # the surgery acts on u = theta_before - theta_after, the "gradient-like" direction
            tensors = [b.to(torch.float32) - p.detach().to(torch.float32) for b, p in zip(before, covered)]
            record = self._backend.run(plan, tensors)
            for p, b, u in zip(covered, before, tensors):
                p.copy_(b.to(torch.float32) - u)
        return plan, record, tensors

    def _step_scale(self, plan: Plan) -> np.ndarray:
        """Per plan position, delta theta = -scale * x: the group's lr in space "grad", else 1."""
        if self.space == "update":
            return np.ones(plan.num_tensors)
        lrs = [float(g["lr"]) if "lr" in g else 1.0 for g in self.base_optimizer.param_groups for _ in g["params"]]
        return np.array([lrs[i] for i in plan.param_indices])

    def _fisher_step(self, plan: Plan, tensors: list[torch.Tensor], scale: np.ndarray) -> dict[str, torch.Tensor]:
        """``sum F (delta theta)^2`` per objective, on the device (only with ``fisher_metrics``)."""
        if not self.fisher_metrics:
            return {}
        out = {}
        for b in plan.blocks:
            obj = b.objective
            if obj.fisher is None:  # factored objectives without damping keep no Fisher
                continue
            cols = obj.memory_slices()
            parts = [
                (obj.fisher[cols[obj.coverage.index(plan.param_indices[p])]] * tensors[p].detach().reshape(-1).float().square()).sum()
                * float(scale[p]) ** 2
                for p in b.positions
            ]
            total = torch.stack(parts).sum()
            out[obj.name] = out[obj.name] + total if obj.name in out else total
        return out

    @property
    def report(self) -> dict[str, dict[str, float]]:
        """The last real step, per objective, as floats (docs/monitor.md has the formulas).

        cosine, conflict, energy_in_subspace, energy_removed, predicted_change, grad_norm;
        staleness for closure objectives once measured; fisher_step with ``fisher_metrics``;
        per-parameter entries ``"<stat>/<parameter index>"`` with ``per_tensor``.
        """
        if self._last is None:
            return {}
        if self._report_cache is None:
            last = self._last
            coefs, weights = last.record.host()
            report = step_report(last.plan, coefs, weights, last.step_scale, per_tensor=self.per_tensor)
            for name, stats in report.items():
                obj = self._objectives.get(name)
                if obj is not None and obj.staleness is not None:
                    stats["staleness"] = float(obj.staleness)
                if name in last.fisher_step:
                    stats["fisher_step"] = float(last.fisher_step[name])
            self._report_cache = report
        return self._report_cache

    def _flat_metrics(self) -> dict[str, float]:
        return {f"gradsafe/{name}/{stat}": v for name, stats in self.report.items() for stat, v in stats.items()}

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The report as scalar tensors with stable keys ``gradsafe/<objective>/<stat>``.

        Unchanged by a skipped step (a GradScaler step with inf gradients never reaches the
        wrapper). With the torch backend the numbers are computed on the host, so these are
        CPU tensors.
        """
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self._flat_metrics().items()}

    def add_sink(self, sink: Sink, every: int = 1) -> None:
        """Call ``sink(step, metrics)`` (floats keyed ``gradsafe/<objective>/<stat>``) every N steps."""
        if not callable(sink):
            raise TypeError("sink must be callable as sink(step, metrics)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self._sinks.append((sink, every))

    def remove_sink(self, sink: Sink) -> None:
        self._sinks = [(s, e) for s, e in self._sinks if s is not sink]

    def memory_report(
        self,
        model: torch.nn.Module | None = None,
        *,
        names: list[str] | None = None,
        file: TextIO | None = None,
        quiet: bool = False,
    ) -> MemoryReport:
        """Bytes of every objective's memory (bases, references, Fisher) per covered parameter.

        Printed as a table to ``file`` (default: standard output) unless ``quiet``; returned
        either way. Parameters are named by ``model.named_parameters()``, or by ``names``
        (aligned with the optimizer's parameters), else ``param <index>``. Sharded (FSDP2)
        memory and parameters count this rank's part.
        """
        params = self._params()
        if names is not None:
            if len(names) != len(params):
                raise ValueError(f"names has {len(names)} entries; the optimizer has {len(params)} parameters")
            names = {id(p): n for n, p in zip(names, params)}
        else:
            names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        rows = []
        for obj in self._objectives.values():
            rows += memory_rows(
                obj,
                [names.get(id(params[i]), f"param {i}") for i in obj.coverage],
                [params[i].element_size() for i in obj.coverage],
            )
        # sharded parameters (FSDP2) count this rank's shard, as the memory does
        report = MemoryReport(rows, sum(local(p).numel() * p.element_size() for p in params))
        if not quiet:
            print(report, file=file if file is not None else sys.stdout)
        return report

    # ------------------------------------------------------------------ state
    def gradsafe_state_dict(self) -> dict[str, Any]:
        """gradsafe's own state alone: every objective's memory and configuration, counters.

        Tensors and plain values only. ``state_dict()`` holds it under the key
        ``"gradsafe"`` (at the top level, and in the first param group for checkpointers that
        keep only ``state`` and ``param_groups``, as ``torch.distributed.checkpoint`` does).
        """
        return {
            "version": _STATE_VERSION,
            "steps": self.gradsafe_steps,
            "space": self.space,
            "defaults": asdict(self.default_config),
            "objectives": {name: obj.state_dict() for name, obj in self._objectives.items()},
        }

    def load_gradsafe_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore what ``gradsafe_state_dict`` returned; the base optimizer is left alone.

        Objectives are replaced by the saved ones; a closure registered on this wrapper under
        the same name is kept (closures cannot be saved).
        """
        if saved.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported gradsafe state version {saved.get('version')!r}")
        params = self._params()
        objectives = {}
        for name, obj_state in saved["objectives"].items():
            cov = obj_state["coverage"]
            device = params[cov[0]].device if cov and cov[0] < len(params) else None
            obj = ProtectedObjective.from_state_dict(name, obj_state, device=device, shard=shard_spec(params, cov))
            if name in self._objectives and self._objectives[name].closure is not None:
                obj.closure = self._objectives[name].closure
            objectives[name] = obj
        self._objectives = objectives
        self.gradsafe_steps = int(saved["steps"])
        self.space = saved["space"]
        self.default_config = ObjectiveConfig(**saved["defaults"])
        self._last = None
        self._report_cache = None
        self._invalidate()

    def state_dict(self) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.base_optimizer.state_dict()
        memory = self.gradsafe_state_dict()
        # Top level for torch.save / Trainer / Lightning; and (the same object, saved once by
        # pickle) in the first param group, the one place torch.distributed.checkpoint's
        # get/set_optimizer_state_dict keep besides per-parameter state.
        state["gradsafe"] = memory
        if state["param_groups"]:
            state["param_groups"][0]["gradsafe"] = memory
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        saved = state_dict.pop("gradsafe", None)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        for group in groups:
            in_group = group.pop("gradsafe", None)
            # A copy that reached us only through the param groups (DCP) and holds no
            # objective is most likely DCP's load template of a wrapper without objectives:
            # it must not wipe memory restored separately (GradsafeMemory).
            if saved is None and in_group is not None and in_group.get("objectives"):
                saved = in_group
        if groups:
            state_dict["param_groups"] = groups
        self.base_optimizer.load_state_dict(state_dict)
        if saved is not None:
            self.load_gradsafe_state_dict(saved)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _bases_by_index(bases: Any, params: list[torch.Tensor], name: str) -> dict[int, FactorMemory]:
    """Map ``ActivationBases`` (parameter -> basis) onto the optimizer's parameter indices."""
    if not isinstance(bases, ActivationBases):
        raise TypeError(f"bases for {name!r} must be an ActivationBases (gradsafe.collect_activation_bases), got {type(bases).__name__}")
    index = {id(p): i for i, p in enumerate(params)}
    out = {}
    for p in bases:
        if id(p) not in index:
            raise ValueError(f"bases for {name!r} include {bases.names[id(p)]}, which is not among the optimizer's parameters")
        b = bases[p]
        shape = matrix_shape(p.shape)
        left = b.rows if b.side == "left" else None
        right = b.rows if b.side == "right" else None
        le = b.energies if b.side == "left" else None
        re = b.energies if b.side == "right" else None
        out[index[id(p)]] = factor_from_bases(shape, left, le, right, re, None, p.device)
    if not out:
        raise ValueError(f"bases for {name!r} are empty")
    return out


def _check_grad(g: torch.Tensor, index: int) -> torch.Tensor:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"parameter {index} has a sparse gradient; gradsafe supports dense gradients only")
    if g.is_complex():
        raise TypeError(f"parameter {index} has a complex gradient; gradsafe supports real gradients only")
    return g


def _has_broadcast_strides(g: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(g.stride(), g.shape))


@dataclass
class _LastStep:
    """What the report of the last step is computed from."""

    plan: Plan
    record: StepRecord
    step_scale: np.ndarray
    fisher_step: dict[str, torch.Tensor]
