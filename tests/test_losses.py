"""gradsafe.kl_to_reference against the KL formula written out with softmax and log."""

from __future__ import annotations

import copy
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import gradsafe

V, D = 5, 4


class TokenModel(torch.nn.Module):
    """(N, T) ids -> (N, T, V) logits; a dict call (input_ids, attention_mask) returns an output with .logits."""

    def __init__(self, seed: int, vocab: int = V, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, D).to(dtype)
        self.head = torch.nn.Linear(D, vocab).to(dtype)
        self.forwards = 0

    def forward(self, input_ids, attention_mask=None):
        self.forwards += 1
        logits = self.head(torch.tanh(self.embed(input_ids)))
        return logits if attention_mask is None else SimpleNamespace(logits=logits)


def token_batches(sizes=(3, 2), length=4, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n, length), generator=g) for n in sizes]


def formula_kl(model, reference, batches, temperature=1.0, masks=None):
    """mean over kept rows of sum_v p_ref log(p_ref / p), p = softmax(logits / T), with explicit softmax and log."""
    total, rows = 0.0, 0
    for i, ids in enumerate(batches):
        with torch.no_grad():
            ref = torch.softmax(reference(ids).double() / temperature, -1)
        p = torch.softmax(model(ids).double() / temperature, -1)
        per_row = (ref * (torch.log(ref) - torch.log(p))).sum(-1)
        keep = torch.ones_like(per_row, dtype=torch.bool) if masks is None else masks[i].bool()
        total = total + per_row[keep].sum()
        rows += int(keep.sum())
    return total / rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_the_formula(dtype, temperature):
    model, reference = TokenModel(0, dtype=dtype), TokenModel(1, dtype=dtype)
    batches = token_batches()
    loss = gradsafe.kl_to_reference(model, reference, batches, temperature=temperature)()
    want = formula_kl(model, reference, batches, temperature)
    assert loss.shape == () and float(want.detach()) > 1e-3
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)


def test_temperature_changes_the_loss():
    model, reference = TokenModel(0), TokenModel(1)
    batches = token_batches()
    at_1 = float(gradsafe.kl_to_reference(model, reference, batches)().detach())
    at_3 = float(gradsafe.kl_to_reference(model, reference, batches, temperature=3.0)().detach())
    assert at_3 < at_1  # softer distributions are closer


def test_masked_rows_are_left_out():
    model, reference = TokenModel(0), TokenModel(1)
    ids = token_batches()
    masks = [torch.ones_like(b) for b in ids]
    masks[0][0, 2:] = 0
    masks[1][1, :] = 0
    batches = [{"input_ids": b, "attention_mask": m, "labels": b} for b, m in zip(ids, masks)]
    closure = gradsafe.kl_to_reference(model, reference, batches)
    torch.testing.assert_close(closure(), formula_kl(model, reference, ids, masks=masks), rtol=1e-12, atol=1e-12)
    # what the model predicts at a masked row does not count: move only those rows' logits
    class MovedWhereMasked(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = model(input_ids)
            noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=logits.dtype)
            return logits + 10.0 * noise * (attention_mask == 0).unsqueeze(-1)

    moved = gradsafe.kl_to_reference(MovedWhereMasked(), reference, batches)
    torch.testing.assert_close(moved(), closure(), rtol=1e-12, atol=1e-12)
    unmasked = gradsafe.kl_to_reference(model, reference, ids)()
    assert not torch.allclose(closure(), unmasked)


def test_the_reference_runs_once_and_is_then_released():
    model, reference = TokenModel(0), TokenModel(1)
    batches = token_batches(sizes=(2, 3, 1))
    closure = gradsafe.kl_to_reference(model, reference, batches)
    assert reference.forwards == 0  # lazily, on the first call
    values = [float(closure().detach()) for _ in range(4)]
    assert reference.forwards == 3 and model.forwards == 12
    assert values == [values[0]] * 4
    # the closure keeps the log-probabilities, not the reference model
    held = weakref.ref(reference)
    del reference
    gc.collect()
    assert held() is None


def test_the_gradient_reaches_the_model_only():
    model, reference = TokenModel(0), TokenModel(1)
    loss = gradsafe.kl_to_reference(model, reference, token_batches())()
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    assert all(p.grad is None for p in reference.parameters())
    # at the reference itself the KL and its gradient are 0
    twin = copy.deepcopy(model)
    at_twin = gradsafe.kl_to_reference(twin, model, token_batches())()
    grads = torch.autograd.grad(at_twin, list(twin.parameters()))
    assert abs(float(at_twin.detach())) < 1e-12 and max(float(g.abs().max()) for g in grads) < 1e-12


def test_as_a_conflict_objective_refreshed_every_step():
    """The closure under the optimizer: registered, recomputed at every step."""
    model = TokenModel(0)
    reference = copy.deepcopy(model).eval()
    opt = gradsafe.ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5))
    opt.protect("alignment", closure=gradsafe.kl_to_reference(model, reference, token_batches()),
                mode="conflict", refresh_every=1)
    new = token_batches(sizes=(4,), seed=9)[0]
    for _ in range(3):
        opt.zero_grad()
        logits = model(new)
        torch.nn.functional.cross_entropy(logits.reshape(-1, V), new.roll(1, dims=1).reshape(-1)).backward()
        opt.step()
    # the first step reads the gradient taken at registration (the same parameters), every later one a fresh one
    assert opt.objectives["alignment"].num_refreshes == 2
    assert reference.forwards == 2  # one per alignment batch, at registration


def test_errors():
    model, reference = TokenModel(0), TokenModel(1)
    with pytest.raises(ValueError, match="no batches"):
        gradsafe.kl_to_reference(model, reference, [])
    with pytest.raises(ValueError, match="the reference is the model itself"):
        gradsafe.kl_to_reference(model, model, token_batches())
    with pytest.raises(ValueError, match="temperature"):
        gradsafe.kl_to_reference(model, reference, token_batches(), temperature=0.0)
    with pytest.raises(TypeError, match="batch 1 is a list"):
        gradsafe.kl_to_reference(model, reference, [token_batches()[0], [1, 2]])
    other_vocab = TokenModel(1, vocab=V + 2)
    closure = gradsafe.kl_to_reference(model, other_vocab, token_batches())
    with pytest.raises(ValueError, match=r"batch 0: the model's logits have shape \(3, 4, 5\), the reference's \(3, 4, 7\)"):
        closure()
    ids = token_batches()[0]
    bad_mask = gradsafe.kl_to_reference(model, reference, [{"input_ids": ids, "attention_mask": torch.ones(3, 2)}])
    with pytest.raises(ValueError, match="attention_mask of shape"):
        bad_mask()
    all_masked = gradsafe.kl_to_reference(model, reference, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    with pytest.raises(ValueError, match="masked out"):
        all_masked()
