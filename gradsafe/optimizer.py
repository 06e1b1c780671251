"""ProtectedOptimizer: a drop-in torch.optim wrapper that protects named objectives.

The facade and the step: refresh what is due (``refresh``), compile the plan
(``registry``), run the backend's surgery, step the base optimizer, book the step
(``recorder``). Objectives, their memory, the report and the state dict each live in their
own module; this one wires them together.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import numpy as np
import torch

from .additive import add_alignment_terms, add_penalty_gradients, has_alignment_terms, has_penalties
from .backends import Backend, StepRecord, get_backend
from .memory import MemoryReport, memory_rows
from .objective import ProtectedObjective
from .options import ObjectiveConfig, config_from, with_overrides
from .plan import Plan
from .recorder import Recorder, Sink
from .refresh import refresh_due
from .registry import Closure, ObjectiveRegistry
from .serialization import (
    StateDictError,
    check_base_groups,
    embed,
    extract,
    gradsafe_state,
    restore_objectives,
    settings_changed,
)
from .sharding import local

__all__ = ["ProtectedOptimizer", "SPACES", "NONFINITE"]

SPACES = ("grad", "update")
NONFINITE = ("pass", "skip", "raise")
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class ProtectedOptimizer(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` so that each step leaves protected objectives alone.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; its ``param_groups``, ``state`` and
            ``defaults`` are shared live (schedulers drive its learning rate).
        protected_grads: name -> gradient sample(s) (sequences of tensors aligned with the
            optimizer's parameters in ``param_groups`` order, ``None`` for a parameter the
            objective does not cover) or a closure returning the protected loss.
        **options: defaults for every objective: the fields of ``ObjectiveConfig`` (mode,
            rank, scope, strength, damping, references, refresh_every, energy, fisher_decay,
            sides, memory_budget; docs/api.md has the table). ``protect`` overrides them
            per objective.
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
        nonfinite: what a step whose gradient holds inf or nan does (seen from the
            coefficients and norms the surgery computes anyway): "pass" (default) leaves the
            surgery out of that step, so the gradient reaches the base optimizer as it came
            and a non-finite entry spreads no further than without gradsafe; "skip" also
            skips the base step; "raise" raises ``FloatingPointError`` before the base step.
            Each such step is counted (``nonfinite_steps``, and in the report) and warned
            about once. A GradScaler step with inf gradients never reaches the wrapper.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        protected_grads: Mapping[str, Any] | None = None,
        *,
        space: str = "grad",
        backend: str | Backend | None = None,
        per_tensor: bool = False,
        fisher_metrics: bool = False,
        auto_check_every: int = 10,
        nonfinite: str = "pass",
        **options: Any,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, ProtectedOptimizer):
            raise TypeError("base_optimizer is already a ProtectedOptimizer; wrap the base optimizer once")
        _check_steps_from_grad(base_optimizer)
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; expected one of {SPACES}")
        if isinstance(auto_check_every, bool) or not isinstance(auto_check_every, int) or auto_check_every < 1:
            raise ValueError(f"auto_check_every must be an int >= 1, got {auto_check_every!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite {nonfinite!r}; expected one of {NONFINITE}")
        self.nonfinite = nonfinite
        self.base_optimizer = base_optimizer
        self.space = space
        self.auto_check_every = auto_check_every
        self.default_config = config_from(options, "ProtectedOptimizer()")
        self.backend_name = backend
        self._backend: Backend = get_backend(backend)
        self._registry = ObjectiveRegistry()
        self._recorder = Recorder(per_tensor=bool(per_tensor), fisher_metrics=bool(fisher_metrics))
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

    @property
    def per_tensor(self) -> bool:
        """Whether the report has per-parameter entries."""
        return self._recorder.per_tensor

    @per_tensor.setter
    def per_tensor(self, value: bool) -> None:
        self._recorder.per_tensor = bool(value)

    @property
    def fisher_metrics(self) -> bool:
        """Whether the report has ``fisher_step``."""
        return self._recorder.fisher_metrics

    @fisher_metrics.setter
    def fisher_metrics(self, value: bool) -> None:
        self._recorder.fisher_metrics = bool(value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        names = ", ".join(f"{o.name}:{o.config.mode}" for o in self._registry) or "none"
        return f"ProtectedOptimizer({self.base_optimizer.__class__.__name__}, space={self.space!r}, objectives=[{names}])"

    def __getstate__(self) -> dict[str, Any]:
        # "step" is the instance patch an LR scheduler installs; like torch's optimizers, a
        # copy does not carry it (it would step the original through a weak reference)
        return {k: v for k, v in self.__dict__.items() if k not in _HOOK_DICTS and k != "step"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # restores the hook dictionaries and the patched step

    # ------------------------------------------------------------------ objectives
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base_optimizer.param_groups for p in group["params"]]

    @property
    def objectives(self) -> Mapping[str, ProtectedObjective]:
        """Read-only mapping name -> ProtectedObjective."""
        return types.MappingProxyType(self._registry.objectives)

    def protect(
        self,
        name: str,
        grads: Any = None,
        *,
        closure: Closure | None = None,
        bases: Any = None,
        anchor: Any = None,
        fisher_diagonal: Any = None,
        **options: Any,
    ) -> ProtectedObjective:
        """Register a protected objective from gradient samples or from a closure.

        ``grads``: one sample (tensors aligned with the parameters, None where not covered)
        or a sequence of samples. ``closure``: returns the protected loss; its gradient is
        computed now, and again every ``refresh_every`` steps if given (``"auto"``: when the
        loss leaves the first-order prediction). ``bases``: factored bases given up front
        (``gradsafe.collect_activation_bases``: GPM's representation bases; the scope is then
        "factored"); with them, samples or a closure are optional and give the references,
        the Fisher and the 1-D tensors' bases. ``anchor`` (EWC's ``theta*``, default: the
        parameters now) and ``fisher_diagonal`` (EWC's ``F``, e.g. from
        ``gradsafe.fisher_diagonal``; default: the mean of the squared samples) are
        sequences aligned with the parameters like a sample; with ``ewc > 0`` and
        ``fisher="identity"`` or a ``fisher_diagonal``, ``mode="observe"`` needs no samples
        (L2-SP, EWC from a precomputed Fisher). ``options``: fields of ``ObjectiveConfig``;
        unset (or None) ones take the wrapper's defaults.
        """
        if not isinstance(name, str):
            raise TypeError(f"objective name must be a string, got {type(name).__name__}")
        if not name:
            raise ValueError("objective name must not be empty")
        if name in self._registry.objectives:
            raise ValueError(f"an objective named {name!r} is already protected; unprotect it first")
        if grads is not None and closure is not None:
            raise ValueError(f"give either grads or closure for {name!r}, not both")
        if closure is not None and not callable(closure):
            raise TypeError(f"closure for {name!r} must be callable")
        if bases is not None:
            scope = options.get("scope")
            if scope not in (None, "factored"):
                raise ValueError(f"bases are factored (left/right per weight); objective {name!r} asked for scope {scope!r}")
            options = {**options, "scope": "factored"}
        config = with_overrides(self.default_config, options, "protect()")
        return self._registry.register(
            name, config, self._params(), self.gradsafe_steps, grads=grads, closure=closure, bases=bases,
            anchor=anchor, fisher_diagonal=fisher_diagonal,
        )

    def unprotect(self, name: str) -> ProtectedObjective:
        """Remove an objective; its memory is returned."""
        return self._registry.remove(name)

    def add_samples(self, name: str, grads: Any) -> None:
        """Merge new gradient samples into an objective's memory (basis union, online Fisher)."""
        self._registry.add_samples(name, grads, self._params())

    def consolidate(self, name: str, grads: Any) -> None:
        """Online EWC (Schwarz et al. 2018): consolidate a new task into objective ``name``.

        ``grads``: the new task's gradient samples (as for ``add_samples``). The objective's
        Fisher becomes ``ewc_gamma F_old + F_new`` (``F_new``: the mean of the new samples'
        squares), its anchor moves to the current parameters, and the samples join its
        basis and references. The objective needs ``ewc > 0``.
        """
        self._registry.consolidate(name, grads, self._params())

    def attach_closure(self, name: str, closure: Closure) -> None:
        """Give an objective (e.g. one restored by ``load_state_dict``) its closure back."""
        if not callable(closure):
            raise TypeError(f"closure for {name!r} must be callable")
        self._registry.get(name).closure = closure

    # ------------------------------------------------------------------ the step
    @property
    def _plan(self) -> Plan | None:
        """The plan of the last step (None until a step, and after any change)."""
        return self._registry.plan

    def _current_plan(self, params: list[torch.Tensor], active: frozenset[int] | None = None) -> Plan:
        return self._registry.current_plan(params, active)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (under grad) if given, then the surgery, then the base step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._registry.objectives:
            self._recorder.clear()
            self.base_optimizer.step()
            return loss
        done = self._surgery(step_base=True)
        if done is not None:  # None: a non-finite step skipped (nonfinite="skip")
            self._record(*done)
        return loss

    @torch.compiler.disable
    def _refresh(self, params: list[torch.Tensor]) -> None:
        if refresh_due(self._registry, params, self.gradsafe_steps, self.auto_check_every,
                       fisher_read=self._recorder.fisher_metrics):
            self._registry.invalidate()

    @torch.compiler.disable
    def _record(self, plan: Plan, record: StepRecord, tensors: list[torch.Tensor] | None) -> None:
        """Book a finished step: the report's source, the counters, closures' predictions, sinks.

        Host-side bookkeeping, never traced by torch.compile.
        """
        objectives = self._registry.objectives
        self._recorder.count_nonfinite(record, plan, self.gradsafe_steps + 1, self.nonfinite)
        if self._recorder.book(plan, record, tensors, self._step_scale(plan), objectives, self.space == "grad"):
            self.gradsafe_steps += 1
            self._recorder.emit(self.gradsafe_steps, objectives)

    def _surgery(self, step_base: bool) -> tuple[Plan, StepRecord, list[torch.Tensor] | None] | None:
        """Refresh what is due, run the surgery, and (if ``step_base``) the base step.

        None when the step was skipped for a non-finite gradient (``nonfinite="skip"``).
        """
        params = self._params()
        self._refresh(params)
        # parameters without a gradient are not stepped by the base optimizer: leave them
        # out of the surgery too (in both spaces)
        active = frozenset(i for i, p in enumerate(params) if p.grad is not None)
        objectives = list(self._registry.objectives.values())
        # EWC: the penalty's gradient joins the gradient before any surgery (both spaces)
        penalties = add_penalty_gradients(objectives, params, active) if has_penalties(objectives) else {}
        self._recorder.note_penalties(penalties)
        align = has_alignment_terms(objectives)
        plan = self._registry.current_plan(params, active)
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
            if align:  # SafeGrad's rho r, after the surgery
                add_alignment_terms(objectives, params, active)
            if step_base:
                if self.nonfinite != "pass" and not record.is_finite():
                    bad = self._recorder.count_nonfinite(record, plan, self.gradsafe_steps + 1, self.nonfinite)
                    return self._stop_nonfinite(bad)
                self.base_optimizer.step()
        else:
            if self.nonfinite != "pass" and grads:
                # the base step comes first in this space: look at the gradients before it
                hh = torch.stack([g.detach().float().norm() for g in grads]).double().cpu().numpy() ** 2
                if not np.isfinite(hh).all():
                    bad = self._recorder.note_nonfinite(hh, plan, self.gradsafe_steps + 1, self.nonfinite)
                    return self._stop_nonfinite(bad)
            if align:  # in this space rho r joins the gradient the base step reads
                add_alignment_terms(objectives, params, active)
            before = self._snapshot(plan, covered)
            self.base_optimizer.step()
            if self._subtracts(plan, covered):
                # the surgery's change to u = theta_before - theta_after is subtracted from the
                # parameters: theta_before - u' = theta_after - (u' - u). Two passes fewer than
                # holding u in the parameters, and no write when the rule leaves u as it is. u
                # overwrites the snapshot, unless the report reads the update made (fisher_step)
                after = [p.detach() for p in covered]
                if self._recorder.fisher_metrics:
                    tensors = torch._foreach_sub(before, after)
                    record = self._backend.run(plan, tensors, subtract_from=after)
                    for u, b, p in zip(tensors, before, after):
                        torch.sub(b, p, out=u)
                    return plan, record, tensors
                torch._foreach_sub_(before, after)
                return plan, self._backend.run(plan, before, subtract_from=after), None
            # the surgery acts on u = theta_before - theta_after, the "gradient-like" direction,
            # in the parameter's own precision (float32 for lower-precision parameters).
            # A float32 / float64 parameter holds u itself while the surgery runs (no buffer,
            # one pass less), unless the report reads u afterwards (fisher_step)
            in_place = not self._recorder.fisher_metrics
            tensors = []
            for b, p in zip(before, covered):
                w = _work_dtype(p.dtype)
                if in_place and w == p.dtype:
                    tensors.append(torch.sub(b, p.detach(), out=p.detach()))
                else:
                    tensors.append(b.to(w) - p.detach().to(w))
            try:
                record = self._backend.run(plan, tensors)
            except BaseException:  # a parameter may hold u: give it back theta_before, not garbage
                if in_place:
                    for p, b in zip(covered, before):
                        p.detach().copy_(b)
                raise
            for p, b, u in zip(covered, before, tensors):
                if u.dtype == p.dtype:  # theta_before - u', written straight into the parameter
                    torch.sub(b, u, out=p.detach())
                else:
                    p.copy_(b.to(u.dtype) - u)
            if in_place:
                tensors = None  # they are the parameters now; nothing reads them (no fisher_step)
        return plan, record, tensors

    def _subtracts(self, plan: Plan, covered: list[torch.Tensor]) -> bool:
        """Whether space "update" can hand the backend ``u`` and the parameters apart
        (``TorchBackend.run``'s ``subtract_from``): the backend takes it for this plan and every
        covered parameter is contiguous float32 or float64."""
        can = getattr(self._backend, "can_subtract", None)
        return (
            can is not None
            and all(p.dtype in (torch.float32, torch.float64) and p.is_contiguous() for p in covered)
            and can(plan)
        )

    @torch.compiler.disable
    def _snapshot(self, plan: Plan, covered: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of the covered parameters (space "update"); on the CPU in buffers kept with the plan.

        On the CPU the buffers live as long as the plan (allocated every step, they cost a
        page fault per 4 KiB as well as the copy). On an accelerator they are allocated every
        step: the caching allocator makes that cheap, and the memory is free for the
        activations between steps."""
        if any(p.device.type != "cpu" for p in covered):
            return [p.detach().clone(memory_format=torch.preserve_format) for p in covered]
        buffers = plan.cache.get(("structure", "snapshot"))
        if buffers is None or len(buffers) != len(covered) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(buffers, covered)
        ):
            buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in covered]
            plan.cache[("structure", "snapshot")] = buffers
        torch._foreach_copy_(buffers, [p.detach() for p in covered])
        return buffers

    @torch.compiler.disable
    def _stop_nonfinite(self, bad: list[int]) -> None:
        """``nonfinite="skip"`` / ``"raise"`` on a counted non-finite step (``bad``: its
        parameters with a non-finite gradient): skip it, or raise."""
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"gradsafe: the gradient of parameter(s) {bad or '(a sum overflowed)'} is not finite at step "
                f"{self.gradsafe_steps + 1}; nothing was stepped (nonfinite='raise')"
            )
        return None

    @property
    def nonfinite_steps(self) -> int:
        """How many steps had a non-finite gradient (a device read with the Triton backend)."""
        return self._recorder.nonfinite_count()

    def _step_scale(self, plan: Plan) -> np.ndarray:
        """Per plan position, delta theta = -scale * x: the group's lr in space "grad", else 1."""
        if self.space == "update":
            return np.ones(plan.num_tensors)
        lrs = [float(g["lr"]) if "lr" in g else 1.0 for g in self.base_optimizer.param_groups for _ in g["params"]]
        return np.array([lrs[i] for i in plan.param_indices])

    # ------------------------------------------------------------------ report
    @property
    def report(self) -> dict[str, dict[str, float]]:
        """The last real step, per objective, as floats (docs/monitor.md has the formulas).

        cosine, conflict, energy_in_subspace, energy_removed, predicted_change, grad_norm;
        staleness for closure objectives once measured; fisher_step with ``fisher_metrics``;
        per-parameter entries ``"<stat>/<parameter index>"`` with ``per_tensor``.
        """
        return self._recorder.report(self._registry.objectives)

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The report as scalar tensors with stable keys ``gradsafe/<objective>/<stat>``.

        Unchanged by a skipped step (a GradScaler step with inf gradients never reaches the
        wrapper). With the torch backend the numbers are computed on the host, so these are
        CPU tensors.
        """
        flat = self._recorder.flat_metrics(self._registry.objectives)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in flat.items()}

    def add_sink(self, sink: Sink, every: int = 1) -> None:
        """Call ``sink(step, metrics)`` (floats keyed ``gradsafe/<objective>/<stat>``) every N steps."""
        self._recorder.add_sink(sink, every)

    def remove_sink(self, sink: Sink) -> None:
        self._recorder.remove_sink(sink)

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
        for obj in self._registry:
            rows += memory_rows(
                obj.name, obj.layout, obj.config, obj.memory,
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
        return gradsafe_state(self._registry.snapshot(), self.gradsafe_steps, self.space, self.default_config)

    def load_gradsafe_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore what ``gradsafe_state_dict`` returned; the base optimizer is left alone.

        Objectives are replaced by the saved ones; a closure registered on this wrapper under
        the same name is kept (closures cannot be saved). The saved state is validated first
        (``StateDictError``, a ``ValueError`` naming the objective and the field); on an
        error nothing changes. The saved space and objective defaults replace this wrapper's
        (exact resume), with a ``UserWarning`` when they differ.
        """
        self._commit(restore_objectives(saved, self._params(), self._registry.objectives, SPACES))

    def _commit(self, restored: tuple[dict[str, ProtectedObjective], int, str, ObjectiveConfig]) -> None:
        """Make a validated, restored state the wrapper's (warning when its settings differ)."""
        objectives, steps, space, defaults = restored
        changed = settings_changed(self.space, self.default_config, space, defaults)
        self._registry.replace_all(objectives)
        self.gradsafe_steps = steps
        self.space = space
        self.default_config = defaults
        self._recorder.clear()
        if changed is not None:
            warnings.warn(changed, UserWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = embed(self.base_optimizer.state_dict(), self.gradsafe_state_dict())
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict: the base optimizer's part and gradsafe's (``"gradsafe"``).

        Atomic: gradsafe's part is validated and built first (``StateDictError`` naming the
        objective and the field), then the base optimizer's state is loaded; if that raises,
        or leaves a param group without one of the base optimizer's hyperparameters (a state
        saved by another optimizer class), the base optimizer's previous state is put back
        and one ``StateDictError`` is raised (torch's exception as its ``__cause__``).
        Nothing is changed by a load that raises.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_state, saved = extract(state_dict)
        restored = None
        if saved is not None:
            restored = restore_objectives(saved, self._params(), self._registry.objectives, SPACES)
        base = self.base_optimizer
        check_base_groups(base, base_state)
        # torch's load replaces the state (it writes into no tensor of it), so a shallow
        # snapshot is enough to put the previous state back
        before = base.state_dict()
        try:
            base.load_state_dict(base_state)
        except Exception as e:
            base.load_state_dict(before)
            raise StateDictError(
                f"the saved optimizer state does not match the base optimizer {type(base).__name__}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if restored is not None:
            self._commit(restored)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _check_steps_from_grad(base: torch.optim.Optimizer) -> None:
    """Refuse a base optimizer whose ``step`` requires a closure (LBFGS and the like).

    Such an optimizer re-evaluates the loss and its gradient several times inside one step;
    the surgery acts on the gradient in ``.grad`` once, before the step, and cannot act
    inside it.
    """
    try:
        closure = inspect.signature(base.step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin or C-implemented step: nothing to inspect
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{type(base).__name__}.step requires a closure (it re-evaluates the loss several times per step), "
            "and gradsafe's surgery cannot act inside such a step: use an optimizer that steps from .grad "
            "(SGD, Adam, AdamW, ...)"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the update-space surgery works in: the parameter's own, float32 at least."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_grad(g: torch.Tensor, index: int) -> torch.Tensor:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"parameter {index} has a sparse gradient; gradsafe supports dense gradients only")
    if g.is_complex():
        raise TypeError(f"parameter {index} has a complex gradient; gradsafe supports real gradients only")
    return g


def _has_broadcast_strides(g: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(g.stride(), g.shape))
