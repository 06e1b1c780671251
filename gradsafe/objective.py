"""A protected objective: its configuration and its memory (basis, references, Fisher)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .fisher import empirical_fisher, online_fisher
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
SCOPES = ("global", "tensor")
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
        return [slice(o, o + n) for o, n in zip(self.offsets, self.numels)]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ProtectedObjective({self.name!r}, mode={c.mode!r}, scope={c.scope!r}, rank={c.rank}, "
            f"basis_rows={0 if self.basis is None else self.basis.shape[0]}, "
            f"tensors={len(self.coverage)}, entries={self.numel}, samples={self.num_samples})"
        )

    # ------------------------------------------------------------------ memory updates
    def _merge(self, S: torch.Tensor, fresh: bool) -> None:
        cfg = self.config
        N = self.numel
        if self.basis is None or fresh:
            basis = S.new_zeros(0, N)
            energies = S.new_zeros(0) if cfg.scope == "global" else S.new_zeros(len(self.coverage), 0)
        else:
            basis, energies = self.basis, self.energies
        if cfg.scope == "global":
            keep = energies > 0
            new_b, new_e = merge_basis(basis[keep], energies[keep], S, rank=cfg.rank, energy=cfg.energy)
            self.basis = S.new_zeros(max(1, new_b.shape[0]), N)
            self.basis[: new_b.shape[0]] = new_b
            self.energies = S.new_zeros(self.basis.shape[0])
            self.energies[: new_e.shape[0]] = new_e
        else:
            parts = []
            for t, sl in enumerate(self.slices()):
                e_t = energies[t] if energies.shape[1] else energies.new_zeros(0)
                keep = e_t > 0
                parts.append(
                    merge_basis(
                        basis[: e_t.shape[0], sl][keep], e_t[keep], S[:, sl], rank=cfg.rank, energy=cfg.energy
                    )
                )
            k = max(1, max(b.shape[0] for b, _ in parts))
            self.basis = S.new_zeros(k, N)
            self.energies = S.new_zeros(len(parts), k)
            for t, (sl, (b, e)) in enumerate(zip(self.slices(), parts)):
                self.basis[: b.shape[0], sl] = b
                self.energies[t, : e.shape[0]] = e

        m = S.shape[0]
        if self.mean_ref is None or fresh:
            mean_ref = S.mean(dim=0)
            self.num_samples = m
        else:
            total = self.num_samples + m
            mean_ref = self.mean_ref * (self.num_samples / total) + S.sum(dim=0) / total
            self.num_samples = total
        sample_refs = None
        if cfg.references == "samples":
            prev = self.sample_refs if (self.sample_refs is not None and not fresh) else S.new_zeros(0, N)
            sample_refs = torch.cat([prev, S])[-cfg.rank :]
        self._pack(self.basis, mean_ref, sample_refs)
        self.fisher = online_fisher(self.fisher, empirical_fisher(S), cfg.fisher_decay)
        self.version += 1

    def _pack(self, basis: torch.Tensor, mean_ref: torch.Tensor, sample_refs: torch.Tensor | None) -> None:
        """Store basis, mean reference and kept samples as row views of one (k + 1 + m, N) tensor.

        The step reads contiguous row ranges of this storage (see ``direction_rows``), so
        the plan never copies an objective's memory.
        """
        rows = [basis, mean_ref[None]] + ([sample_refs] if sample_refs is not None else [])
        storage = torch.cat(rows).to(torch.float32).contiguous()
        k = basis.shape[0]
        self._storage = storage
        self.basis = storage[:k]
        self.mean_ref = storage[k]
        self.sample_refs = storage[k + 1 :] if sample_refs is not None else None

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
        }

    @classmethod
    def from_state_dict(cls, name: str, state: dict[str, Any], device: torch.device | None = None) -> "ProtectedObjective":
        obj = cls(name, ObjectiveConfig(**state["config"]), state["coverage"], state["shapes"])

        def load(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32).clone()

        obj._pack(load(state["basis"]), load(state["mean_ref"]), load(state["sample_refs"]))
        obj.energies = load(state["energies"])
        obj.fisher = load(state["fisher"])
        obj.num_samples = int(state["num_samples"])
        obj.num_refreshes = int(state["num_refreshes"])
        obj.had_closure = bool(state["had_closure"])
        obj.last_refresh_step = int(state["last_refresh_step"])
        obj.last_check_step = int(state["last_check_step"])
        obj.loss_at_refresh = state["loss_at_refresh"]
        obj.predicted_since_refresh = float(state["predicted_since_refresh"])
        obj.staleness = state["staleness"]
        obj.version = 1
        return obj
