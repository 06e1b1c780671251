"""A protected objective: a name, its options, its memory record, and its closure.

``ProtectedObjective`` is the handle the optimizer keeps per name. Its memory is a
``gradsafe.memory.Memory`` record that every update replaces (``add_samples``,
``refresh``, ``set_bases``, ``shard_to``, ``unshard``); ``version`` counts the
replacements, so that a plan built on an older memory is rebuilt. One update does not
replace it: a live reference's refresh whose memory keeps its shape (``refresh_in_place``)
writes the fresh gradient into the record's rows, or on the CPU lends it to the step
(``lent_rows``: the rows are the gradient's own tensors until the memory is read);
``rows_version`` counts those, so that a plan over the same rows updates only the numbers
that depend on them. The refresh schedule of a closure objective is a separate record
(``gradsafe.refresh.RefreshState``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from . import memory as mem
from .factored import FactorMemory
from .memory.merge import lends_rows, refresh_in_place, refreshes_in_place
from .memory.state import MEMORY_KEYS, MEMORY_OPTIONAL_KEYS, StateDictError, check_int, check_layout
from .operators.base import RowSpan
from .operators.damping import keeps_fisher, normalized
from .options import ObjectiveConfig
from .refresh import STATE_KEYS as REFRESH_KEYS
from .refresh import RefreshState
from .sharding import ShardSpec, local

__all__ = ["ProtectedObjective"]


class ProtectedObjective:
    """A named thing to keep, with its memory.

    Memory, all float32 on the covered parameters' device, over the N covered entries packed
    in coverage order (see ``gradsafe.memory.Memory``):

    - ``basis`` (rank, N): for scope "global", orthonormal rows; for scope "tensor", each
      parameter's slice has its own orthonormal rows (zero rows pad a slice whose rank is
      lower), with energies ``energies`` ((rank,) or (tensors, rank));
    - ``mean_ref`` (N,): the mean of all samples, the oriented reference (A-GEM, SafeGrad);
    - ``sample_refs`` (m, N): the most recent ``rank`` samples, kept with references="samples";
    - ``fisher`` (N,): the online-averaged mean of squared samples;
    - ``factors``: scope "factored", per weight matrix its left/right bases and reference.
    """

    def __init__(
        self,
        name: str,
        config: ObjectiveConfig,
        coverage: Sequence[int],
        shapes: Sequence[torch.Size],
        closure: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.layout = mem.ObjectiveLayout.of(coverage, shapes, factored=config.scope == "factored")
        self._memory: mem.Memory = mem.EMPTY
        # In-place refreshes keep the Fisher's decay as a host factor: the record's fisher holds
        # F / _fisher_scale, so that each refresh takes one pass over it (F += c g^2) instead
        # of two (F = d F + (1 - d) g^2). Reading the memory folds the factor back in.
        self._fisher_scale = 1.0
        self._fisher_bound: float | None = None  # an upper bound of the Fisher's entries
        # A live reference's fresh gradient lent to the step instead of copied into the rows
        # (per covered tensor, flat): the record's row is stale while it is set; reading the
        # memory writes it in (``lent_rows``)
        self._lent: tuple[torch.Tensor, ...] | None = None
        self.closure = closure
        self.had_closure = closure is not None
        self.param_bytes = 4 * self.layout.numel  # the covered parameters' own bytes (set by the optimizer)
        self.num_refreshes = 0
        self.version = 0  # memory records replaced: a plan over an older one is rebuilt
        self.rows_version = 0  # rows rewritten in place: a plan over them updates its numbers
        # per covered tensor (coverage order), as of rows_version: when every row the step reads is
        # a copy of one gradient (after an in-place refresh), its squared norm there; else None
        self.row_norms2: np.ndarray | None = None
        self.schedule = RefreshState()
        # EWC's anchor theta*: per covered tensor (this rank's part when sharded), in the
        # parameter's own dtype; None unless the objective has an EWC penalty
        self.anchor: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ layout
    @property
    def coverage(self) -> tuple[int, ...]:
        return self.layout.coverage

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return self.layout.shapes

    @property
    def numels(self) -> tuple[int, ...]:
        return self.layout.numels

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def flat_index(self) -> tuple[int, ...]:
        return self.layout.flat_index

    @property
    def columns(self) -> mem.Columns:
        """The memory's column layout (this rank's part when sharded)."""
        return self.layout.columns(self._memory.shard)

    @property
    def flat_numel(self) -> int:
        return self.columns.flat_numel

    @property
    def mem_numels(self) -> tuple[int, ...]:
        return self.columns.numels

    @property
    def has_closure(self) -> bool:
        return self.closure is not None

    @property
    def keeps_fisher(self) -> bool:
        """Whether the objective's kind keeps a Fisher diagonal (``operators.damping.keeps_fisher``)."""
        return keeps_fisher(self.config.scope, self.config.damping, self.config.ewc)

    @property
    def tracks_fisher(self) -> bool:
        """Whether the memory holds a Fisher now. False for a kind that keeps none, and for a
        live reference refreshed in place while nothing reads its Fisher (no damping, no EWC,
        the optimizer's ``fisher_metrics`` off): its refreshes then skip the Fisher's pass
        (``refresh_in_place``)."""
        return self._memory.fisher is not None

    def slices(self) -> list[slice]:
        """Each covered tensor's columns in packed samples (and in a whole Fisher)."""
        return self.layout.slices()

    def flat_slices(self) -> list[slice]:
        """Each flat-memory tensor's columns in the row storage (``flat_index`` order)."""
        return self.columns.flat_slices()

    def memory_slices(self) -> list[slice]:
        """Each covered tensor's entries in the Fisher diagonal (this rank's part when sharded)."""
        return self.columns.memory_slices()

    def flat_part(self, S: torch.Tensor) -> torch.Tensor:
        return self.layout.flat_part(S)

    # ------------------------------------------------------------------ memory (read)
    @property
    def basis(self) -> torch.Tensor | None:
        return self._memory.basis

    @property
    def mean_ref(self) -> torch.Tensor | None:
        return self.memory.mean_ref

    @property
    def sample_refs(self) -> torch.Tensor | None:
        return self.memory.sample_refs

    @property
    def energies(self) -> torch.Tensor | None:
        return self._memory.energies

    @property
    def fisher(self) -> torch.Tensor | None:
        return self.memory.fisher

    @property
    def memory(self) -> mem.Memory:
        """The memory record, as it says: a pending decay factor of the Fisher is folded in, and
        lent rows are written into the storage."""
        if self._fisher_scale != 1.0:
            self._fold_fisher()
        if self._lent is not None:
            lent, self._lent = self._lent, None
            refresh_in_place(self._memory, self.layout, lent, 1.0, 0.0)
        return self._memory

    @memory.setter
    def memory(self, memory: mem.Memory) -> None:
        self._memory = memory
        self._fisher_scale = 1.0
        self._fisher_bound = None
        self._lent = None

    @property
    def lent_rows(self) -> tuple[torch.Tensor, ...] | None:
        """The live reference's rows when its last refresh lent them (``refresh_in_place``):
        per covered tensor, the fresh gradient flattened (its own tensor, no copy), which the
        step reads instead of the record's row until the memory is read. None otherwise."""
        return self._lent

    def _fold_fisher(self) -> None:
        self._memory.fisher.mul_(self._fisher_scale)
        self._fisher_scale = 1.0

    @property
    def fisher_mean(self) -> float | None:
        return self._memory.fisher_mean

    @property
    def factors(self) -> Mapping[int, FactorMemory]:
        return self._memory.factors

    @property
    def fixed_factors(self) -> frozenset[int]:
        return self._memory.fixed_factors

    @property
    def num_samples(self) -> int:
        return self._memory.num_samples

    @property
    def shard(self) -> ShardSpec | None:
        return self._memory.shard

    @property
    def _storage(self) -> torch.Tensor | None:
        return self.memory.storage

    def normalized_fisher(self) -> torch.Tensor:
        """The Fisher scaled to mean 1 over all covered entries (of all ranks when sharded)."""
        if self.memory.shard is None:
            return normalized(self.memory.fisher)
        return normalized(self.memory.fisher, self.memory.fisher_mean or 0.0)

    def direction_rows(self) -> tuple[torch.Tensor, int, int, int]:
        """The rows the step reads (a view, no copy) and how they split: ``(D, n_basis, 1, n_refs)``.

        Which rows is the operator's choice (``Operator.rows_read``): project / observe read
        the basis and the mean reference; conflict the mean reference and, with
        references="samples", the kept samples.
        """
        span = self.row_span()
        return self.memory.storage[span.start : span.stop], span.n_basis, span.n_mean, span.n_refs

    def row_span(self) -> RowSpan:
        m = self._memory
        assert m.storage is not None, f"objective {self.name!r} has no memory yet"
        n_samples = 0 if m.sample_refs is None else m.sample_refs.shape[0]
        return self.config.operator.rows_read(self.config, m.n_basis, n_samples)

    # ------------------------------------------------------------------ memory (replace)
    def replace_memory(self, memory: mem.Memory) -> None:
        """Make ``memory`` the objective's memory (a new version: plans over the old one are rebuilt).

        Every update below goes through here; code that builds a memory record itself (the
        benchmark's synthetic problems) uses it directly.
        """
        self.memory = memory
        self.version += 1
        self.row_norms2 = None

    def add_samples(self, S: torch.Tensor) -> None:
        """Merge packed samples ``S`` (m, N) into the memory (basis union, running mean, online Fisher)."""
        self.replace_memory(self._merged(S, fresh=False))

    def refresh(self, S: torch.Tensor) -> None:
        """Replace basis and references by those of the fresh samples; Fisher keeps its online average."""
        self.replace_memory(self._merged(S, fresh=True))
        self.num_refreshes += 1

    def consolidate(self, S: torch.Tensor, anchor: list[torch.Tensor]) -> None:
        """Online EWC: merge a new task's samples ``S`` (basis union, references), make the
        Fisher ``ewc_gamma F_old + F_new`` and move the anchor to ``anchor``."""
        gamma = float(self.config.ewc_gamma)
        self.replace_memory(self._merged(S, fresh=False, consolidate_gamma=gamma))
        self.anchor = anchor

    def set_fisher(self, fisher: torch.Tensor) -> None:
        """Give the EWC penalty its Fisher diagonal (packed (N,), whole); merges then keep it."""
        if fisher.shape != (self.numel,):
            raise ValueError(f"objective {self.name!r}: fisher_diagonal must pack to ({self.numel},), got {tuple(fisher.shape)}")
        if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
            raise ValueError(f"objective {self.name!r}: fisher_diagonal must be finite and >= 0")
        self.replace_memory(replace(self.memory, fisher=fisher.to(torch.float32).contiguous(), fisher_fixed=True))

    @property
    def refreshes_in_place(self) -> bool:
        """Whether ``refresh_in_place`` applies (``gradsafe.memory.merge.refreshes_in_place``)."""
        return refreshes_in_place(self._memory, self.layout, self.config)

    def refresh_in_place(self, grads: Sequence[torch.Tensor | None], norms2: np.ndarray, fisher_read: bool = True) -> None:
        """Refresh from one fresh gradient by writing it into the memory's rows (same record),
        or by lending it (``lent_rows``, ``gradsafe.memory.merge.lends_rows``: on the CPU,
        where the copy would be a pass at memory speed that the hand-written loop does not
        make; the memory keeps its stale row until it is read, the lent tensors alive until
        the next refresh).

        ``grads``: per covered tensor (coverage order), None for 0; ``norms2``: their squared
        norms, which the caller computed while checking that they are finite (the plan takes
        its Gram of these rows from them). Bumps ``rows_version``, not ``version``.

        ``fisher_read``: whether anything outside the objective reads its Fisher (the report's
        ``fisher_step``). Its own step never does (an in-place refresh has no damping) and an
        EWC Fisher is the task's, which a refresh leaves. When nothing reads it the Fisher is
        dropped (``fisher`` is None, ``tracks_fisher`` False) and the refresh takes no pass
        over it; once something reads it again it restarts from that refresh's gradient, as a
        fresh memory's Fisher starts (``g^2``), and is the online average from there on.
        """
        memory = self._memory
        if not fisher_read and memory.fisher is not None and self.config.ewc <= 0 and not memory.fisher_fixed:
            memory = replace(memory, fisher=None)
            self.memory = memory
        largest_square = float(norms2.max(initial=0.0))
        if fisher_read and memory.fisher is None and self.keeps_fisher:
            memory = replace(memory, fisher=memory.storage.new_empty(self.numel))
            self.memory = memory
            self._fisher_bound = largest_square
            keep, new = 0.0, 1.0  # F = g^2, written over the new buffer
        else:
            keep, new = self._fisher_weights(memory.fisher, largest_square)
        if lends_rows(memory, grads, keep, new):
            self._lent = tuple(g.detach().view(-1) for g in grads)
            self._memory = memory if memory.num_samples == 1 else replace(memory, num_samples=1)
        else:
            self._lent = None
            self._memory = refresh_in_place(memory, self.layout, grads, keep, new)
        self.row_norms2 = np.asarray(norms2, dtype=np.float64)  # every row read is a copy of the gradient
        self.rows_version += 1
        self.num_refreshes += 1

    def _fisher_weights(self, fisher: torch.Tensor | None, largest_square: float) -> tuple[float, float]:
        """``(keep, new)`` such that ``fisher <- keep * fisher + new * g^2`` is this refresh's
        online average ``F <- d F + (1 - d) g^2`` in the stored, scaled form ``F = scale * fisher``.

        The scale shrinks by ``d`` per refresh (``keep = 1``: one pass); it is folded back in
        (``keep = scale * d``: two passes, as without it) before the stored entries could
        leave float32's range, which an upper bound of the entries kept on the host tells.
        """
        d = self.config.fisher_decay
        if fisher is None or self.config.ewc > 0:  # EWC's Fisher is the task's: a refresh leaves it
            return 1.0, 0.0
        if self._fisher_bound is None:
            self._fisher_bound = float(fisher.max()) if fisher.numel() else 0.0
        # every entry of g^2 is at most its tensor's squared norm
        self._fisher_bound = d * self._fisher_bound + (1.0 - d) * largest_square
        scale = self._fisher_scale * d
        if d == 0.0 or scale < 1e-30 or self._fisher_bound > 1e37 * scale:
            keep, self._fisher_scale = self._fisher_scale * d, 1.0
            return keep, 1.0 - d
        self._fisher_scale = scale
        return 1.0, (1.0 - d) / scale

    def _merged(self, S: torch.Tensor, fresh: bool, consolidate_gamma: float | None = None) -> mem.Memory:
        mem.check_packed(S, self.numel, self.name)
        return mem.merge(self.memory, self.layout, self.config, S, fresh=fresh, param_bytes=self.param_bytes,
                         name=self.name, consolidate_gamma=consolidate_gamma)

    def set_bases(self, factors: dict[int, FactorMemory]) -> None:
        """Start a factored objective from given bases (``t`` = index in the coverage), no samples."""
        self.replace_memory(mem.from_bases(self.layout, self.config, factors, param_bytes=self.param_bytes, name=self.name))

    def shard_to(self, spec: ShardSpec) -> None:
        """Keep only this rank's part of the memory (FSDP2)."""
        self.replace_memory(mem.shard(self.memory, self.layout, spec, self.name))

    def unshard(self) -> ShardSpec | None:
        """Gather the whole memory on every rank (a collective); returns the spec it had."""
        spec = self.memory.shard
        if spec is not None:
            self.replace_memory(mem.unshard(self.memory, self.layout))
        return spec

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``).

        The memory's tensors are the live ones (as in torch's optimizer state), except the
        Fisher of an objective refreshed in place: later refreshes keep it in a scaled form,
        so the state gets a copy of it.
        """
        memory = mem.memory_state(self.memory, self.layout)
        if self.refreshes_in_place and memory["fisher"] is not None:
            memory["fisher"] = memory["fisher"].clone()
        return {
            "config": asdict(self.config),
            "coverage": list(self.coverage),
            "shapes": [list(s) for s in self.shapes],
            **memory,
            "num_refreshes": self.num_refreshes,
            "had_closure": self.closure is not None,
            **asdict(self.schedule),
            "param_bytes": self.param_bytes,
            "anchor": None if self.anchor is None else self._anchor_state(),
        }

    def _anchor_state(self) -> list[Any]:
        spec = self.memory.shard
        if spec is None:
            return list(self.anchor)
        return [spec.dtensor(a, 0, shape) for a, shape in zip(self.anchor, self.shapes)]

    @classmethod
    def from_state_dict(
        cls,
        name: str,
        state: Mapping[str, Any],
        device: torch.device | None = None,
        shard: ShardSpec | None = None,
        param_shapes: Sequence[Sequence[int]] | None = None,
    ) -> "ProtectedObjective":
        """Rebuild an objective; ``shard``: the parameters' sharding (FSDP2) in this process.

        ``param_shapes``: the shapes of all the optimizer's parameters, which the saved
        coverage must index and whose shapes the saved ones must equal. The whole state is
        validated (``StateDictError``, a ``ValueError`` naming the objective and the
        field): known fields, the configuration, the counters, the memory's tensors.
        """
        if not isinstance(state, Mapping):
            raise StateDictError(f"objective {name!r}: the saved state must be a mapping, got {type(state).__name__}")
        required = ("config", "coverage", "shapes", *MEMORY_KEYS, "num_refreshes", "had_closure", *REFRESH_KEYS)
        for key in required:
            if key not in state:
                raise StateDictError(f"objective {name!r}: missing field {key!r}")
        unknown = sorted(set(state) - {*required, *MEMORY_OPTIONAL_KEYS, "param_bytes", "anchor"})
        if unknown:
            raise StateDictError(f"objective {name!r}: unknown fields {unknown}")
        saved_config = state["config"]
        if not isinstance(saved_config, Mapping):
            raise StateDictError(f"objective {name!r}: field 'config' must be a mapping, got {type(saved_config).__name__}")
        try:
            config = ObjectiveConfig(**saved_config)
        except (TypeError, ValueError) as e:
            raise StateDictError(f"objective {name!r}: field 'config': {e}") from e
        coverage, shapes = check_layout(state["coverage"], state["shapes"], name, param_shapes)
        obj = cls(name, config, coverage, shapes)
        memory = mem.memory_from_state(state, obj.layout, name, device, shard, config=config)
        counters = {key: check_int(state[key], name, key) for key in ("num_refreshes", "last_refresh_step", "last_check_step")}
        if not isinstance(state["had_closure"], bool):
            raise StateDictError(f"objective {name!r}: field 'had_closure' must be a bool, got {state['had_closure']!r}")
        for key in ("loss_at_refresh", "predicted_since_refresh", "staleness"):
            value = state[key]
            if (value is None and key != "predicted_since_refresh") or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            ):
                continue
            raise StateDictError(f"objective {name!r}: field {key!r} must be a number"
                                 f"{'' if key == 'predicted_since_refresh' else ' or None'}, got {value!r}")
        param_bytes = check_int(state["param_bytes"], name, "param_bytes") if "param_bytes" in state else obj.param_bytes
        obj.memory = memory
        obj.num_refreshes = counters["num_refreshes"]
        obj.had_closure = state["had_closure"]
        obj.schedule = RefreshState.from_state(state)
        obj.param_bytes = param_bytes
        obj.anchor = _check_anchor(state.get("anchor"), obj, memory.shard, device)
        obj.version = 1
        return obj

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ProtectedObjective({self.name!r}, mode={c.mode!r}, scope={c.scope!r}, rank={c.rank}, "
            f"basis_rows={0 if self.basis is None else self.basis.shape[0]}, "
            f"tensors={len(self.coverage)}, entries={self.numel}, samples={self.num_samples})"
        )


def _check_anchor(saved: Any, obj: ProtectedObjective, shard: ShardSpec | None, device: torch.device | None) -> list[torch.Tensor] | None:
    """The saved EWC anchor, validated against the objective's layout (copies on ``device``)."""
    name = obj.name
    if saved is None:
        if obj.config.ewc > 0:
            raise StateDictError(f"objective {name!r}: field 'anchor' is None, but the objective has an EWC penalty (ewc={obj.config.ewc})")
        return None
    if isinstance(saved, (str, bytes)) or not isinstance(saved, Sequence) or len(saved) != len(obj.shapes):
        raise StateDictError(f"objective {name!r}: field 'anchor' must be a list of {len(obj.shapes)} tensors (one per covered tensor)")
    out = []
    for t, (a, shape) in enumerate(zip(saved, obj.shapes)):
        if not isinstance(a, torch.Tensor):
            raise StateDictError(f"objective {name!r}: field 'anchor' entry {t} must be a tensor, got {type(a).__name__}")
        a = local(a)
        want = tuple(shape) if shard is None else (shard.rows(t)[1], *shape[1:])
        if tuple(a.shape) != want:
            raise StateDictError(f"objective {name!r}: field 'anchor' entry {t} has shape {tuple(a.shape)}, expected {want}")
        if not bool(torch.isfinite(a).all()):
            raise StateDictError(f"objective {name!r}: field 'anchor' entry {t} holds inf or nan")
        out.append(a.detach().to(device=device if device is not None else a.device).clone())
    return out
