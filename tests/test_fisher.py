"""gradsafe.fisher_diagonal against a Python loop over examples, written from the formulas.

The reference differentiates each example (and, for "exact", each outcome) on its own with
torch.autograd; the library uses torch.func's vmap. Models: a tiny MLP classifier, a tiny
causal LM (embedding, causal running mean, linear head) and a tiny GPT-2 built from a config.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import gradsafe
from gradsafe.fisher import FISHER_KINDS, IGNORE_INDEX

C, D_IN = 4, 5  # classifier
V, T = 7, 6  # causal LM


def mlp(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)).to(dtype)


class TinyLM(torch.nn.Module):
    """Embedding, a causal running mean over the positions, linear head: (N, T) ids -> (N, T, V) logits."""

    def __init__(self, as_output: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(V, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, V)
        self.as_output = as_output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype, device=h.device)
        context = h.cumsum(1) / steps[:, None]
        logits = self.head(torch.tanh(h + self.mix(context)))
        return SimpleNamespace(logits=logits) if self.as_output else logits


def tiny_lm(dtype: torch.dtype, seed: int = 0, as_output: bool = False) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(as_output).to(dtype)


def gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
                        attn_implementation="eager")  # sdpa's mask check cannot run under vmap
    return GPT2LMHeadModel(config).to(dtype).eval()  # the reference runs it as it is: no dropout


def class_batches(sizes, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D_IN, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g)) for n in sizes]


def lm_batches(sizes, seed=2, vocab=V, length=T, masked=True):
    """Dict batches; some padding at the end of sequences and some labels left out (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(0, vocab, (n, length), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if masked:
            mask[0, length - 2:] = 0
            labels[-1, 1] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# ----------------------------------------------------------------------------- the reference loop


def _call(model, batch, n):
    """Example n alone: its log-probabilities at its targets, (P, C), and those targets' labels and weights."""
    if isinstance(batch, dict):
        kw = {k: v[n : n + 1] for k, v in batch.items() if k != "labels"}
        out = model(**kw)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        labels = batch.get("labels", batch["input_ids"])[n, 1:]
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[n, 1:]
        keep = [t for t in range(labels.shape[0]) if mask[t] != 0 and labels[t] != IGNORE_INDEX]
        lp = logits[0, :-1].log_softmax(-1)
        return lp, labels, keep
    x, y = batch
    out = model(x[n : n + 1])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if logits.dim() == 3:
        lp = logits[0, :-1].log_softmax(-1)
        return lp, y[n, 1:], [t for t in range(lp.shape[0]) if y[n, t + 1] != IGNORE_INDEX]
    return logits.log_softmax(-1), y[n : n + 1], [0]


def reference_fisher(model, batches, kind, sampled_labels=None):
    """The formulas of gradsafe/fisher.py, one example (and one outcome) at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for b, batch in enumerate(batches):
        size = (batch["input_ids"] if isinstance(batch, dict) else batch[0]).shape[0]
        if kind == "batched":
            loss = 0.0
            for n in range(size):
                lp, labels, keep = _call(model, batch, n)
                loss = loss - sum(lp[t, labels[t]] for t in keep) / size
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc += g**2
            count += 1
            continue
        for n in range(size):
            lp, labels, keep = _call(model, batch, n)
            if kind == "sampled":
                labels = sampled_labels[b][n]
            if kind in ("empirical", "sampled"):
                ll = sum(lp[t, labels[t]] for t in keep)
                for acc, g in zip(total, torch.autograd.grad(ll, params, allow_unused=True)):
                    if g is not None:
                        acc += g**2
            else:  # exact: sum over the targets and over every outcome y of p(y) (grad log p(y))^2
                for t in keep:
                    for y in range(lp.shape[-1]):
                        grads = torch.autograd.grad(lp[t, y], params, retain_graph=True, allow_unused=True)
                        for acc, g in zip(total, grads):
                            if g is not None:
                                acc += lp[t, y].detach().exp() * g**2
        count += size
    return [t / count for t in total]


def draw_labels(model, batches, seed):
    """The documented sampling: per batch, torch.multinomial over the model's probabilities at every target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                out_ = model(**{k: v for k, v in batch.items() if k != "labels"})
                logits = (out_ if isinstance(out_, torch.Tensor) else out_.logits)[:, :-1]
            else:
                logits = model(batch[0]).unsqueeze(1)
            probs = logits.log_softmax(-1).exp()
            labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).view(probs.shape[:2])
            out.append(labels)
    return out


def assert_close_lists(got, want, dtype):
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"parameter {i}: {m}")


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FISHER_KINDS)
@pytest.mark.parametrize("sizes", [[1], [3, 5], [2, 1, 4]])
def test_classifier_matches_the_reference(kind, dtype, sizes):
    model = mlp(dtype)
    batches = class_batches(sizes, dtype)
    got = gradsafe.fisher_diagonal(model, batches, kind=kind, chunk_size=2, generator=torch.Generator().manual_seed(7))
    sampled = draw_labels(model, batches, 7) if kind == "sampled" else None
    want = reference_fisher(model, batches, kind, sampled)
    assert_close_lists(got, want, dtype)
    assert all(float(f.sum()) > 0 for f in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FISHER_KINDS)
@pytest.mark.parametrize("sizes", [[1], [3, 2]])
def test_causal_lm_matches_the_reference(kind, dtype, sizes):
    """Dict batches with padding (attention_mask) and labels left out (-100): shifted targets, summed per sequence."""
    model = tiny_lm(dtype)
    batches = lm_batches(sizes, masked=sizes != [1])
    got = gradsafe.fisher_diagonal(model, batches, kind=kind, chunk_size=5, generator=torch.Generator().manual_seed(3))
    sampled = draw_labels(model, batches, 3) if kind == "sampled" else None
    want = reference_fisher(model, batches, kind, sampled)
    assert_close_lists(got, want, dtype)


@pytest.mark.parametrize("kind", ["exact", "empirical", "batched"])
def test_causal_lm_tuple_batches_and_outputs_with_logits(kind):
    """(ids, labels) tuples on a model returning a tensor, dicts on one returning .logits: the same Fisher."""
    batches = lm_batches([3, 2], masked=False)
    as_dicts = gradsafe.fisher_diagonal(tiny_lm(torch.float64, as_output=True), batches, kind=kind)
    as_tuples = gradsafe.fisher_diagonal(tiny_lm(torch.float64), [(b["input_ids"], b["labels"]) for b in batches], kind=kind)
    assert_close_lists(as_tuples, as_dicts, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FISHER_KINDS)
def test_tiny_gpt2_matches_the_reference(kind, dtype):
    model = gpt2(dtype)
    batches = lm_batches([2, 1], vocab=50, length=5)
    got = gradsafe.fisher_diagonal(model, batches, kind=kind, chunk_size=64, generator=torch.Generator().manual_seed(5))
    sampled = draw_labels(model, batches, 5) if kind == "sampled" else None
    want = reference_fisher(model, batches, kind, sampled)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(got) == len(params) == 16  # the tied head is the embedding, counted once
    assert_close_lists(got, want, dtype)


# ----------------------------------------------------------------------------- properties


def test_sampled_is_seeded_and_its_mean_over_draws_approaches_exact():
    model = mlp(torch.float64)
    [(x, y)] = class_batches([6], torch.float64)

    def sampled(seed, batches):
        return gradsafe.fisher_diagonal(model, batches, kind="sampled", generator=torch.Generator().manual_seed(seed))

    once = [(x, y)]
    assert_close_lists(sampled(0, once), sampled(0, once), torch.float64)
    assert not torch.equal(torch.cat([f.flatten() for f in sampled(0, once)]), torch.cat([f.flatten() for f in sampled(1, once)]))
    exact = torch.cat([f.flatten() for f in gradsafe.fisher_diagonal(model, once, kind="exact")])
    # every example repeated: the sampled Fisher over the copies is the mean of that many draws per example
    errors = {}
    for draws in (10, 2000):
        many = [(x.repeat(draws, 1), y.repeat(draws))]
        mean = torch.cat([f.flatten() for f in gradsafe.fisher_diagonal(model, many, kind="sampled", chunk_size=512,
                                                                       generator=torch.Generator().manual_seed(11))])
        errors[draws] = float((mean - exact).norm() / exact.norm())
    assert errors[2000] < 0.05 and errors[2000] < errors[10] / 3, errors


def test_batched_with_one_example_per_batch_is_empirical():
    model = tiny_lm(torch.float64)
    [batch] = lm_batches([4])
    singles = [{k: v[n : n + 1] for k, v in batch.items()} for n in range(4)]
    assert_close_lists(gradsafe.fisher_diagonal(model, singles, kind="batched"),
                       gradsafe.fisher_diagonal(model, [batch], kind="empirical"), torch.float64)


def test_batched_with_a_loss_is_the_mean_square_of_collected_gradients():
    """What protect() builds its Fisher from when given per-batch gradient samples."""
    model = mlp(torch.float64)
    batches = class_batches([3, 4, 2], torch.float64)

    def loss(b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    samples = gradsafe.collect_gradients(model, loss, batches)
    want = [torch.stack([s[i] for s in samples]).square().mean(0) for i in range(len(samples[0]))]
    assert_close_lists(gradsafe.fisher_diagonal(model, batches, kind="batched", loss_fn=loss), want, torch.float64)
    # the default loss is the same batch-mean negative log-likelihood
    assert_close_lists(gradsafe.fisher_diagonal(model, batches, kind="batched"), want, torch.float64)


def test_params_subset_is_aligned_and_grads_and_mode_are_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(8, C)).double()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    batches = class_batches([5], torch.float64)
    full = gradsafe.fisher_diagonal(model, batches, kind="empirical")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    # the model ran in eval mode: the same as the Fisher without dropout, computed again
    assert_close_lists(gradsafe.fisher_diagonal(model, batches, kind="empirical"), full, torch.float64)
    subset = [model[3].weight, model[0].bias]
    part = gradsafe.fisher_diagonal(model, batches, kind="empirical", params=subset)
    assert_close_lists(part, [full[2], full[1]], torch.float64)


def test_an_unused_parameter_gets_zeros():
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = mlp(torch.float64), torch.nn.Linear(2, 2).double()

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    fisher = gradsafe.fisher_diagonal(model, class_batches([3], torch.float64), kind="exact")
    assert len(fisher) == 6 and all(torch.equal(f, torch.zeros_like(f)) for f in fisher[4:])
    assert all(float(f.sum()) > 0 for f in fisher[:4])


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong():
    model = mlp(torch.float32)
    batches = class_batches([3], torch.float32)
    with pytest.raises(ValueError, match="unknown kind 'fisher'"):
        gradsafe.fisher_diagonal(model, batches, kind="fisher")
    with pytest.raises(ValueError, match="no examples"):
        gradsafe.fisher_diagonal(model, [], kind="exact")
    with pytest.raises(ValueError, match="no examples"):
        gradsafe.fisher_diagonal(model, [(torch.zeros(0, D_IN), torch.zeros(0, dtype=torch.long))], kind="empirical")
    with pytest.raises(ValueError, match="loss_fn is used by kind='batched' only"):
        gradsafe.fisher_diagonal(model, batches, kind="empirical", loss_fn=lambda b: model(b[0]).sum())
    with pytest.raises(ValueError, match="params\\[0\\] is not a parameter of the model"):
        gradsafe.fisher_diagonal(model, batches, kind="empirical", params=[torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        gradsafe.fisher_diagonal(model, [(batches[0][0], torch.tensor([0, 4, 1]))], kind="empirical")
    with pytest.raises(ValueError, match="labels must be integer of shape"):
        gradsafe.fisher_diagonal(model, [(batches[0][0], torch.zeros(3, 2, dtype=torch.long))], kind="empirical")
    with pytest.raises(ValueError, match="batch 0 has no labels"):
        gradsafe.fisher_diagonal(model, [batches[0][0]], kind="empirical")
    with pytest.raises(ValueError, match="chunk_size"):
        gradsafe.fisher_diagonal(model, batches, kind="exact", chunk_size=0)
    # a bare input tensor is enough where the labels come from the model
    assert len(gradsafe.fisher_diagonal(model, [batches[0][0]], kind="exact")) == 4


@pytest.mark.parametrize("kind", FISHER_KINDS)
def test_a_loss_that_is_not_finite_is_an_error(kind):
    model = mlp(torch.float32)
    x, y = class_batches([3], torch.float32)[0]
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        gradsafe.fisher_diagonal(model, [class_batches([2], torch.float32)[0], (x, y)], kind=kind)


def test_a_model_vmap_cannot_run_is_an_error_that_says_why():
    class ReadsValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(D_IN, C)

        def forward(self, x):
            if float(x.abs().max()) > 1e6:  # data-dependent control flow
                raise AssertionError
            return self.linear(x)

    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap.*attn_implementation='eager'"):
        gradsafe.fisher_diagonal(ReadsValues(), class_batches([2], torch.float32), kind="empirical")
