"""What a ProtectedOptimizer keeps in memory and moves per step, measured and by formula.

Measured values are the real bytes of the tensors an objective holds (its row storage
``[basis; mean reference; kept samples]``, its Fisher diagonal, its basis energies); the
formula is the one docs/scaling.md extrapolates with:

    rows of one objective:  (k + 1 + m) * N * 4 bytes    (k basis rows, 1 mean, m kept samples)
    its Fisher diagonal:    N * 4 bytes
    coefficients per step:  sum over objectives of T_o * r_o, plus T, float32 numbers
                            (r_o = k + 1 for project/observe, 1 + m for conflict)

N is the number of parameter entries the objective covers, T the number of tensors.
This module only reads public attributes of gradsafe; it is used by
``finetune_causal_lm.py`` and ``scaling_table.py`` and tested in tests/distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ObjectiveBytes",
    "objective_bytes",
    "formula_bytes",
    "per_tensor_bytes",
    "tensor_bytes",
    "optimizer_state_bytes",
    "coefficient_floats",
    "memory_table",
    "human",
]

FP32 = 4


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the given tensors' elements (views count by their own extent)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class ObjectiveBytes:
    name: str
    entries: int  # N: covered parameter entries
    tensors: int  # T: covered parameter tensors
    basis_rows: int  # k
    sample_rows: int  # m
    basis: int
    references: int  # mean reference + kept samples
    fisher: int
    other: int  # basis energies

    @property
    def total(self) -> int:
        return self.basis + self.references + self.fisher + self.other


def objective_bytes(opt) -> list[ObjectiveBytes]:
    """Measured bytes of every objective's memory (from the tensors it holds)."""
    out = []
    for name, obj in opt.objectives.items():
        m = 0 if obj.sample_refs is None else obj.sample_refs.shape[0]
        out.append(
            ObjectiveBytes(
                name=name,
                entries=obj.numel,
                tensors=len(obj.coverage),
                basis_rows=obj.basis.shape[0],
                sample_rows=m,
                basis=tensor_bytes([obj.basis]),
                references=tensor_bytes([obj.mean_ref, obj.sample_refs]),
                fisher=tensor_bytes([obj.fisher]),
                other=tensor_bytes([obj.energies]),
            )
        )
    return out


def formula_bytes(entries: int, k: int, m: int = 0) -> int:
    """Rows ``(k + 1 + m) * N`` plus the Fisher diagonal ``N``, in float32."""
    return (k + 1 + m) * entries * FP32 + entries * FP32


def per_tensor_bytes(opt) -> dict[int, int]:
    """Objective memory attributed to each parameter (index in ``param_groups`` order)."""
    out: dict[int, int] = {}
    for obj in opt.objectives.values():
        rows = obj.basis.shape[0] + 1 + (0 if obj.sample_refs is None else obj.sample_refs.shape[0])
        for i, n in zip(obj.coverage, obj.numels):
            out[i] = out.get(i, 0) + (rows + 1) * n * FP32
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(tensor_bytes(v for v in s.values()) for s in optimizer.state.values())


def coefficient_floats(opt) -> int:
    """Numbers the torch backend's coefficient pass produces per step (one host transfer)."""
    total, covered = 0, set()
    for obj in opt.objectives.values():
        k = obj.basis.shape[0]
        m = 0 if obj.sample_refs is None else obj.sample_refs.shape[0]
        if obj.config.mode == "conflict":
            r = 1 + (m if obj.config.references == "samples" else 0)
        else:
            r = k + 1
        total += r * len(obj.coverage)
        covered.update(obj.coverage)
    return total + len(covered)


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def memory_table(opt, names: Sequence[str] | None = None, per_tensor: bool = True) -> str:
    """A printable table: per objective and per parameter tensor, vs parameters and optimizer state.

    ``opt``: a ProtectedOptimizer (its base optimizer's state is measured as it is now; call
    after at least one step so that AdamW's moments exist). ``names``: parameter names in
    ``param_groups`` order (e.g. from ``model.named_parameters()``).
    """
    params = _params(opt)
    names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
    p_bytes = tensor_bytes(params)
    base = getattr(opt, "base_optimizer", opt)
    s_bytes = optimizer_state_bytes(base)
    objs = objective_bytes(opt)
    g_bytes = sum(o.total for o in objs)

    def ratio(a: int, b: int) -> str:
        return f"{a / b:.2f}x" if b else "-"

    lines = ["gradsafe memory table", ""]
    head = f"{'objective':<16}{'N':>11}{'T':>5}{'k':>4}{'m':>4}{'basis':>13}{'refs':>13}{'fisher':>13}{'total':>13}{'formula':>13}{'/params':>9}{'/adamw':>9}"
    lines += [head, "-" * len(head)]
    for o in objs:
        lines.append(
            f"{o.name[:15]:<16}{o.entries:>11}{o.tensors:>5}{o.basis_rows:>4}{o.sample_rows:>4}"
            f"{human(o.basis):>13}{human(o.references):>13}{human(o.fisher):>13}{human(o.total):>13}"
            f"{human(formula_bytes(o.entries, o.basis_rows, o.sample_rows)):>13}"
            f"{ratio(o.total, p_bytes):>9}{ratio(o.total, s_bytes):>9}"
        )
    lines += [
        "-" * len(head),
        f"{'all objectives':<16}{human(g_bytes):>13}",
        f"{'parameters':<16}{human(p_bytes):>13}   ({sum(p.numel() for p in params)} entries)",
        f"{'optimizer state':<16}{human(s_bytes):>13}   ({type(base).__name__})",
        f"gradsafe / parameters = {ratio(g_bytes, p_bytes)}; gradsafe / optimizer state = {ratio(g_bytes, s_bytes)}",
        f"coefficients per step: {coefficient_floats(opt)} float32 numbers (the one host transfer of the torch backend)",
    ]
    if per_tensor:
        per = per_tensor_bytes(opt)
        head2 = f"{'parameter':<40}{'shape':>16}{'params':>12}{'adamw':>12}{'gradsafe':>12}{'/params':>9}"
        lines += ["", head2, "-" * len(head2)]
        for i, (n, p) in enumerate(zip(names, params)):
            st = tensor_bytes(base.state[p].values()) if p in base.state else 0
            gb = per.get(i, 0)
            lines.append(
                f"{n[-39:]:<40}{str(tuple(p.shape)):>16}{human(tensor_bytes([p])):>12}{human(st):>12}"
                f"{human(gb):>12}{ratio(gb, tensor_bytes([p])):>9}"
            )
    return "\n".join(lines)
