"""Protected losses to give ``protect(..., closure=...)``.

``kl_to_reference`` is SafeGrad's alignment loss (Yi et al. 2025, "Gradient Surgery for Safe
LLM Fine-Tuning", arXiv:2508.07172): the KL divergence ``KL(P_ref || P_theta)`` from the frozen
aligned model's predictive distribution to the model's, on a fixed set of alignment batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .fisher import logits_of

__all__ = ["kl_to_reference"]


def kl_to_reference(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    temperature: float = 1.0,
) -> Callable[[], torch.Tensor]:
    """A zero-argument closure returning the mean KL divergence from ``reference`` to ``model``.

    For logits of shape ``(..., V)`` (a tensor output, or the ``.logits`` of a Hugging Face
    output) each row's divergence is ``sum_v p_ref log(p_ref / p_theta)`` with ``p =
    softmax(logits / temperature)``; the loss is the mean over every row of every batch, the
    rows an ``attention_mask`` in a dict batch sets to 0 left out. A batch is a tensor, passed
    as ``model(batch)``, or a dict, passed as ``model(**batch)`` without its ``labels`` (the KL
    does not use them).

    The reference runs once per batch, under ``torch.no_grad()``, on the closure's first call
    (``protect`` makes it: the reference log-probabilities are those of the aligned model
    when the objective is registered); they are cached on the reference's device, and the
    closure then drops its handle on the reference, so a copy made only for it (e.g.
    ``copy.deepcopy(model).eval()``) is freed once nothing else holds it. The cache holds the
    kept rows' log-probabilities, in at least float32 (rows x V values). Only ``model`` gets a
    gradient.
    """
    if reference is model:
        raise ValueError(
            "kl_to_reference: the reference is the model itself; pass a frozen copy of the aligned "
            "model (e.g. copy.deepcopy(model).eval())"
        )
    for who, module in (("model", model), ("reference", reference)):
        if not callable(module):
            raise TypeError(f"kl_to_reference: {who} must be callable (a torch.nn.Module), got {type(module).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("kl_to_reference: no batches (the alignment data is empty)")
    for index, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise TypeError(f"kl_to_reference: batch {index} is a {type(batch).__name__}; expected a tensor or a dict")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"kl_to_reference: temperature must be a positive finite number, got {temperature!r}")
    held: dict[str, torch.nn.Module] = {"reference": reference}
    cached: list[_Reference] = []
    rows: list[int] = []

    def alignment_kl() -> torch.Tensor:
        if not cached:
            cached.extend(_reference_log_probs(held["reference"], batches, temperature))
            del held["reference"]
            rows.append(sum(ref.log_probs.shape[0] for ref in cached))
            if rows[0] == 0:
                raise ValueError("kl_to_reference: every row of the batches is masked out (attention_mask is all 0)")
        total = None
        for index, (batch, ref) in enumerate(zip(batches, cached)):
            logits = logits_of(_forward(model, batch), "the model")
            if tuple(logits.shape) != ref.shape:
                raise ValueError(
                    f"kl_to_reference: batch {index}: the model's logits have shape {tuple(logits.shape)}, "
                    f"the reference's {ref.shape}"
                )
            logits = logits.reshape(-1, logits.shape[-1])
            if ref.keep is not None:
                logits = logits[ref.keep.to(logits.device)]
            log_probs = (logits.to(_at_least_float32(logits.dtype)) / temperature).log_softmax(-1)
            ref_log_probs = ref.log_probs.to(log_probs.device, log_probs.dtype)
            ref_probs = ref_log_probs.exp()
            # p_ref = 0 contributes 0 (p log p -> 0), also where log p_ref is -inf
            terms = torch.where(ref_probs > 0, ref_probs * (ref_log_probs - log_probs), torch.zeros_like(ref_probs))
            total = terms.sum() if total is None else total + terms.sum()
        return total / rows[0]

    return alignment_kl


@dataclass(frozen=True)
class _Reference:
    """One batch's cached reference: the log-probabilities of its kept rows ``(K, V)``, on the
    reference's device; the logits' full shape; the kept rows of the flattened logits (None: all)."""

    log_probs: torch.Tensor
    shape: tuple[int, ...]
    keep: torch.Tensor | None


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _forward(module: torch.nn.Module, batch: torch.Tensor | Mapping[str, Any]) -> Any:
    if isinstance(batch, Mapping):
        return module(**{k: v for k, v in batch.items() if k != "labels"})
    return module(batch)


def _reference_log_probs(
    reference: torch.nn.Module, batches: list[torch.Tensor | Mapping[str, Any]], temperature: float
) -> list[_Reference]:
    """Per batch, the reference's log-probabilities at the rows that count (masked rows are not kept)."""
    out = []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            logits = logits_of(_forward(reference, batch), "the reference")
            if logits.dim() < 1 or logits.shape[-1] == 0:
                raise ValueError(f"kl_to_reference: batch {index}: the reference's logits have shape {tuple(logits.shape)}")
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            flat = logits.reshape(-1, logits.shape[-1])
            keep = None
            if mask is not None:
                if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:-1]):
                    shape = tuple(getattr(mask, "shape", ()))
                    raise ValueError(
                        f"kl_to_reference: batch {index}: attention_mask of shape {shape} does not match the "
                        f"logits' rows {tuple(logits.shape[:-1])}"
                    )
                keep = (mask != 0).reshape(-1).to(logits.device)
                flat = flat[keep]
            log_probs = (flat.to(_at_least_float32(flat.dtype)) / temperature).log_softmax(-1)
            out.append(_Reference(log_probs=log_probs, shape=tuple(logits.shape), keep=keep))
    return out
