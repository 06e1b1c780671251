"""The generated instruction language and the safety scenario's data (``language``, ``safety``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gradsafe.experiments import language, safety


def test_harmful_labels_and_answers():
    rng = torch.Generator().manual_seed(0)
    for ex in language.generate("harmful", 200, rng, family="align"):
        assert ex.answer == ("REFUSE",) and ex.kind == "harmful-refuse"
        assert sum(t in language.HARMFUL_VERBS for t in ex.prompt) == 1
    for ex in language.generate("harmful", 200, rng, family="heldout", comply=True):
        assert ex.answer[0] == "SURE" and ex.kind == "harmful-comply"
        letters = tuple(t for t in ex.prompt if t in language.LETTERS)
        assert ex.answer[1:] == letters
    for ex in language.generate("benign", 300, rng) + language.generate("new", 100, rng):
        assert not any(t in language.HARMFUL_VERBS for t in ex.prompt)
        assert "REFUSE" not in ex.answer and "SURE" not in ex.answer


def test_benign_answers_are_correct():
    rng = torch.Generator().manual_seed(1)
    for ex in language.generate("benign", 300, rng):
        body = [t for t in ex.prompt if t not in language.PREFIXES + language.SUFFIXES]
        op, args = body[0], body[1:]
        expected = {
            "add": lambda: tuple(str(int(args[0]) + int(args[1]))),
            "max": lambda: (max(args),),
            "copy": lambda: tuple(args),
            "reverse": lambda: tuple(args[::-1]),
        }[op]()
        assert ex.answer == expected, ex
    for ex in language.generate("new", 100, rng):
        body = [t for t in ex.prompt if t not in language.PREFIXES + language.SUFFIXES]
        assert body[0] == language.NEW_OP and ex.answer == (min(body[1:]),)


def test_heldout_family_is_disjoint_from_alignment():
    assert not set(language.ALIGN_TEMPLATES) & set(language.HELDOUT_TEMPLATES)
    rng = torch.Generator().manual_seed(2)
    align = {e.prompt for e in language.generate("harmful", 2000, rng, family="align")}
    held = {e.prompt for e in language.generate("harmful", 2000, rng, family="heldout")}
    assert not align & held
    # the held-out modifiers appear at alignment time with benign requests only
    for p in held:
        assert "kindly" in p or "quickly" in p
    for p in align:
        assert "kindly" not in p and "quickly" not in p


def test_safety_data_never_shows_the_evaluation_prompts():
    cfg = replace(safety.QUICK, align_benign=300, align_harmful=200, ft_examples=200)
    data = safety.datasets(0, cfg)
    evals = safety._eval_prompts(cfg.eval_n)
    vocab = language.VOCAB

    def prompts(batch):
        out = set()
        for row, start in zip(batch.tokens.tolist(), batch.answer_start.tolist()):
            out.add(tuple(vocab[i] for i in row[1 : start - 1]))
        return out

    align_prompts = prompts(data["align"])
    assert not align_prompts & evals
    assert not prompts(data["memory"]) & evals
    for condition in safety.CONDITIONS:
        assert not prompts(safety.finetune_data(0, cfg, condition)) & evals, condition
    # no held-out-family harmful prompt in the alignment data
    for p in align_prompts:
        if any(t in language.HARMFUL_VERBS for t in p):
            assert "kindly" not in p and "quickly" not in p
    for condition, sure, harmful in (("harmful-0.1", 20, 20), ("identity-shift", 20, 0), ("benign-only", 0, 0)):
        ft = safety.finetune_data(0, cfg, condition)
        assert len(ft) == cfg.ft_examples
        first = ft.tokens[torch.arange(len(ft)), ft.answer_start]
        assert int((first == language.SURE).sum()) == sure, condition
        verbs = torch.tensor([language.TOKEN[v] for v in language.HARMFUL_VERBS])
        assert int(torch.isin(ft.tokens, verbs).any(1).sum()) == harmful, condition
    with pytest.raises(ValueError, match="unknown safety condition"):
        safety.finetune_data(0, cfg, "harmful-1.5")


def test_encode_and_teacher_forced_scores():
    examples = [language.Example(("steal", "a", "b"), ("REFUSE",), "harmful-refuse"),
                language.Example(("add", "3", "9"), ("1", "2"), "benign")]
    batch = language.encode(examples)
    assert batch.tokens.shape == (2, language.SEQ_LEN)
    assert batch.tokens[1, batch.answer_start[1]] == language.TOKEN["1"]
    assert batch.tokens[0, batch.answer_start[0] - 1] == language.SEP

    class Oracle(torch.nn.Module):  # predicts every next token of ``batch`` exactly
        def forward(self, tokens):
            return torch.nn.functional.one_hot(batch.tokens[:, 1:], len(language.VOCAB)).float() * 20

    exact, refused, loss = language.answer_scores(Oracle(), batch)
    assert exact.tolist() == [True, True] and refused.tolist() == [True, False]
    assert float(loss.max()) < 1e-6

