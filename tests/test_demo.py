"""``gradsafe demo``: the study's structure, its statistics, its generated data, the command line."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from gradsafe import ProtectedOptimizer, cli  # noqa: E402
from gradsafe.experiments import continual, demo, language, safety, study  # noqa: E402
from gradsafe.experiments.data import make_sequence, make_tasks  # noqa: E402
from gradsafe.experiments.methods import METHODS, QUICK_METHODS, Hyper, Protected, build_optimizer, method_names  # noqa: E402


# ----------------------------------------------------------------------------- the quick run, through the CLI
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    return rc, buf.getvalue(), out


def test_quick_cli_prints_tables_and_verdicts(quick_run):
    rc, printed, _ = quick_run
    assert rc == 0
    for text in ("## Continual learning", "## Safety erosion", "## The thesis test", "| method |",
                 "Acceptance (continual)", "Acceptance (safety, p = 0.1)", "Benign fine-tuning alone", "wall time"):
        assert text in printed, text
    for name in QUICK_METHODS:
        assert METHODS[name].label in printed


def test_quick_json_structure(quick_run):
    _, _, out = quick_run
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"meta", "continual", "safety", "thesis"}
    assert res["meta"]["quick"] is True and res["meta"]["seeds"] == [0]
    assert list(res["meta"]["methods"]) == list(QUICK_METHODS)

    c = res["continual"]
    assert set(c) >= {"config", "methods", "acceptance", "runs", "pretrained_acc"}
    assert list(c["methods"]) == list(QUICK_METHODS)
    for name, m in c["methods"].items():
        assert set(m["final"]) >= {"avg_acc", "forgetting", "bwt", "new_acc", "learn_acc"}
        for stat in m["final"].values():
            assert set(stat) == {"mean", "std", "values"}
        assert set(m["cost"]) >= {"train_seconds", "setup_backward", "step_backward", "steps"}
        assert len(m["forgetting_per_task"]["mean"]) == c["config"]["n_tasks"] - 1
    assert c["methods"]["plain"]["cost"]["step_backward"]["mean"] == 0
    assert c["methods"]["agem_1"]["cost"]["step_backward"]["mean"] > 0  # one refresh per step
    assert c["acceptance"]["target"] and "met" in c["acceptance"]
    assert c["pretrained_acc"]["0"][0] > 0.5  # task 1 was learnt (chance is 0.1)

    s = res["safety"]
    assert set(s) >= {"config", "aligned", "aligned_mean", "fractions", "acceptance", "runs"}
    assert set(s["fractions"]) == {"0", "0.1"}
    for fr in s["fractions"].values():
        assert list(fr["methods"]) == list(QUICK_METHODS)
        for m in fr["methods"].values():
            assert set(m["final"]) >= {"refusal", "harmful", "refusal_drop", "new_acc", "benign_acc", "over_refusal"}
            assert math.isclose(m["final"]["harmful"]["mean"], 1 - m["final"]["refusal"]["mean"], abs_tol=1e-5)
    assert s["aligned_mean"]["refusal"]["mean"] > 0.5  # the aligned model refuses the held-out family
    assert "met" in s["acceptance"]

    for scen in ("continual", "safety"):
        t = res["thesis"][scen]
        assert set(t) >= {"runs", "windows", "pearson_window", "spearman_window", "pearson_cumulative",
                          "spearman_cumulative", "spearman_conflicts_cumulative", "per_method"}
        assert t["windows"] > 0
    for r in c["runs"] + s["runs"]:
        w = r["windows"]
        assert len(w["predicted"]) == len(w["measured"]) == len(w["conflicts"]) > 0
        assert all(v is not None for v in w["predicted"])


def test_quick_outputs_written(quick_run):
    _, _, out = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# gradsafe study results")
    assert md.count("| method |") >= 3 and "## The thesis test" in md
    for png in ("continual.png", "safety.png", "thesis.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert f"({png})" in md


# ----------------------------------------------------------------------------- statistics
def test_rankdata_ties():
    assert study.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert study.rankdata([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]
    assert study.rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_example():
    # ranks of y: [1, 2, 3.5, 5, 3.5]; deviations from 3: x [-2,-1,0,1,2], y [-2,-1,.5,2,.5]
    # sum dx dy = 8, sum dx^2 = 10, sum dy^2 = 9.5  ->  rho = 8 / sqrt(95)
    rho = study.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert math.isclose(rho, 8 / math.sqrt(95), rel_tol=1e-12)
    assert math.isclose(study.spearman([1, 2, 3, 4], [1, 10, 100, 1000]), 1.0)
    assert math.isclose(study.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)


def test_pearson_matches_numpy_and_degenerate_cases():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert math.isclose(study.pearson(x, y), float(np.corrcoef(x, y)[0, 1]), rel_tol=1e-10)
    assert math.isnan(study.pearson([1, 1, 1], [1, 2, 3]))  # constant input
    assert math.isnan(study.pearson([1, 2], [1, 2]))  # too few points
    with pytest.raises(ValueError):
        study.pearson([1, 2, 3], [1, 2])


def test_thesis_stats_on_a_hand_made_run():
    run = {"windows": {"predicted": [0.1, 0.2, -0.1, 0.3], "measured": [0.2, 0.4, -0.2, 0.6],
                       "measured_memory": [0.1, 0.2, -0.1, 0.3], "conflicts": [1, 2, 0, 3],
                       "steps": [5, 5, 5, 5], "stage": [1, 1, 2, 2]}}
    t = study.thesis_stats([run])
    assert t["windows"] == 4 and t["runs"] == 1
    assert math.isclose(t["pearson_window"], 1.0) and math.isclose(t["slope_window"], 2.0)
    assert math.isclose(t["slope_window_memory"], 1.0) and t["sign_agreement"] == 1.0
    # running sums restart with each stage: predicted [.1, .3, -.1, .2], measured [.2, .6, -.2, .4]
    assert math.isclose(t["pearson_cumulative"], 1.0)
    assert math.isclose(t["spearman_cumulative"], 1.0)


# ----------------------------------------------------------------------------- generated language data
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
    assert not prompts(safety.finetune_data(0, cfg, 0.1)) & evals
    # no held-out-family harmful prompt in the alignment data
    for p in align_prompts:
        if any(t in language.HARMFUL_VERBS for t in p):
            assert "kindly" not in p and "quickly" not in p
    ft = safety.finetune_data(0, cfg, 0.1)
    first = ft.tokens[torch.arange(len(ft)), ft.answer_start]
    assert int((first == language.SURE).sum()) == round(0.1 * cfg.ft_examples)


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


# ----------------------------------------------------------------------------- digits, methods, determinism
def test_task_sequences():
    tasks, heads, classes = make_sequence("permuted", 4)
    assert len(tasks) == 4 and heads == 1 and classes == 10
    assert torch.equal(tasks[1].x_test, make_tasks("permuted").b.x_test)
    tasks, heads, classes = make_sequence("split-class")
    assert heads == 1 and classes == 10 and [int(t.y_train.max()) for t in tasks] == [1, 3, 5, 7, 9]
    tasks, heads, classes = make_sequence("split-task")
    assert heads == 5 and classes == 2 and [t.head for t in tasks] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        make_sequence("rotated")


def test_every_method_builds():
    torch.manual_seed(0)
    model = continual.MLP(8, 6, 1, 3)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    memory = torch.arange(12)
    prot = Protected("old", model, memory, lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
    for name in METHODS:
        opt, closure = build_optimizer(name, torch.optim.AdamW(model.parameters(), lr=1e-3), [prot], Hyper(rank=4, gem_refs=3))
        if name == "plain":  # the baseline is AdamW alone
            assert type(opt) is torch.optim.AdamW and closure is None
            continue
        assert isinstance(opt, ProtectedOptimizer) and opt.objectives, name
        assert opt.space == METHODS[name].space
        live = name.startswith("agem_") and name != "agem_cached"  # A-GEM with a closure reference
        assert (closure is not None) == live, name
    assert prot.backward_passes == 12 + 3  # samples once, GEM's 3 batches once
    assert method_names(None, quick=True)[0] == "plain"
    with pytest.raises(ValueError, match="unknown methods"):
        method_names(["plain", "magic"])


def test_update_monitor_matches_space_update():
    """The study's monitor (a GradientMonitor fed the negated update) reports what a
    ProtectedOptimizer in space "update" reports for the same AdamW step."""
    from gradsafe import GradientMonitor, collect_gradients

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    xo, yo = torch.randn(16, 8), torch.randint(0, 3, (16,))
    a = continual.MLP(8, 6, 1, 3)
    b = continual.MLP(8, 6, 1, 3)
    b.load_state_dict(a.state_dict())
    ref = collect_gradients(a, lambda _: torch.nn.functional.cross_entropy(a(xo), yo), [None])

    opt = ProtectedOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2), {"old": ref}, mode="observe", space="update", rank=1)
    base = torch.optim.AdamW(b.parameters(), lr=1e-2)
    monitor = GradientMonitor(list(b.parameters()), {"old": ref}, rank=1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(a(x), y).backward()
        opt.step()
        snapshot = [p.detach().clone() for p in b.parameters()]
        base.zero_grad()
        torch.nn.functional.cross_entropy(b(x), y).backward()
        base.step()
        for p, s in zip(b.parameters(), snapshot):
            p.grad = s - p.detach()
        got = monitor.measure()["old"]
        want = opt.report["old"]
        for key in ("predicted_change", "cosine", "conflict"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-7), key
    for p, q in zip(a.parameters(), b.parameters()):  # observe changes nothing
        assert torch.allclose(p, q, atol=1e-6)


def test_continual_run_is_deterministic():
    cfg = replace(continual.QUICK, n_tasks=2, steps=12, memory=8, eval_every=6)
    pre = continual.pretrain(3, cfg)
    r1 = continual.run(3, cfg, "agem_10", Hyper(), pre)
    r2 = continual.run(3, cfg, "agem_10", Hyper(), pre)
    assert r1["final"] == r2["final"] and r1["windows"] == r2["windows"]
    assert r1["cost"]["step_backward"] == 1  # refreshed at step 10 of 12


def test_parse_seeds_and_config():
    assert demo.parse_seeds("3") == (0, 1, 2)
    assert demo.parse_seeds("0,4,7") == (0, 4, 7)
    for bad in ("0", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            demo.parse_seeds(bad)
    cfg = study.make_config(quick=True)
    assert cfg.seeds == (0,) and cfg.methods == QUICK_METHODS
    assert study.make_config().seeds == (0, 1, 2) and len(study.make_config().methods) == len(METHODS)
    with pytest.raises(ValueError):
        study.make_config(scenarios=["vision"])


def test_cli_rejects_unknown_methods(capsys):
    assert cli.main(["demo", "--methods", "plain,magic", "--no-progress"]) == 2
    assert "unknown methods" in capsys.readouterr().err
