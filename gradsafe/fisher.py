"""The diagonal Fisher information of a model's predictive distribution, four ways.

The four estimators that van de Ven (2025, "On the computation of the Fisher information in
continual learning", arXiv:2502.11756) compares, written ``g(x, y) = grad_theta log p(y | x)``:

- ``"exact"``: per example ``sum_y p(y | x) g(x, y)^2``, averaged over the examples;
- ``"sampled"``: per example ``g(x, y~)^2`` for one label ``y~ ~ p(. | x)`` drawn from the model;
- ``"empirical"``: per example ``g(x, y)^2`` for the true label ``y``;
- ``"batched"``: per batch the squared gradient of the batch-mean loss, averaged over the
  batches (what Avalanche's EWC computes, and what ``protect()`` builds its Fisher from when
  it is given per-batch gradient samples).

Conventions. Logits of shape ``(N, C)`` are a classification: example ``n`` has the label
``labels[n]``. Logits of shape ``(N, T, V)`` are a causal language model: position ``t``
predicts token ``t + 1`` (labels shifted by one; a label of -100 and a zero in the batch's
``attention_mask`` leave a target out), and an example is a whole sequence, whose
log-likelihood is the *sum* of its targets' log-likelihoods. For ``"exact"`` and
``"sampled"`` the targets are treated as drawn independently per position with the data's
own context (teacher forcing): under that factorisation the score's cross terms between
positions have zero mean, so the exact sequence Fisher is the sum over targets of the
per-token expectation over the vocabulary, ``sum_t sum_v p_t(v) g_t(v)^2``, which is what
``"exact"`` computes (it is not the Fisher of sequences sampled autoregressively).

Per-example gradients come from ``torch.func`` (``functional_call``, ``vmap``, ``grad``,
``vjp``), in chunks of ``chunk_size`` gradients. ``"exact"`` takes one forward pass and one
vector-Jacobian product per (example, outcome): ``C`` per example, ``(T - 1) V`` per sequence,
so it is practical for small label sets and tiny vocabularies only; ``"sampled"`` is an
unbiased estimate of it at the cost of ``"empirical"`` (one gradient per example).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call, grad, vjp, vmap

__all__ = ["fisher_diagonal", "FISHER_KINDS", "FisherKind"]

FisherKind = Literal["exact", "sampled", "empirical", "batched"]
FISHER_KINDS: tuple[str, ...] = ("exact", "sampled", "empirical", "batched")
IGNORE_INDEX = -100  # the label Hugging Face models leave out of their loss
_INPUT = "__input__"  # the key of a tuple batch's positional input among the vmapped tensors


@dataclass(frozen=True)
class _Batch:
    """One batch taken apart: the tensors to call the model with (example-major), the other
    keyword inputs, the targets and their weights (1 for a target that counts, 0 otherwise)."""

    inputs: dict[str, torch.Tensor]
    constants: dict[str, Any]
    targets: torch.Tensor | None  # (N, P) long, P = 1 (classification) or T - 1 (causal LM)
    weights: torch.Tensor  # (N, P)
    size: int
    n_classes: int


def fisher_diagonal(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    kind: FisherKind,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The diagonal Fisher information of ``model`` on ``batches``, one tensor per parameter.

    ``kind``: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"`` (module docstring).
    ``batches``: ``(inputs, labels)`` tuples (the model is called as ``model(inputs)``), or
    dicts in Hugging Face style (``input_ids``, optional ``attention_mask``, ``labels``,
    which default to ``input_ids``), called as ``model(**batch)`` without ``labels``; for
    ``"exact"`` and ``"sampled"`` a bare input tensor also works. Every tensor in a batch has
    the examples along its first dimension. The model's output is the logits or has
    ``.logits``. ``loss_fn(batch) -> scalar`` replaces, for ``"batched"`` only, the default
    batch-mean loss (the mean over examples of the negative log-likelihood above; pass
    ``lambda b: model(**b).loss`` for a Hugging Face model's per-token mean).
    ``params``: default ``[p for p in model.parameters() if p.requires_grad]``; the result is
    aligned with them, in their dtype (at least float32), usable as ``protect(...,
    fisher_diagonal=F)``. ``chunk_size``: how many parameter-sized gradients are held at once
    (for ``"exact"`` as many logits-sized cotangents too).
    ``generator``: the random source of ``"sampled"``, whose labels are drawn batch by batch
    as ``torch.multinomial(probs.reshape(-1, C), 1, generator=generator)`` from the model's
    probabilities at every target.

    The model runs in eval mode (dropout off), and its previous mode is restored. ``.grad``
    is never touched.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"fisher_diagonal: unknown kind {kind!r}; choose one of {', '.join(map(repr, FISHER_KINDS))}")
    if loss_fn is not None and kind != "batched":
        raise ValueError(
            f"fisher_diagonal: loss_fn is used by kind='batched' only; kind={kind!r} differentiates the "
            "log-likelihood of the model's logits"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("fisher_diagonal: loss_fn must be callable (batch -> scalar loss)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fisher_diagonal: chunk_size must be a positive integer, got {chunk_size!r}")
    names, tensors = _named_params(model, params)
    totals = [torch.zeros_like(p, dtype=_accumulate_dtype(p.dtype)) for p in tensors]
    count = 0
    with _eval_mode(model), torch.no_grad():
        for index, batch in enumerate(batches):
            if kind == "batched":
                squares = _batched_square(model, batch, index, loss_fn, tensors)
                count += 1
            else:
                squares, size = _per_example_squares(model, batch, index, kind, names, tensors, chunk_size, generator)
                count += size
            for total, square in zip(totals, squares):
                total.add_(square)
    if count == 0:
        raise ValueError(f"fisher_diagonal(kind={kind!r}) got no examples (empty batches)")
    fisher = [total / count for total in totals]
    for name, f in zip(names, fisher):
        if not torch.isfinite(f).all():
            raise ValueError(f"fisher_diagonal(kind={kind!r}): the Fisher of parameter {name!r} is not finite")
    return fisher


# ----------------------------------------------------------------------------- set-up


def _named_params(model: torch.nn.Module, params: Sequence[torch.Tensor] | None) -> tuple[list[str], list[torch.Tensor]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fisher_diagonal: model must be a torch.nn.Module, got {type(model).__name__}")
    by_id = {id(p): name for name, p in model.named_parameters()}
    tensors = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not tensors:
        raise ValueError("fisher_diagonal: no parameters (none given, or none of the model's requires grad)")
    names = []
    for i, p in enumerate(tensors):
        if id(p) not in by_id:
            raise ValueError(f"fisher_diagonal: params[{i}] is not a parameter of the model")
        if not p.dtype.is_floating_point:
            raise TypeError(f"fisher_diagonal: parameter {by_id[id(p)]!r} is not floating point ({p.dtype})")
        names.append(by_id[id(p)])
    if len(set(names)) != len(names):
        raise ValueError("fisher_diagonal: a parameter is given twice in params")
    return names, tensors


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def logits_of(output: Any, who: str = "the model") -> torch.Tensor:
    """The logits of a model output: the tensor itself, or its ``.logits``."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{who} returned a {type(output).__name__}: expected logits, or an output with .logits")
    return logits


def _call(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], constants: Mapping[str, Any]) -> Any:
    if _INPUT in inputs:
        return model(inputs[_INPUT])
    return model(**constants, **inputs)


def _position_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at the targets: ``(N, 1, C)`` for ``(N, C)`` logits, ``(N, T - 1, V)`` for ``(N, T, V)``."""
    logits = logits.to(_accumulate_dtype(logits.dtype))
    if logits.dim() == 2:
        return logits.log_softmax(-1).unsqueeze(1)
    return logits[:, :-1].log_softmax(-1)


def _unpack(batch: Any, index: int, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """The model's example-major tensor inputs, its other keyword inputs, the labels and the attention mask."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in batch.items() if k != "labels" and not isinstance(v, torch.Tensor)}
        labels = batch.get("labels", batch.get("input_ids"))
        mask = batch.get("attention_mask")
        if not inputs:
            raise TypeError(f"fisher_diagonal: batch {index} (a dict) holds no input tensor")
        return inputs, constants, labels, mask
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"fisher_diagonal: batch {index}: inputs must be a tensor, got {type(inputs).__name__}")
        return {_INPUT: inputs}, {}, labels, None
    if isinstance(batch, torch.Tensor):
        if kind == "exact" or kind == "sampled":
            return {_INPUT: batch}, {}, None, None
        raise ValueError(f"fisher_diagonal(kind={kind!r}): batch {index} has no labels; give (inputs, labels) or a dict")
    raise TypeError(
        f"fisher_diagonal: batch {index} is a {type(batch).__name__}; expected (inputs, labels), a dict "
        "(input_ids, attention_mask, labels) or, for 'exact'/'sampled', an input tensor"
    )


def _prepare(
    model: torch.nn.Module, batch: Any, index: int, kind: str, generator: torch.Generator | None
) -> tuple[_Batch, torch.Tensor]:
    """Take a batch apart, run the model once on it and build its targets and weights; also
    return the log-probabilities at the targets, ``(N, P, C)``."""
    inputs, constants, labels, mask = _unpack(batch, index, kind)
    first = next(iter(inputs.values()))
    size = first.shape[0] if first.dim() else 0
    for key, value in inputs.items():
        if value.dim() == 0 or value.shape[0] != size:
            shown = "the inputs" if key == _INPUT else f"{key!r}"
            raise ValueError(f"fisher_diagonal: batch {index}: {shown} must have the {size} examples along dimension 0")
    if size == 0:
        nothing = torch.zeros(0, 0)
        return _Batch(inputs=inputs, constants=constants, targets=None, weights=nothing, size=0, n_classes=0), nothing
    logits = logits_of(_call(model, inputs, constants))
    if logits.dim() not in (2, 3) or logits.shape[0] != size:
        raise ValueError(
            f"fisher_diagonal: batch {index}: logits of shape {tuple(logits.shape)}; expected (N, C) or (N, T, V) "
            f"with N = {size} examples"
        )
    log_probs = _position_log_probs(logits)
    n_classes = log_probs.shape[-1]
    causal = logits.dim() == 3
    weights = torch.ones(log_probs.shape[:2], dtype=log_probs.dtype, device=logits.device)
    if causal and mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != logits.shape[:2]:
            raise ValueError(f"fisher_diagonal: batch {index}: attention_mask must have shape {tuple(logits.shape[:2])}")
        weights = weights * (mask[:, 1:] != 0).to(weights.device, weights.dtype)
    targets = None
    if labels is not None:
        expected = tuple(logits.shape[:2]) if causal else (size,)
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != expected or labels.dtype.is_floating_point:
            shape = "(N, T)" if causal else "(N,)"
            raise ValueError(f"fisher_diagonal: batch {index}: labels must be integer of shape {shape} = {expected}")
        targets = (labels[:, 1:] if causal else labels[:, None]).to(logits.device, torch.long)
        if causal:
            weights = weights * (targets != IGNORE_INDEX).to(weights.dtype)
        counted = targets[weights != 0]
        if counted.numel() and (counted.min() < 0 or counted.max() >= n_classes):
            raise ValueError(f"fisher_diagonal: batch {index}: a label is outside [0, {n_classes})")
        targets = torch.where(weights != 0, targets, torch.zeros_like(targets))
    if kind == "sampled":
        probs = log_probs.detach().exp().reshape(-1, n_classes)
        if not torch.isfinite(probs).all():
            raise ValueError(f"fisher_diagonal(kind='sampled'): the model's probabilities on batch {index} are not finite")
        targets = torch.multinomial(probs, 1, generator=generator).view(log_probs.shape[:2])
    elif targets is None and kind != "exact":
        raise ValueError(f"fisher_diagonal(kind={kind!r}): batch {index} has no labels (nor input_ids to take them from)")
    prepared = _Batch(inputs=inputs, constants=constants, targets=targets, weights=weights, size=size, n_classes=n_classes)
    return prepared, log_probs


# ----------------------------------------------------------------------------- estimators


def _batched_square(
    model: torch.nn.Module,
    batch: Any,
    index: int,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    tensors: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The squared gradient of the batch-mean loss (autograd over the batch)."""
    frozen = [i for i, p in enumerate(tensors) if not p.requires_grad]
    if frozen:
        raise ValueError(f"fisher_diagonal(kind='batched'): params[{frozen[0]}] does not require grad")
    with torch.enable_grad():
        if loss_fn is None:
            prepared, log_probs = _prepare(model, batch, index, "batched", None)
            if prepared.size == 0:
                raise ValueError(f"fisher_diagonal(kind='batched'): batch {index} is empty")
            picked = log_probs.gather(-1, prepared.targets.unsqueeze(-1)).squeeze(-1)
            loss = -(picked * prepared.weights).sum(-1).mean()
        else:
            loss = loss_fn(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"fisher_diagonal(kind='batched'): loss_fn must return a scalar loss tensor (batch {index})")
        loss = loss.reshape(())
    if not torch.isfinite(loss):
        raise ValueError(f"fisher_diagonal(kind='batched'): the loss of batch {index} is not finite ({float(loss)})")
    if not loss.requires_grad:
        raise ValueError(f"fisher_diagonal(kind='batched'): the loss of batch {index} does not depend on the parameters")
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [
        torch.zeros_like(p, dtype=_accumulate_dtype(p.dtype)) if g is None else g.to(_accumulate_dtype(p.dtype)).square()
        for p, g in zip(tensors, grads)
    ]


def _per_example_squares(
    model: torch.nn.Module,
    batch: Any,
    index: int,
    kind: str,
    names: list[str],
    tensors: list[torch.Tensor],
    chunk_size: int,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor], int]:
    """The sum over the batch's examples of their Fisher terms, and the number of examples.

    The examples go through ``vmap`` in chunks, each chunk's terms summed before the next,
    so that at most about ``chunk_size`` parameter-sized gradients exist at once.
    """
    prepared, _ = _prepare(model, batch, index, kind, generator)
    theta = {name: p.detach() for name, p in zip(names, tensors)}
    constants = prepared.constants

    def position_log_probs(th: dict[str, torch.Tensor], example: dict[str, torch.Tensor]) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        args = (one[_INPUT],) if _INPUT in one else ()
        kwargs = {} if _INPUT in one else {**constants, **one}
        return _position_log_probs(logits_of(functional_call(model, th, args, kwargs)))[0]  # (P, C)

    if kind == "exact":
        outcomes = prepared.weights.shape[1] * prepared.n_classes
        inner = min(outcomes, chunk_size)

        def example_terms(th, example, weights):
            log_probs, pullback = vjp(lambda t: position_log_probs(t, example), th)
            probs = (log_probs.exp() * weights[:, None]).reshape(-1)
            terms = {name: torch.zeros_like(t, dtype=_accumulate_dtype(t.dtype)) for name, t in th.items()}
            for start in range(0, outcomes, inner):
                stop = min(outcomes, start + inner)
                picks = torch.arange(start, stop, device=log_probs.device)
                cotangents = torch.nn.functional.one_hot(picks, outcomes).to(log_probs.dtype)
                (grads,) = vmap(pullback)(cotangents.view(stop - start, *log_probs.shape))
                w = probs[start:stop]
                terms = {
                    name: terms[name] + torch.tensordot(w.to(g.dtype), g.square(), dims=1).to(terms[name].dtype)
                    for name, g in grads.items()
                }
            counted = torch.where(weights[:, None] != 0, log_probs, torch.zeros_like(log_probs))
            return terms, torch.isfinite(counted).all()

        per_example = vmap(example_terms, in_dims=(None, 0, 0))
        step = max(1, chunk_size // inner)
        columns = (prepared.inputs, prepared.weights)
    else:

        def example_terms(th, example, targets, weights):
            def log_likelihood(t):
                picked = position_log_probs(t, example).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                value = (picked * weights).sum()
                return value, value

            grads, value = grad(log_likelihood, has_aux=True)(th)
            return {name: g.to(_accumulate_dtype(g.dtype)).square() for name, g in grads.items()}, torch.isfinite(value)

        per_example = vmap(example_terms, in_dims=(None, 0, 0, 0))
        step = chunk_size
        columns = (prepared.inputs, prepared.targets, prepared.weights)
    summed = [torch.zeros_like(p, dtype=_accumulate_dtype(p.dtype)) for p in tensors]
    for start in range(0, prepared.size, step):
        chunk = [_rows(column, start, start + step) for column in columns]
        terms, finite = _run(per_example, theta, *chunk)
        if not bool(finite.all()):
            raise ValueError(f"fisher_diagonal(kind={kind!r}): the log-likelihood of batch {index} is not finite")
        for total, name in zip(summed, names):
            total.add_(terms[name].sum(0))
    return summed, prepared.size


def _rows(column: Any, start: int, stop: int) -> Any:
    if isinstance(column, Mapping):
        return {k: v[start:stop] for k, v in column.items()}
    return column[start:stop]


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a vmapped function; a model that vmap cannot batch is an error that says why."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if "data-dependent control flow" not in str(exc) and ".item()" not in str(exc):
            raise
        raise RuntimeError(
            "fisher_diagonal: the model's forward cannot run under torch.func.vmap (it reads a tensor's "
            "values in Python: .item() or data-dependent control flow). A Hugging Face model does so "
            "with attn_implementation='sdpa' and an attention_mask: load it with "
            "attn_implementation='eager' for the Fisher, or leave the attention_mask out of the batches "
            "(right padding can be masked with labels = -100 instead)"
        ) from exc
