"""``gradsafe bench --live``: the loops it compares are the ones it says, the check catches a
different computation, and the command prints well-formed rows (tiny problems, no timing asserted)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from gradsafe.bench import live
from gradsafe.bench.live import (
    ALIGN_BATCHES,
    VARIANTS,
    GradsafeLive,
    HandAGEM,
    HandAGEMUpdate,
    HandGEM,
    PlainAdamW,
    check_pair,
    make_live_problem,
    relative_error,
)
from gradsafe.cli import main

QUICK = ["bench", "--live", "--quick", "--device", "cpu", "--rounds", "1", "--steps", "1"]
ROW = re.compile(r"^(\S+) \((.+?)\)\s+(\([a-g]\) .+?)\s+(\d+\.\d+)\s+(-|\d+\.\d+x)\s+(-|\d+\.\d+x)\s+(-|\d+\.\d+x)$")


@pytest.fixture(scope="module")
def problem():
    return make_live_problem("mlp512", quick=True)


def _rows(out: str) -> dict[tuple[str, str], tuple[float, str, str, str]]:
    """(problem, variant) -> (ms/step, / hand, / (b), / AdamW)."""
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[(m.group(1), m.group(3))] = (float(m.group(4)), m.group(5), m.group(6), m.group(7))
    return rows


def _ratio(text: str) -> float:
    return float(text.rstrip("x"))


def test_the_first_alignment_batch_conflicts_with_the_task(problem):
    params = [p for p in problem.model.parameters()]
    g = torch.autograd.grad(problem.task_loss(problem.model), params)
    r = torch.autograd.grad(problem.align_losses[0](problem.model), params)
    assert sum(float((a * b).sum()) for a, b in zip(g, r)) < 0
    assert len(problem.align_losses) == ALIGN_BATCHES


def test_the_hand_update_loop_leaves_an_update_that_does_not_conflict(problem):
    variant = HandAGEMUpdate(problem)
    ref = torch.autograd.grad(problem.align_losses[0](variant.model), variant.params)
    before = [p.detach().clone() for p in variant.params]
    variant.step()
    assert variant.active == 1
    u = [b - p.detach() for b, p in zip(before, variant.params)]
    un = sum(float(t.pow(2).sum()) for t in u) ** 0.5
    rn = sum(float(t.pow(2).sum()) for t in ref) ** 0.5
    assert abs(sum(float((a * b).sum()) for a, b in zip(u, ref))) <= 1e-5 * un * rn  # projected onto <u, r> = 0


def test_hand_loops_satisfy_their_constraints(problem):
    quadprog = pytest.importorskip("quadprog")
    for variant, losses in ((HandAGEM(problem), problem.align_losses[:1]), (HandGEM(problem, quadprog), problem.align_losses)):
        refs = [torch.autograd.grad(loss(variant.model), variant.params) for loss in losses]
        variant.step()  # the references above are at the parameters this step starts from
        assert variant.active >= 1
        x = [p.grad for p in variant.params]
        xn = sum(float(t.pow(2).sum()) for t in x) ** 0.5
        for ref in refs:
            rn = sum(float(t.pow(2).sum()) for t in ref) ** 0.5
            assert sum(float((a * b).sum()) for a, b in zip(x, ref)) >= -1e-5 * xn * rn


def test_live_closures_are_recomputed_every_step(problem):
    calls = []

    def counted(i, loss):
        return lambda m: (calls.append(i), loss(m))[1]

    counting = live.LiveProblem(problem.name, problem.label, problem.model, problem.task_loss,
                                [counted(i, loss) for i, loss in enumerate(problem.align_losses)], problem.device)
    for objectives in (1, ALIGN_BATCHES):
        variant = GradsafeLive(counting, objectives)
        assert len(calls) == objectives  # protect() computes each reference once
        for _ in range(3):
            variant.step()
        # the first step reads the references protect() computed; every later one recomputes them
        assert sorted(calls) == sorted(list(range(objectives)) * 3)
        calls.clear()


def test_check_agrees_on_the_same_computation_and_not_on_another(problem):
    quadprog = pytest.importorskip("quadprog")
    same = check_pair("(b) vs (c)", HandAGEM(problem), GradsafeLive(problem, 1), 1)
    same += check_pair("(g) vs (f)", HandAGEMUpdate(problem), GradsafeLive(problem, 1, space="update"), 1)
    same += check_pair("(e) vs (d)", HandGEM(problem, quadprog), GradsafeLive(problem, ALIGN_BATCHES), ALIGN_BATCHES)
    assert all(c.ok for c in same), [str(c) for c in same]
    assert all(c.active >= 1 for c in same)
    different = check_pair("(a) vs (c)", PlainAdamW(problem), GradsafeLive(problem, 1), 1, steps=1)
    assert not different[0].ok and different[0].grad_error > 1e-3
    # in space "update" the gradients are left alone: the parameters tell the steps apart
    different = check_pair("(a) vs (f)", PlainAdamW(problem), GradsafeLive(problem, 1, space="update"), 1, steps=1)
    assert not different[0].ok and different[0].param_error > 1e-7 and different[0].grad_error == 0


def test_relative_error():
    a = [torch.ones(3), torch.zeros(2)]
    assert relative_error(a, a) == 0.0
    assert relative_error([torch.full((3,), 2.0), torch.zeros(2)], a) == pytest.approx(1.0)
    assert relative_error([torch.ones(1)], [torch.zeros(1)]) == float("inf")


def test_bench_live_cli_prints_well_formed_rows(capsys):
    pytest.importorskip("quadprog")
    assert main(QUICK + ["--problems", "mlp512,mlp1024"]) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith(("mlp512:", "mlp1024:"))]
    assert len(progress) == 2 and all("timing 7 variants x 1 repeats x 1 steps" in line for line in progress)
    assert out.count("check (b) vs (c) step") == 4 and out.count("check (e) vs (d) step") == 4
    assert out.count("check (g) vs (f) step") == 4
    assert "ms/step" in out and "/ hand" in out and "lower is better" in out
    rows = _rows(out)
    for name in ("mlp512", "mlp1024"):
        mine = {v: rows[(name, v)] for v in VARIANTS.values()}
        ms = {v[1]: t[0] for v, t in mine.items()}
        assert all(t > 0 for t in ms.values())
        cells = {v[1]: t for v, t in mine.items()}
        assert cells["a"][1:] == ("-", "-", "-") and cells["b"][1:3] == ("-", "-")
        assert cells["e"][1] == "-" and cells["g"][1] == "-"
        for key, hand in (("c", "b"), ("f", "g"), ("d", "e")):
            assert _ratio(cells[key][1]) == pytest.approx(ms[key] / ms[hand], abs=0.01, rel=0.01)
        for key in "cdefg":
            assert _ratio(cells[key][2]) == pytest.approx(ms[key] / ms["b"], abs=0.01, rel=0.01)
        for key in "bcdefg":
            assert _ratio(cells[key][3]) == pytest.approx(ms[key] / ms["a"], abs=0.01, rel=0.01)


def test_bench_live_gpt2(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("quadprog")
    assert main(QUICK + ["--problems", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert sum(1 for (name, _) in _rows(out) if name == "gpt2") == len(VARIANTS)


def test_a_failed_check_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(HandAGEM, "step", PlainAdamW.step)  # the "hand loop" forgets its projection
    assert main(QUICK + ["--problems", "mlp512"]) == 1
    captured = capsys.readouterr()
    assert "CHECK FAILED on mlp512" in captured.err and "(b) vs (c)" in captured.err
    assert "ms/step" not in captured.out  # nothing timed


def test_missing_optional_dependencies_skip_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "quadprog", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(QUICK + ["--problems", "mlp512,gpt2"]) == 0
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if "skipping" in line]
    assert len(skips) == 2
    assert "quadprog" in skips[0] and "(d) and (e)" in skips[0] and "transformers" in skips[1] and "gpt2" in skips[1]
    assert {v for (_, v) in _rows(out)} == {VARIANTS[k] for k in "abcfg"}
    assert "timing 5 variants" in out and "(e) vs (d)" not in out


@pytest.mark.parametrize("argv", [["--problems", "mlp9"], ["--problems", ","], ["--steps", "0"]])
def test_bad_live_options_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--live", *argv])
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_live_with_sweep_is_one_line(capsys):
    assert main(["bench", "--live", "--sweep", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradsafe bench: --live")


def test_ratios_are_paired_by_repeat(problem):
    # a repeat slowed by a load that came and went moves both variants: the paired ratio ignores it
    res = live.ProblemTimes(problem, {"b": [1.0, 1.0, 20.0], "c": [1.0, 2.0, 10.0]})
    assert res.median == {"b": 1.0, "c": 2.0}
    assert res.ratio("c", "b") == pytest.approx(1.0)
    assert res.ratio("c", "e") is None
    table = live.format_live_table([res])
    assert "   1.00x" in table.splitlines()[-1]
