"""gradsafe's part of an optimizer state dict: every objective's memory and options, counters.

Tensors and plain values only (``torch.load(weights_only=True)`` loads it). The state dict
holds it under ``"gradsafe"`` at the top level (``torch.save``, Trainer, Lightning) and, as
the same object, in the first param group: the one place besides per-parameter state that
``torch.distributed.checkpoint``'s get/set_optimizer_state_dict keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from .objective import ProtectedObjective
from .options import ObjectiveConfig
from .sharding import shard_spec

__all__ = ["STATE_VERSION", "STATE_KEY", "gradsafe_state", "restore_objectives", "embed", "extract"]

STATE_VERSION = 1
STATE_KEY = "gradsafe"


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
    saved: Mapping[str, Any], params: list[torch.Tensor], current: Mapping[str, ProtectedObjective]
) -> tuple[dict[str, ProtectedObjective], int, str, ObjectiveConfig]:
    """The objectives, step count, space and defaults of a saved state, over ``params``.

    A closure of an objective in ``current`` under the same name is kept (closures cannot be
    saved).
    """
    if saved.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported gradsafe state version {saved.get('version')!r}")
    objectives = {}
    for name, obj_state in saved["objectives"].items():
        cov = obj_state["coverage"]
        device = params[cov[0]].device if cov and cov[0] < len(params) else None
        obj = ProtectedObjective.from_state_dict(name, obj_state, device=device, shard=shard_spec(params, cov))
        if name in current and current[name].closure is not None:
            obj.closure = current[name].closure
        objectives[name] = obj
    return objectives, int(saved["steps"]), saved["space"], ObjectiveConfig(**saved["defaults"])


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
