"""A memory as tensors and plain values (``torch.load(weights_only=True)``), and back.

Whole memory saves its tensors as they are. Sharded memory (FSDP2) saves each tensor's
rows as a DTensor of the global shape, which ``torch.distributed.checkpoint`` writes per
rank and reshards on load.

Loading validates what it reads (``memory_from_state``, ``check_layout``): known keys,
every tensor's shape against the layout, finite values, orthonormal live basis rows,
a non-negative Fisher. A state that does not fit raises ``StateDictError`` naming the
objective and the field.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..factored import FactorMemory, matrix_shape
from ..sharding import ShardSpec, local
from ..subspace import orthogonality_error
from .record import Memory, ObjectiveLayout
from .shard import shard as shard_memory

if TYPE_CHECKING:
    from ..options import ObjectiveConfig

__all__ = [
    "memory_state",
    "memory_from_state",
    "check_layout",
    "check_int",
    "StateDictError",
    "MEMORY_KEYS",
    "MEMORY_OPTIONAL_KEYS",
    "ORTHONORMAL_TOL",
]

#: The memory's entries every saved objective has, and those that may be absent.
MEMORY_KEYS = ("basis", "energies", "mean_ref", "sample_refs", "fisher", "num_samples")
MEMORY_OPTIONAL_KEYS = ("factors", "fixed_factors", "sharded", "fisher_fixed")
_SHARDED_KEYS = ("rows", "num_rows", "num_basis", "has_samples", "fisher", "fisher_mean")
_FACTOR_KEYS = ("shape", "left", "left_energy", "right", "right_energy", "ref_left", "ref_right")

#: Largest ``max |U U^T - I|`` accepted for a loaded basis (float32 rows).
ORTHONORMAL_TOL = 1e-3


class StateDictError(ValueError):
    """A saved state that does not fit the optimizer it is loaded into (names objective and field)."""


def memory_state(memory: Memory, layout: ObjectiveLayout) -> dict[str, Any]:
    """The memory's entries of an objective's state dict."""
    state = {
        "basis": memory.basis,
        "energies": memory.energies,
        "mean_ref": memory.mean_ref,
        "sample_refs": memory.sample_refs,
        "fisher": memory.fisher,
        "num_samples": memory.num_samples,
        "factors": {str(t): fm.state_dict() for t, fm in memory.factors.items()},
        "fixed_factors": sorted(memory.fixed_factors),
        "fisher_fixed": memory.fisher_fixed,
    }
    if memory.shard is not None:
        state.update(_sharded_state(memory, layout))
    return state


def _sharded_state(memory: Memory, layout: ObjectiveLayout) -> dict[str, Any]:
    spec = memory.shard
    cols = layout.columns(spec)
    R = memory.storage.shape[0]
    rows = [
        spec.dtensor(memory.storage[:, sl].reshape(R, spec.rows(t)[1], *layout.shapes[t][1:]), 1, (R, *layout.shapes[t]))
        for sl, t in zip(cols.flat_slices(), layout.flat_index)
    ]
    fisher = None
    if memory.fisher is not None:
        fisher = [spec.dtensor(memory.fisher[sl].reshape(spec.rows(t)[1], *layout.shapes[t][1:]), 0, layout.shapes[t])
                  for t, sl in enumerate(cols.memory_slices())]
    factors = {}
    for t, fm in memory.factors.items():
        st = fm.state_dict()
        st["left"] = spec.dtensor(fm.left, 1, (fm.rank_left, fm.shape[0]))
        st["ref_right"] = spec.dtensor(fm.ref_right, 0, (fm.shape[0], fm.rank_right))
        factors[str(t)] = st
    return {
        "basis": None,
        "mean_ref": None,
        "sample_refs": None,
        "fisher": None,
        "factors": factors,
        "sharded": {
            "rows": rows,
            "num_rows": R,
            "num_basis": memory.n_basis,
            "has_samples": memory.has_samples,
            "fisher": fisher,
            "fisher_mean": memory.fisher_mean,
        },
    }


def memory_from_state(
    state: Mapping[str, Any],
    layout: ObjectiveLayout,
    name: str,
    device: torch.device | None = None,
    shard: ShardSpec | None = None,
    config: "ObjectiveConfig | None" = None,
) -> Memory:
    """Rebuild a memory (copies, float32, on ``device``); ``shard``: the parameters' sharding
    (FSDP2) in this process. A memory saved whole and loaded into sharded parameters is sharded.

    The state is validated first (``StateDictError`` naming the objective and the field):
    every tensor's shape against ``layout`` (and ``config``'s scope: energies ``(k,)`` for
    "global", ``(T, k)`` otherwise; a Fisher where the objective keeps one), finite values,
    non-negative energies and Fisher, orthonormal live basis rows (rows whose energy is
    positive, per tensor slice outside scope "global"; factored left/right bases too). Of a
    sharded memory only what this rank holds is checked: its rows cannot be checked for
    orthonormality without a collective, and are not.
    """
    if not isinstance(state, Mapping):
        raise StateDictError(f"objective {name!r}: the saved memory must be a mapping, got {type(state).__name__}")
    for key in MEMORY_KEYS:
        if key not in state:
            raise StateDictError(f"objective {name!r}: missing field {key!r}")
    sharded = state.get("sharded")
    if sharded is not None and shard is None:
        raise StateDictError(
            f"objective {name!r} was saved sharded (FSDP2); load it into an optimizer over the same "
            "sharded parameters (or save with the parameters unsharded)"
        )
    if config is not None:
        per_tensor = config.scope != "global"
    elif len(layout.flat_index) != len(layout.shapes):
        per_tensor = True
    else:  # no configuration given: the energies' own form says which
        energies = state["energies"]
        per_tensor = isinstance(energies, torch.Tensor) and energies.dim() == 2
    num_samples = check_int(state["num_samples"], name, "num_samples")
    factor_rows = (lambda t: shard.rows(t)[1]) if sharded is not None else None
    factor_states = _check_factors(state.get("factors", {}), layout, name, factor_rows)
    fixed = _check_fixed(state.get("fixed_factors", []), factor_states, name)
    if sharded is None:
        _check_whole(state, layout, name, per_tensor, config)
    else:
        _check_sharded(sharded, layout, name, per_tensor, shard, state["energies"], config)

    def load(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = local(t)  # a DTensor loaded by torch.distributed.checkpoint: this rank's rows
        return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32).clone()

    factors = {
        t: FactorMemory.from_state_dict({k: local(v) if isinstance(v, torch.Tensor) else v for k, v in f.items()}, device)
        for t, f in factor_states.items()
    }
    fisher_fixed = state.get("fisher_fixed", False)
    if not isinstance(fisher_fixed, bool):
        raise StateDictError(f"objective {name!r}: field 'fisher_fixed' must be a bool, got {fisher_fixed!r}")
    common = dict(
        fisher_fixed=fisher_fixed,
        energies=load(state["energies"]),
        factors=factors,
        fixed_factors=fixed,
        num_samples=num_samples,
    )
    if sharded is None:
        basis, mean_ref, sample_refs = load(state["basis"]), load(state["mean_ref"]), load(state["sample_refs"])
        rows = [basis, mean_ref[None]] + ([sample_refs] if sample_refs is not None else [])
        memory = Memory(
            storage=torch.cat(rows).to(torch.float32).contiguous(),
            n_basis=basis.shape[0],
            has_samples=sample_refs is not None,
            fisher=load(state["fisher"]),
            **common,
        )
        _check_values(memory, layout, name, per_tensor, whole=True)
        return shard_memory(memory, layout, shard, name) if shard is not None else memory
    parts = [load(r) for r in sharded["rows"]]
    R = int(sharded["num_rows"])
    storage = torch.cat([r.reshape(R, -1) for r in parts], dim=1) if parts else torch.zeros(R, 0, device=device)
    fisher_mean = sharded["fisher_mean"]
    memory = Memory(
        storage=storage.contiguous(),
        n_basis=int(sharded["num_basis"]),
        has_samples=bool(sharded["has_samples"]),
        fisher=None if sharded["fisher"] is None else torch.cat([load(f).reshape(-1) for f in sharded["fisher"]]),
        fisher_mean=None if fisher_mean is None else float(fisher_mean),
        shard=shard,
        **common,
    )
    _check_values(memory, layout, name, per_tensor, whole=False)
    return memory


def check_layout(
    coverage: Any, shapes: Any, name: str, param_shapes: Sequence[Sequence[int]] | None = None
) -> tuple[tuple[int, ...], tuple[torch.Size, ...]]:
    """A saved objective's coverage and shapes, validated (``StateDictError`` otherwise).

    ``param_shapes``: the shapes of all the optimizer's parameters in order; the coverage
    must index them and the saved shapes equal theirs.
    """
    if isinstance(coverage, (str, bytes)) or not isinstance(coverage, Sequence):
        raise StateDictError(f"objective {name!r}: field 'coverage' must be a list of parameter indices, "
                             f"got {type(coverage).__name__}")
    cov = tuple(check_int(i, name, "coverage") for i in coverage)
    if len(set(cov)) != len(cov):
        raise StateDictError(f"objective {name!r}: field 'coverage' names a parameter twice: {list(cov)}")
    if param_shapes is not None:
        for i in cov:
            if i >= len(param_shapes):
                raise StateDictError(f"objective {name!r}: field 'coverage' names parameter {i}; "
                                     f"the optimizer has {len(param_shapes)} parameters")
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise StateDictError(f"objective {name!r}: field 'shapes' must be a list of shapes, got {type(shapes).__name__}")
    if len(shapes) != len(cov):
        raise StateDictError(f"objective {name!r}: field 'shapes' has {len(shapes)} entries, "
                             f"field 'coverage' has {len(cov)}")
    sizes = []
    for i, shape in zip(cov, shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise StateDictError(f"objective {name!r}: field 'shapes' has {shape!r} for parameter {i}, expected a shape")
        size = torch.Size([check_int(d, name, "shapes") for d in shape])
        if param_shapes is not None and size != torch.Size(param_shapes[i]):
            raise StateDictError(f"objective {name!r}: field 'shapes' has {tuple(size)} for parameter {i}; "
                                 f"the optimizer's parameter {i} has shape {tuple(param_shapes[i])}")
        sizes.append(size)
    return cov, tuple(sizes)


# ---------------------------------------------------------------------- validation
def _fail(name: str, field: str, message: str) -> StateDictError:
    return StateDictError(f"objective {name!r}: field {field!r} {message}")


def check_int(value: Any, name: str, field: str, minimum: int = 0) -> int:
    """A saved count: an int (not a bool) >= ``minimum``; ``StateDictError`` otherwise."""
    if isinstance(value, bool):
        raise _fail(name, field, f"must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise _fail(name, field, f"must be an int, got {type(value).__name__}") from None
    if v < minimum:
        raise _fail(name, field, f"must be >= {minimum}, got {v}")
    return v


def _tensor(value: Any, name: str, field: str, ndim: int, optional: bool = False) -> torch.Tensor | None:
    """``value`` (this rank's part of a DTensor) if it is a real floating tensor of ``ndim`` dimensions."""
    if value is None:
        if optional:
            return None
        raise _fail(name, field, "is None, expected a tensor")
    if not isinstance(value, torch.Tensor):
        raise _fail(name, field, f"must be a tensor, got {type(value).__name__}")
    value = local(value)
    if not value.dtype.is_floating_point:
        raise _fail(name, field, f"must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != ndim:
        raise _fail(name, field, f"is a {value.dim()}-D tensor of shape {tuple(value.shape)}, expected {ndim}-D")
    return value


def _expect(t: torch.Tensor, shape: Sequence[int], name: str, field: str, why: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise _fail(name, field, f"has shape {tuple(t.shape)}, expected {tuple(shape)}{why}")


def _width(t: torch.Tensor, N: int, name: str, field: str, what: str) -> None:
    cols = t.shape[-1]
    if cols != N:
        unit = "entries" if t.dim() == 1 else "columns"
        raise _fail(name, field, f"has {cols} {unit}, {what} have {N} entries")


def _covered(layout: ObjectiveLayout) -> str:
    return "the covered 1-D parameters" if len(layout.flat_index) != len(layout.shapes) else "the covered parameters"


def _energies_shape(per_tensor: bool, T: int, k: int) -> tuple[int, ...]:
    return (T, k) if per_tensor else (k,)


def _needs_fisher(config: "ObjectiveConfig | None") -> bool:
    """Whether a saved memory must hold a Fisher: where a step reads it (damping, EWC). A flat
    objective keeps one for the report's ``fisher_step``; one refreshed in place while the
    report read none has none (``ProtectedObjective.tracks_fisher``)."""
    return config is not None and (config.damping > 0 or config.ewc > 0)


def _check_whole(state: Mapping[str, Any], layout: ObjectiveLayout, name: str, per_tensor: bool,
                 config: "ObjectiveConfig | None") -> None:
    N = layout.columns(None).flat_numel
    what = _covered(layout)
    basis = _tensor(state["basis"], name, "basis", 2)
    _width(basis, N, name, "basis", what)
    k = basis.shape[0]
    mean_ref = _tensor(state["mean_ref"], name, "mean_ref", 1)
    _width(mean_ref, N, name, "mean_ref", what)
    sample_refs = _tensor(state["sample_refs"], name, "sample_refs", 2, optional=True)
    if sample_refs is not None:
        _width(sample_refs, N, name, "sample_refs", what)
    energies = _tensor(state["energies"], name, "energies", 2 if per_tensor else 1)
    _expect(energies, _energies_shape(per_tensor, len(layout.flat_index), k), name, "energies",
            f" ({'one row per flat tensor, ' if per_tensor else ''}one entry per basis row)")
    fisher = _tensor(state["fisher"], name, "fisher", 1, optional=not _needs_fisher(config))
    if fisher is not None:
        _width(fisher, layout.numel, name, "fisher", "the covered parameters")


def _check_sharded(sharded: Any, layout: ObjectiveLayout, name: str, per_tensor: bool, spec: ShardSpec,
                   energies: Any, config: "ObjectiveConfig | None") -> None:
    if not isinstance(sharded, Mapping):
        raise _fail(name, "sharded", f"must be a mapping, got {type(sharded).__name__}")
    for key in _SHARDED_KEYS:
        if key not in sharded:
            raise _fail(name, f"sharded.{key}", "is missing")
    unknown = sorted(set(sharded) - set(_SHARDED_KEYS))
    if unknown:
        raise _fail(name, "sharded", f"has unknown entries {unknown}")
    R = check_int(sharded["num_rows"], name, "sharded.num_rows", minimum=1)
    k = check_int(sharded["num_basis"], name, "sharded.num_basis")
    if not isinstance(sharded["has_samples"], bool):
        raise _fail(name, "sharded.has_samples", f"must be a bool, got {sharded['has_samples']!r}")
    if k + 1 > R or (not sharded["has_samples"] and R != k + 1):
        raise _fail(name, "sharded.num_rows", f"is {R}, which does not fit {k} basis rows and a mean reference"
                    + ("" if sharded["has_samples"] else " (and no kept samples)"))
    rows = sharded["rows"]
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) != len(layout.flat_index):
        raise _fail(name, "sharded.rows", f"must be a list of {len(layout.flat_index)} tensors (one per flat tensor)")
    for r, t in zip(rows, layout.flat_index):
        shape = layout.shapes[t]
        part = _tensor(r, name, "sharded.rows", len(shape) + 1)
        _expect(part, (R, spec.rows(t)[1], *shape[1:]), name, "sharded.rows",
                f" for parameter {layout.coverage[t]} (this rank's rows)")
    fisher = sharded["fisher"]
    if fisher is None:
        if _needs_fisher(config):
            raise _fail(name, "sharded.fisher", "is None, expected a tensor")
    else:
        if isinstance(fisher, (str, bytes)) or not isinstance(fisher, Sequence) or len(fisher) != len(layout.shapes):
            raise _fail(name, "sharded.fisher", f"must be a list of {len(layout.shapes)} tensors (one per covered tensor)")
        for f, shape, t in zip(fisher, layout.shapes, range(len(layout.shapes))):
            part = _tensor(f, name, "sharded.fisher", len(shape))
            _expect(part, (spec.rows(t)[1], *shape[1:]), name, "sharded.fisher",
                    f" for parameter {layout.coverage[t]} (this rank's rows)")
    mean = sharded["fisher_mean"]
    if mean is not None:
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean < 0:
            raise _fail(name, "sharded.fisher_mean", f"must be a finite number >= 0 or None, got {mean!r}")
    e = _tensor(energies, name, "energies", 2 if per_tensor else 1)
    _expect(e, _energies_shape(per_tensor, len(layout.flat_index), k), name, "energies")


def _check_factors(factors: Any, layout: ObjectiveLayout, name: str, local_rows: Any) -> dict[int, Mapping[str, Any]]:
    """The saved factored memories by position in the coverage, their shapes validated.

    ``local_rows(t)``: of a sharded memory, this rank's rows of matrix ``t`` (the columns of
    its left basis, the rows of its reference's right factor); None for a whole memory.
    """
    if not isinstance(factors, Mapping):
        raise _fail(name, "factors", f"must be a mapping, got {type(factors).__name__}")
    out = {}
    for key, f in factors.items():
        field = f"factors[{key!r}]"
        try:
            t = int(key)
        except (TypeError, ValueError):
            raise _fail(name, "factors", f"has the key {key!r}, expected a position in the coverage") from None
        if not 0 <= t < len(layout.shapes) or t in layout.flat_index:
            raise _fail(name, "factors", f"has an entry for position {t}, which is not a factored matrix of the coverage")
        if not isinstance(f, Mapping) or set(f) != set(_FACTOR_KEYS):
            got = sorted(f) if isinstance(f, Mapping) else type(f).__name__
            raise _fail(name, field, f"must have the entries {list(_FACTOR_KEYS)}, got {got}")
        m, n = matrix_shape(layout.shapes[t])
        shape = f["shape"]
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or tuple(shape) != (m, n):
            raise _fail(name, f"{field}.shape", f"is {shape!r}; parameter {layout.coverage[t]} is viewed as a {(m, n)} matrix")
        rows = m if local_rows is None else local_rows(t)
        left = _tensor(f["left"], name, f"{field}.left", 2)
        right = _tensor(f["right"], name, f"{field}.right", 2)
        rl, rr = left.shape[0], right.shape[0]
        _expect(left, (rl, rows), name, f"{field}.left")
        _expect(right, (rr, n), name, f"{field}.right")
        for key2, shape2 in (("left_energy", (rl,)), ("right_energy", (rr,)), ("ref_left", (rl, n)), ("ref_right", (rows, rr))):
            _expect(_tensor(f[key2], name, f"{field}.{key2}", len(shape2)), shape2, name, f"{field}.{key2}")
        out[t] = f
    return out


def _check_fixed(fixed: Any, factors: Mapping[int, Any], name: str) -> frozenset[int]:
    if isinstance(fixed, (str, bytes)) or not isinstance(fixed, (Sequence, set, frozenset)):
        raise _fail(name, "fixed_factors", f"must be a list of positions, got {type(fixed).__name__}")
    out = frozenset(check_int(t, name, "fixed_factors") for t in fixed)
    missing = sorted(out - set(factors))
    if missing:
        raise _fail(name, "fixed_factors", f"names positions {missing} that have no factored memory")
    return out


def _finite(t: torch.Tensor | None, name: str, field: str, nonnegative: bool = False) -> None:
    if t is None or t.numel() == 0:
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise _fail(name, field, f"has {bad} non-finite entries (NaN or inf)")
    if nonnegative and bool((t < 0).any()):
        raise _fail(name, field, f"has negative entries (min {float(t.min()):.3g}); it must be >= 0")


def _orthonormal(rows: torch.Tensor, name: str, field: str, where: str = "") -> None:
    err = orthogonality_error(rows)
    if not err <= ORTHONORMAL_TOL:
        raise _fail(name, field, f"is not orthonormal{where}: max |U U^T - I| = {err:.3g} "
                    f"(tolerance {ORTHONORMAL_TOL:g})")


def _check_values(memory: Memory, layout: ObjectiveLayout, name: str, per_tensor: bool, whole: bool) -> None:
    """Finite values, non-negative energies and Fisher, orthonormal live rows (``whole``: all
    columns are here; a sharded memory's flat rows and left bases are not checked for that)."""
    basis, energies = memory.basis, memory.energies
    _finite(basis, name, "basis")
    _finite(memory.mean_ref, name, "mean_ref")
    _finite(memory.sample_refs, name, "sample_refs")
    _finite(energies, name, "energies", nonnegative=True)
    _finite(memory.fisher, name, "fisher", nonnegative=True)
    for t, fm in memory.factors.items():
        for key in _FACTOR_KEYS[1:]:
            _finite(getattr(fm, key), name, f"factors['{t}'].{key}", nonnegative=key.endswith("energy"))
        _orthonormal(fm.right[fm.right_energy > 0], name, f"factors['{t}'].right")
        if whole:
            _orthonormal(fm.left[fm.left_energy > 0], name, f"factors['{t}'].left")
    if not whole:
        return
    if not per_tensor:
        _orthonormal(basis[energies > 0], name, "basis")
        return
    for i, (sl, t) in enumerate(zip(layout.columns(None).flat_slices(), layout.flat_index)):
        _orthonormal(basis[energies[i] > 0][:, sl], name, "basis", f" on parameter {layout.coverage[t]}'s columns")
