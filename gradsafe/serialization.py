"""gradsafe's part of an optimizer state dict: every objective's memory and options, counters.

Tensors and plain values only (``torch.load(weights_only=True)`` loads it). The state dict
holds it under ``"gradsafe"`` at the top level (``torch.save``, Trainer, Lightning) and, as
the same object, in the first param group: the one place besides per-parameter state that
``torch.distributed.checkpoint``'s get/set_optimizer_state_dict keep.

Loading validates everything before anything is replaced (``restore_objectives``): a state
that does not fit the optimizer raises one ``StateDictError`` (a ``ValueError``) naming the
objective and the field.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

import torch

from .memory.state import StateDictError, check_layout
from .objective import ProtectedObjective
from .options import ObjectiveConfig
from .sharding import shard_spec

__all__ = [
    "STATE_VERSION",
    "STATE_KEY",
    "StateDictError",
    "gradsafe_state",
    "restore_objectives",
    "check_base_groups",
    "settings_changed",
    "embed",
    "extract",
]

STATE_VERSION = 1
STATE_KEY = "gradsafe"
STATE_FIELDS = ("version", "steps", "space", "defaults", "objectives")


def gradsafe_state(
    objectives: Mapping[str, ProtectedObjective], steps: int, space: str, defaults: ObjectiveConfig
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "steps": steps,
        "space": space,
        "defaults": asdict(defaults),
        "objectives": {name: obj.state_dict() for name, obj in objectives.items()},
    }


def restore_objectives(
    saved: Mapping[str, Any],
    params: list[torch.Tensor],
    current: Mapping[str, ProtectedObjective],
    spaces: Sequence[str] = ("grad", "update"),
) -> tuple[dict[str, ProtectedObjective], int, str, ObjectiveConfig]:
    """The objectives, step count, space and defaults of a saved state, over ``params``.

    Everything is validated and built anew; nothing of ``current`` is changed, so a caller
    that replaces its objectives only after this returns loads atomically. A state that
    does not fit raises ``StateDictError`` naming the objective and the field. A closure of
    an objective in ``current`` under the same name is kept (closures cannot be saved).
    """
    if not isinstance(saved, Mapping):
        raise StateDictError(f"the gradsafe state must be a mapping, got {type(saved).__name__}")
    if "version" not in saved:
        raise StateDictError("the gradsafe state has no 'version' field (not a state saved by gradsafe?)")
    if saved["version"] != STATE_VERSION:
        raise StateDictError(f"unsupported gradsafe state version {saved['version']!r}; "
                             f"this gradsafe reads version {STATE_VERSION}")
    for key in STATE_FIELDS:
        if key not in saved:
            raise StateDictError(f"the gradsafe state has no {key!r} field")
    unknown = sorted(map(str, set(saved) - set(STATE_FIELDS)))
    if unknown:
        raise StateDictError(f"the gradsafe state has unknown fields {unknown}")
    steps = saved["steps"]
    try:
        steps = -1 if isinstance(steps, bool) else operator.index(steps)
    except TypeError:
        steps = -1
    if steps < 0:
        raise StateDictError(f"the gradsafe state's field 'steps' must be an int >= 0, got {saved['steps']!r}")
    space = saved["space"]
    if space not in tuple(spaces):
        raise StateDictError(f"the gradsafe state's field 'space' is {space!r}; expected one of {tuple(spaces)}")
    if not isinstance(saved["defaults"], Mapping):
        raise StateDictError(f"the gradsafe state's field 'defaults' must be a mapping, got {type(saved['defaults']).__name__}")
    try:
        defaults = ObjectiveConfig(**saved["defaults"])
    except (TypeError, ValueError) as e:
        raise StateDictError(f"the gradsafe state's field 'defaults': {e}") from e
    if not isinstance(saved["objectives"], Mapping):
        raise StateDictError(f"the gradsafe state's field 'objectives' must be a mapping, "
                             f"got {type(saved['objectives']).__name__}")
    param_shapes = [p.shape for p in params]
    objectives = {}
    for name, obj_state in saved["objectives"].items():
        if not isinstance(name, str) or not name:
            raise StateDictError(f"the gradsafe state has an objective named {name!r}; names are non-empty strings")
        objectives[name] = _restore_one(name, obj_state, params, param_shapes, current)
    return objectives, steps, space, defaults


def _restore_one(
    name: str,
    state: Any,
    params: list[torch.Tensor],
    param_shapes: list[torch.Size],
    current: Mapping[str, ProtectedObjective],
) -> ProtectedObjective:
    if not isinstance(state, Mapping):
        raise StateDictError(f"objective {name!r}: the saved state must be a mapping, got {type(state).__name__}")
    for key in ("coverage", "shapes"):
        if key not in state:
            raise StateDictError(f"objective {name!r}: missing field {key!r}")
    coverage, _ = check_layout(state["coverage"], state["shapes"], name, param_shapes)
    device = params[coverage[0]].device if coverage else None
    try:
        spec = shard_spec(params, coverage)
    except (ValueError, NotImplementedError) as e:
        raise StateDictError(f"objective {name!r}: field 'coverage': {e}") from e
    try:
        obj = ProtectedObjective.from_state_dict(name, state, device=device, shard=spec, param_shapes=param_shapes)
    except (StateDictError, torch.OutOfMemoryError):
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:  # anything not foreseen, still named
        raise StateDictError(f"objective {name!r}: the saved state does not load: {type(e).__name__}: {e}") from e
    if name in current and current[name].closure is not None:
        obj.closure = current[name].closure
    return obj


def check_base_groups(base: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Raise ``StateDictError`` if a saved param group lacks one of ``base.defaults``' keys.

    A state dict saved by another optimizer class (AdamW's loaded into SGD) loads without
    complaint in torch and fails at the next step (``KeyError: 'momentum'``): every group
    saved by ``base``'s class holds every hyperparameter of ``base.defaults``.
    """
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list):
        raise StateDictError(f"the saved optimizer state has no 'param_groups' list for {type(base).__name__}")
    for i, group in enumerate(groups):
        missing = [k for k in base.defaults if k not in group]
        if missing:
            raise StateDictError(
                f"the saved optimizer state does not match the base optimizer {type(base).__name__}: "
                f"its param group {i} has no {', '.join(map(repr, missing))} (saved by another optimizer class?)"
            )


def settings_changed(space: str, defaults: ObjectiveConfig, saved_space: str, saved_defaults: ObjectiveConfig) -> str | None:
    """What a load replaces of the wrapper's own settings, in words (None if nothing)."""
    changes = []
    if saved_space != space:
        changes.append(f"space {space!r} -> {saved_space!r}")
    for f in fields(ObjectiveConfig):
        old, new = getattr(defaults, f.name), getattr(saved_defaults, f.name)
        if old != new:
            changes.append(f"default {f.name} {old!r} -> {new!r}")
    if not changes:
        return None
    return ("load_state_dict: the checkpoint's settings replace the ones this ProtectedOptimizer was built with "
            f"(exact resume): {', '.join(changes)}")


def embed(state: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """Put gradsafe's state into a base optimizer's state dict (both places, one object)."""
    state[STATE_KEY] = memory
    if state["param_groups"]:
        state["param_groups"][0][STATE_KEY] = memory
    return state


def extract(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a state dict into the base optimizer's part and gradsafe's (None if absent)."""
    state_dict = dict(state_dict)
    saved = state_dict.pop(STATE_KEY, None)
    groups = [dict(g) for g in state_dict.get("param_groups", [])]
    for group in groups:
        in_group = group.pop(STATE_KEY, None)
        # A copy that reached us only through the param groups (DCP) and holds no
        # objective is most likely DCP's load template of a wrapper without objectives:
        # it must not wipe memory restored separately (GradsafeMemory).
        if saved is None and in_group is not None and in_group.get("objectives"):
            saved = in_group
    if groups:
        state_dict["param_groups"] = groups
    return state_dict, saved
