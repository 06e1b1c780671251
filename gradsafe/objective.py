"""A protected objective: its configuration and its memory (basis, references, Fisher)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .factored import SIDES, FactorMemory, matrix_shape, merge_factors
from .fisher import empirical_fisher, online_fisher
from .sharding import ShardSpec, full, is_dtensor, local
from .surgery import normalize_fisher
from .subspace import merge_basis

__all__ = [
    "MODES",
    "SCOPES",
    "REFERENCES",
    "ObjectiveConfig",
    "ProtectedObjective",
    "pack_samples",
    "normalize_samples",
]

MODES = ("project", "conflict", "observe")
SCOPES = ("global", "tensor", "factored")
REFERENCES = ("mean", "samples")

Sample = Sequence["torch.Tensor | None"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """How an objective is protected. Validated on construction."""

    mode: str = "project"
    rank: int = 16
    scope: str = "global"
    strength: float = 1.0
    damping: float = 0.0
    references: str = "mean"
    refresh_every: int | str | None = None
    energy: float = 1.0
    fisher_decay: float = 0.5
    sides: str = "both"
    memory_budget: int | float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; expected one of {SCOPES}")
        if self.references not in REFERENCES:
            raise ValueError(f"unknown references {self.references!r}; expected one of {REFERENCES}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (isinstance(self.strength, (int, float)) and 0.0 <= self.strength <= 1.0):
            raise ValueError(f"strength must be a number in [0, 1], got {self.strength!r}")
        if self.mode == "conflict" and self.strength != 1.0:
            raise ValueError("strength applies to mode='project' only; conflict constraints are exact")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if self.refresh_every is not None and self.refresh_every != "auto":
            if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int):
                raise TypeError(f"refresh_every must be an int, 'auto' or None, got {self.refresh_every!r}")
            if self.refresh_every < 1:
                raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0.0 <= self.fisher_decay < 1.0:
            raise ValueError(f"fisher_decay must be in [0, 1), got {self.fisher_decay}")
        if self.sides not in SIDES:
            raise ValueError(f"unknown sides {self.sides!r}; expected one of {SIDES}")
        if self.scope == "factored" and self.mode == "conflict" and self.references == "samples":
            raise ValueError(
                "scope='factored' keeps one (projected) mean reference per objective; "
                "references='samples' needs scope 'global' or 'tensor'"
            )
        budget = self.memory_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise TypeError(f"memory_budget must be bytes (int), a fraction (float) or None, got {budget!r}")
            if isinstance(budget, int) and budget < 1:
                raise ValueError(f"memory_budget in bytes must be >= 1, got {budget}")
            if isinstance(budget, float) and not 0.0 < budget <= 1.0:
                raise ValueError(f"memory_budget as a fraction of the parameters' bytes must be in (0, 1], got {budget}")

    @property
    def acts(self) -> bool:
        """Whether the objective changes the gradient (besides damping)."""
        return self.mode == "conflict" or (self.mode == "project" and self.strength > 0)


def _check_tensor(t: Any, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{where}: sparse gradients are not supported")
    if t.is_complex():
        raise TypeError(f"{where}: complex gradients are not supported")
    return t


def normalize_samples(value: Any, name: str) -> list[list[torch.Tensor | None]]:
    """Accept one sample (a sequence of tensors/None) or a sequence of samples."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"protected gradients for {name!r} must be a sequence of tensors (one sample, aligned "
            f"with the optimizer's parameters) or a sequence of such samples, got {type(value).__name__}"
        )
    first = next((v for v in value if v is not None), None)
    if first is None:
        raise ValueError(f"protected gradients for {name!r} are empty")
    if isinstance(first, torch.Tensor):
        return [list(value)]
    samples = []
    for i, s in enumerate(value):
        if isinstance(s, torch.Tensor) or not isinstance(s, Sequence):
            raise TypeError(f"sample {i} of {name!r} must be a sequence of tensors, got {type(s).__name__}")
        samples.append(list(s))
    if not samples:
        raise ValueError(f"protected gradients for {name!r} are empty")
    return samples


def pack_samples(
    samples: list[list[torch.Tensor | None]],
    params: Sequence[torch.Tensor],
    name: str,
    coverage: Sequence[int] | None = None,
    allow_zero: bool = False,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """Validate samples against the parameters and pack them into an ``(m, N)`` fp32 matrix.

    The coverage (parameter indices) is the union of parameters any sample gives a gradient
    for, unless ``coverage`` fixes it; a covered parameter missing from a sample counts as 0.
    """
    for si, sample in enumerate(samples):
        # FSDP2 gradients (DTensors) are gathered whole: memory is merged whole on every rank
        sample[:] = [full(t) if is_dtensor(t) else t for t in sample]
        if len(sample) != len(params):
            raise ValueError(
                f"sample {si} of {name!r} has {len(sample)} entries but the optimizer has "
                f"{len(params)} parameters (give None for a parameter the objective does not cover)"
            )
        for i, t in enumerate(sample):
            if t is None:
                continue
            _check_tensor(t, f"objective {name!r}, sample {si}, parameter {i}")
            if t.shape != params[i].shape:
                raise ValueError(
                    f"objective {name!r}, sample {si}: gradient for parameter {i} has shape "
                    f"{tuple(t.shape)} but the parameter has shape {tuple(params[i].shape)}"
                )
    if coverage is None:
        coverage = tuple(i for i in range(len(params)) if any(s[i] is not None for s in samples))
    else:
        coverage = tuple(coverage)
        covered = set(coverage)
        for si, sample in enumerate(samples):
            extra = [i for i, t in enumerate(sample) if t is not None and i not in covered]
            if extra:
                raise ValueError(
                    f"sample {si} of {name!r} gives gradients for parameters {extra} that the "
                    "objective did not cover when it was registered"
                )
    if not coverage:
        raise ValueError(f"objective {name!r} covers no parameter (every entry is None)")
    devices = {params[i].device for i in coverage}
    if len(devices) > 1:
        raise ValueError(f"objective {name!r} covers parameters on several devices {devices}; not supported")
    device = devices.pop()
    n_total = sum(params[i].numel() for i in coverage)
    S = torch.zeros(len(samples), n_total, dtype=torch.float32, device=device)
    for si, sample in enumerate(samples):
        off = 0
        for i in coverage:
            n = params[i].numel()
            if sample[i] is not None:
                S[si, off : off + n] = sample[i].detach().reshape(-1).to(device=device, dtype=torch.float32)
            off += n
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"protected gradients for objective {name!r} contain inf or nan")
    norms = S.norm(dim=1)
    if not allow_zero and bool((norms == 0).any()):
        bad = int(torch.nonzero(norms == 0)[0])
        raise ValueError(f"sample {bad} of objective {name!r} has zero norm over the parameters it covers")
    return coverage, S


class ProtectedObjective:
    """A named thing to keep, with its memory.

    Memory, all float32 on the covered parameters' device, over the N covered entries packed
    in coverage order:

    - ``basis`` (rank, N): for scope "global", orthonormal rows; for scope "tensor", each
      parameter's slice has its own orthonormal rows (zero rows pad a slice whose rank is
      lower), with energies ``energies`` ((rank,) or (tensors, rank));
    - ``mean_ref`` (N,): the mean of all samples, the oriented reference (A-GEM, SafeGrad);
    - ``sample_refs`` (m, N): the most recent ``rank`` samples, kept with references="samples";
    - ``fisher`` (N,): the online-averaged mean of squared samples.
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
        self.coverage = tuple(coverage)
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.numels = tuple(math.prod(s) for s in self.shapes)
        self.offsets = tuple(sum(self.numels[:i]) for i in range(len(self.numels)))
        self.closure = closure
        # scope "factored": matrices (2-D and up) get factored memory, keyed by their index
        # in the coverage; the rest (biases, norms) keep flat per-tensor rows
        if config.scope == "factored":
            self.flat_index = tuple(t for t, s in enumerate(self.shapes) if len(s) < 2)
        else:
            self.flat_index = tuple(range(len(self.shapes)))
        # FSDP2: the memory holds only this rank's rows of each covered tensor
        self.shard: ShardSpec | None = None
        self.fisher_mean: float | None = None  # the global mean of a sharded Fisher
        self._relayout()
        self.factors: dict[int, FactorMemory] = {}
        self.fixed_factors: set[int] = set()  # factors given as bases, not learnt from samples
        self.param_bytes = 4 * self.numel  # the covered parameters' own bytes (set by the optimizer)
        self.keeps_fisher = config.scope != "factored" or config.damping > 0
        self.basis: torch.Tensor | None = None
        self.energies: torch.Tensor | None = None
        self.mean_ref: torch.Tensor | None = None
        self.sample_refs: torch.Tensor | None = None
        self._storage: torch.Tensor | None = None
        self.fisher: torch.Tensor | None = None
        self.num_samples = 0
        self.num_refreshes = 0
        self.had_closure = closure is not None
        self.version = 0
        # refresh bookkeeping (closure objectives): when, the protected loss then, the
        # first-order change predicted since, and the last measured staleness
        self.last_refresh_step = 0
        self.last_check_step = 0
        self.loss_at_refresh: float | None = None
        self.predicted_since_refresh = 0.0
        self.staleness: float | None = None

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def has_closure(self) -> bool:
        return self.closure is not None

    def slices(self) -> list[slice]:
        """Each covered tensor's columns in packed samples (and in the Fisher)."""
        return [slice(o, o + n) for o, n in zip(self.offsets, self.numels)]

    def _relayout(self) -> None:
        mem = [self.shard.local_numel(t) for t in range(len(self.shapes))] if self.shard else list(self.numels)
        self.mem_numels = tuple(mem)
        self.mem_offsets = tuple(sum(mem[:i]) for i in range(len(mem)))
        flat_numels = [mem[t] for t in self.flat_index]
        self.flat_offsets = tuple(sum(flat_numels[:i]) for i in range(len(flat_numels)))
        self.flat_numel = sum(flat_numels)

    def flat_slices(self) -> list[slice]:
        """Each flat-memory tensor's columns in the row storage (``flat_index`` order)."""
        return [slice(o, o + self.mem_numels[t]) for o, t in zip(self.flat_offsets, self.flat_index)]

    def memory_slices(self) -> list[slice]:
        """Each covered tensor's entries in the Fisher diagonal (this rank's part when sharded)."""
        return [slice(o, o + n) for o, n in zip(self.mem_offsets, self.mem_numels)]

    def normalized_fisher(self) -> torch.Tensor:
        """The Fisher scaled to mean 1 over all covered entries (of all ranks when sharded)."""
        if self.shard is None:
            return normalize_fisher(self.fisher)
        return self.fisher / max(float(self.fisher_mean or 0.0), 1e-30)

    # ------------------------------------------------------------------ sharding (FSDP2)
    def shard_to(self, spec: ShardSpec) -> None:
        """Keep only this rank's part of the memory (see ``gradsafe.sharding``)."""
        if self.shard is not None:
            raise RuntimeError(f"objective {self.name!r} is already sharded")
        flat = self.flat_slices()
        cols = [spec.cols(t) for t in range(len(self.shapes))]
        if self._storage is not None:
            parts = [self._storage[:, sl][:, cols[t]] for sl, t in zip(flat, self.flat_index)]
            storage = torch.cat(parts, dim=1) if parts else self._storage[:, :0]
            self._set_storage(storage.contiguous(), self.basis.shape[0], self.sample_refs is not None)
        if self.fisher is not None:
            self.fisher_mean = float(self.fisher.double().mean()) if self.fisher.numel() else 0.0
            self.fisher = torch.cat([self.fisher[sl][cols[t]] for t, sl in enumerate(self.slices())]).contiguous()
        for t, fm in list(self.factors.items()):
            off, n = spec.rows(t)
            self.factors[t] = FactorMemory(fm.shape, fm.left[:, off : off + n].contiguous(), fm.left_energy, fm.right,
                                           fm.right_energy, fm.ref_left, fm.ref_right[off : off + n].contiguous())
        self.shard = spec
        self._relayout()

    def unshard(self) -> ShardSpec | None:
        """Gather the whole memory on every rank (a collective); returns the spec it had."""
        spec = self.shard
        if spec is None:
            return None
        if self._storage is not None:
            R = self._storage.shape[0]
            parts = []
            for sl, t in zip(self.flat_slices(), self.flat_index):
                piece = self._storage[:, sl].reshape(R, spec.rows(t)[1], spec.row_numel(t))
                parts.append(spec.gather_rows(piece, t, dim=1).reshape(R, -1))
            storage = torch.cat(parts, dim=1) if parts else self._storage
            self._set_storage(storage.contiguous(), self.basis.shape[0], self.sample_refs is not None)
        if self.fisher is not None:
            self.fisher = torch.cat([
                spec.gather_rows(self.fisher[sl].reshape(spec.rows(t)[1], spec.row_numel(t)), t, dim=0).reshape(-1)
                for t, sl in enumerate(self.memory_slices())
            ])
            self.fisher_mean = None
        for t, fm in list(self.factors.items()):
            self.factors[t] = FactorMemory(fm.shape, spec.gather_rows(fm.left, t, dim=1), fm.left_energy, fm.right,
                                           fm.right_energy, fm.ref_left, spec.gather_rows(fm.ref_right, t, dim=0))
        self.shard = None
        self._relayout()
        return spec

    def _set_storage(self, storage: torch.Tensor, k: int, has_samples: bool) -> None:
        self._storage = storage
        self.basis = storage[:k]
        self.mean_ref = storage[k]
        self.sample_refs = storage[k + 1 :] if has_samples else None

    def flat_part(self, S: torch.Tensor) -> torch.Tensor:
        """The columns of packed samples ``S`` that flat memory covers."""
        if len(self.flat_index) == len(self.shapes):
            return S
        sl = self.slices()
        return torch.cat([S[:, sl[t]] for t in self.flat_index], dim=1) if self.flat_index else S[:, :0]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ProtectedObjective({self.name!r}, mode={c.mode!r}, scope={c.scope!r}, rank={c.rank}, "
            f"basis_rows={0 if self.basis is None else self.basis.shape[0]}, "
            f"tensors={len(self.coverage)}, entries={self.numel}, samples={self.num_samples})"
        )

    # ------------------------------------------------------------------ memory updates
    def _merge(self, S: torch.Tensor, fresh: bool) -> None:
        spec = self.unshard()  # a sharded memory merges whole, on every rank alike
        self._merge_whole(S, fresh)
        if spec is not None:
            self.shard_to(spec)

    def _merge_whole(self, S: torch.Tensor, fresh: bool) -> None:
        cfg = self.config
        prev_count = 0 if fresh else self.num_samples
        if cfg.scope == "factored":
            sl = self.slices()
            for t, shape in enumerate(self.shapes):
                if t in self.flat_index:
                    continue
                m, n = matrix_shape(shape)
                samples = S[:, sl[t]].reshape(S.shape[0], m, n)
                if t in self.fixed_factors:  # given bases (activations): only the reference moves
                    self.factors[t] = self.factors[t].with_mean(samples, prev_count)
                    continue
                self.factors[t] = merge_factors(
                    None if fresh else self.factors.get(t),
                    samples,
                    sides=cfg.sides,
                    rank=cfg.rank,
                    energy=cfg.energy,
                    prev_count=prev_count,
                )
        F = self.flat_part(S)
        N = self.flat_numel
        if self.basis is None or fresh:
            basis = F.new_zeros(0, N)
            energies = F.new_zeros(0) if cfg.scope == "global" else F.new_zeros(len(self.flat_index), 0)
        else:
            basis, energies = self.basis, self.energies
        if cfg.scope == "global":
            keep = energies > 0
            new_b, new_e = merge_basis(basis[keep], energies[keep], F, rank=cfg.rank, energy=cfg.energy)
            self.basis = F.new_zeros(max(1, new_b.shape[0]), N)
            self.basis[: new_b.shape[0]] = new_b
            self.energies = F.new_zeros(self.basis.shape[0])
            self.energies[: new_e.shape[0]] = new_e
        else:
            parts = []
            for t, sl in enumerate(self.flat_slices()):
                e_t = energies[t] if energies.shape[1] else energies.new_zeros(0)
                keep = e_t > 0
                parts.append(
                    merge_basis(
                        basis[: e_t.shape[0], sl][keep], e_t[keep], F[:, sl], rank=cfg.rank, energy=cfg.energy
                    )
                )
            k = max([1] + [b.shape[0] for b, _ in parts])
            self.basis = F.new_zeros(k, N)
            self.energies = F.new_zeros(len(parts), k)
            for t, (sl, (b, e)) in enumerate(zip(self.flat_slices(), parts)):
                self.basis[: b.shape[0], sl] = b
                self.energies[t, : e.shape[0]] = e

        m = F.shape[0]
        if self.mean_ref is None or fresh:
            mean_ref = F.mean(dim=0)
            self.num_samples = m
        else:
            total = self.num_samples + m
            mean_ref = self.mean_ref * (self.num_samples / total) + F.sum(dim=0) / total
            self.num_samples = total
        sample_refs = None
        if cfg.references == "samples":
            prev = self.sample_refs if (self.sample_refs is not None and not fresh) else F.new_zeros(0, N)
            sample_refs = torch.cat([prev, F])[-cfg.rank :]
        self._pack(self.basis, mean_ref, sample_refs)
        if self.keeps_fisher:
            self.fisher = online_fisher(self.fisher, empirical_fisher(S), cfg.fisher_decay)
        if cfg.memory_budget is not None:
            from .memory import apply_budget

            apply_budget(self)
        self.version += 1

    def _pack(self, basis: torch.Tensor, mean_ref: torch.Tensor, sample_refs: torch.Tensor | None) -> None:
        """Store basis, mean reference and kept samples as row views of one (k + 1 + m, N) tensor.

        The step reads contiguous row ranges of this storage (see ``direction_rows``), so
        the plan never copies an objective's memory.
        """
        rows = [basis, mean_ref[None]] + ([sample_refs] if sample_refs is not None else [])
        storage = torch.cat(rows).to(torch.float32).contiguous()
        self._set_storage(storage, basis.shape[0], sample_refs is not None)

    def set_bases(self, factors: dict[int, FactorMemory]) -> None:
        """Start a factored objective from given bases (``t`` = index in the coverage), no samples.

        The flat part (1-D tensors) starts empty; gradient samples merged later give the
        references and the Fisher, and the flat part's bases, but leave these bases as they are.
        """
        if self.config.scope != "factored":
            raise ValueError("bases can be given only to scope='factored' objectives")
        for t, fm in factors.items():
            if t in self.flat_index:
                raise ValueError(f"objective {self.name!r}: parameter {self.coverage[t]} is 1-D; it has no factored basis")
            if fm.shape != matrix_shape(self.shapes[t]):
                raise ValueError(f"objective {self.name!r}: basis for parameter {self.coverage[t]} is for a {fm.shape} matrix, "
                                 f"the parameter is viewed as {matrix_shape(self.shapes[t])}")
        self.factors = dict(factors)
        self.fixed_factors = set(factors)
        device = next(iter(factors.values())).left.device if factors else torch.device("cpu")
        N = self.flat_numel
        self.energies = torch.zeros(len(self.flat_index), 1, device=device)
        self._pack(torch.zeros(1, N, device=device), torch.zeros(N, device=device), None)
        if self.keeps_fisher:
            self.fisher = torch.zeros(self.numel, device=device)
        self.num_samples = 0
        if self.config.memory_budget is not None:
            from .memory import apply_budget

            apply_budget(self)
        self.version += 1

    def add_samples(self, S: torch.Tensor) -> None:
        """Merge packed samples ``S`` (m, N) into the memory (basis union, running mean, online Fisher)."""
        self._check_packed(S)
        self._merge(S, fresh=False)

    def refresh(self, S: torch.Tensor) -> None:
        """Replace basis and references by those of the fresh samples; Fisher keeps its online average."""
        self._check_packed(S)
        self._merge(S, fresh=True)
        self.num_refreshes += 1

    def _check_packed(self, S: torch.Tensor) -> None:
        if S.ndim != 2 or S.shape[1] != self.numel:
            raise ValueError(f"objective {self.name!r}: packed samples must be (m, {self.numel}), got {tuple(S.shape)}")
        if not bool(torch.isfinite(S).all()):
            raise ValueError(f"protected gradients for objective {self.name!r} contain inf or nan")

    # ------------------------------------------------------------------ views used by the step
    def direction_rows(self) -> tuple[torch.Tensor, int, int, int]:
        """The rows the step reads (a view, no copy) and how they split: ``(D, n_basis, 1, n_refs)``.

        Rows are ordered basis, mean reference, kept samples. project / observe read the basis
        and the mean reference; conflict reads the mean reference (its constraint with
        references="mean") and, with references="samples", the kept samples (the constraints).
        """
        assert self.basis is not None and self.mean_ref is not None
        k = self.basis.shape[0]
        if self.config.mode == "conflict":
            m = self.sample_refs.shape[0] if self.config.references == "samples" else 0
            return self._storage[k : k + 1 + m], 0, 1, m
        return self._storage[: k + 1], k, 1, 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "config": asdict(self.config),
            "coverage": list(self.coverage),
            "shapes": [list(s) for s in self.shapes],
            "basis": self.basis,
            "energies": self.energies,
            "mean_ref": self.mean_ref,
            "sample_refs": self.sample_refs,
            "fisher": self.fisher,
            "num_samples": self.num_samples,
            "num_refreshes": self.num_refreshes,
            "had_closure": self.closure is not None,
            "last_refresh_step": self.last_refresh_step,
            "last_check_step": self.last_check_step,
            "loss_at_refresh": self.loss_at_refresh,
            "predicted_since_refresh": self.predicted_since_refresh,
            "staleness": self.staleness,
            "factors": {str(t): fm.state_dict() for t, fm in self.factors.items()},
            "fixed_factors": sorted(self.fixed_factors),
            "param_bytes": self.param_bytes,
            **(self._sharded_state() if self.shard is not None else {}),
        }

    def _sharded_state(self) -> dict[str, Any]:
        """Sharded memory as DTensors (what ``torch.distributed.checkpoint`` saves per rank)."""
        spec = self.shard
        R = self._storage.shape[0]
        rows = [
            spec.dtensor(self._storage[:, sl].reshape(R, spec.rows(t)[1], *self.shapes[t][1:]), 1, (R, *self.shapes[t]))
            for sl, t in zip(self.flat_slices(), self.flat_index)
        ]
        fisher = None
        if self.fisher is not None:
            fisher = [spec.dtensor(self.fisher[sl].reshape(spec.rows(t)[1], *self.shapes[t][1:]), 0, self.shapes[t])
                      for t, sl in enumerate(self.memory_slices())]
        factors = {}
        for t, fm in self.factors.items():
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
                "num_basis": self.basis.shape[0],
                "has_samples": self.sample_refs is not None,
                "fisher": fisher,
                "fisher_mean": self.fisher_mean,
            },
        }

    @classmethod
    def from_state_dict(
        cls, name: str, state: dict[str, Any], device: torch.device | None = None, shard: ShardSpec | None = None
    ) -> "ProtectedObjective":
        """Rebuild an objective; ``shard``: the parameters' sharding (FSDP2) in this process."""
        obj = cls(name, ObjectiveConfig(**state["config"]), state["coverage"], state["shapes"])
        sharded = state.get("sharded")
        if sharded is not None and shard is None:
            raise ValueError(
                f"objective {name!r} was saved sharded (FSDP2); load it into an optimizer over the same "
                "sharded parameters (or save with the parameters unsharded)"
            )

        def load(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = local(t)  # a DTensor loaded by torch.distributed.checkpoint: this rank's rows
            return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32).clone()

        # a DTensor (torch.distributed.checkpoint) gives this rank's rows; from_state_dict copies
        obj.factors = {int(t): FactorMemory.from_state_dict({k: local(v) if isinstance(v, torch.Tensor) else v for k, v in f.items()}, device)
                       for t, f in state.get("factors", {}).items()}
        if sharded is None:
            obj._pack(load(state["basis"]), load(state["mean_ref"]), load(state["sample_refs"]))
            obj.fisher = load(state["fisher"])
        else:
            obj.shard = shard
            obj._relayout()
            rows = [load(r) for r in sharded["rows"]]
            R = int(sharded["num_rows"])
            storage = torch.cat([r.reshape(R, -1) for r in rows], dim=1) if rows else torch.zeros(R, 0, device=device)
            obj._set_storage(storage.contiguous(), int(sharded["num_basis"]), bool(sharded["has_samples"]))
            obj.fisher = None if sharded["fisher"] is None else torch.cat([load(f).reshape(-1) for f in sharded["fisher"]])
            obj.fisher_mean = sharded["fisher_mean"]
        obj.energies = load(state["energies"])
        obj.num_samples = int(state["num_samples"])
        obj.num_refreshes = int(state["num_refreshes"])
        obj.had_closure = bool(state["had_closure"])
        obj.last_refresh_step = int(state["last_refresh_step"])
        obj.last_check_step = int(state["last_check_step"])
        obj.loss_at_refresh = state["loss_at_refresh"]
        obj.predicted_since_refresh = float(state["predicted_since_refresh"])
        obj.staleness = state["staleness"]
        obj.fixed_factors = set(state.get("fixed_factors", []))
        obj.param_bytes = int(state.get("param_bytes", obj.param_bytes))
        if shard is not None and sharded is None:  # saved whole, loaded into sharded parameters
            obj.shard_to(shard)
        obj.version = 1
        return obj
