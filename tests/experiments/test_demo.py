"""``gradsafe demo``: the quick run through the command line, its outputs, its options."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from gradsafe import cli  # noqa: E402
from gradsafe.experiments import demo, jobs, lm_safety, study  # noqa: E402
from gradsafe.experiments.methods import DEFAULT_METHODS, METHODS, QUICK_METHODS  # noqa: E402


# ----------------------------------------------------------------------------- the quick run, through the CLI
def _quick_cli(out, *args):
    """``gradsafe demo --quick ARGS --out OUT``: its exit code, what it printed, the folder."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", *args, "--out", str(out), "--no-progress"])
    return rc, buf.getvalue(), out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _quick_cli(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The label-flip toy (in ``--full``, not in the default demo), quick, two methods."""
    return _quick_cli(tmp_path_factory.mktemp("toy"), "--scenario", "safety", "--methods", "agem")


def test_quick_cli_prints_tables_and_verdicts(quick_run):
    rc, printed, _ = quick_run
    assert rc == 0
    for text in ("## continual:", "## lm-safety:", "character-level GPT", "### lm-safety: `harmful-0.1`", "| method |",
                 "## Settings used", "(a) methods rank the same", "(d) the monitor warns", "wall time",
                 "Continual against `lm-safety`", "Aligned language model"):
        assert text in printed, text
    for name in QUICK_METHODS:
        assert METHODS[name].label in printed
    width = max(len(line) for line in printed.splitlines() if line.startswith("|"))
    assert width <= 120, width


def test_quick_json_structure(quick_run):
    _, _, out = quick_run
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"meta", "continual", "lm-safety", "selection", "predictions"} and "safety" not in res
    assert res["meta"]["quick"] is True and res["meta"]["report_seeds"] == [0]
    assert list(res["meta"]["methods"]) == list(QUICK_METHODS)
    for scen, conds in (("continual", ["permuted"]), ("lm-safety", ["harmful-0.1"])):
        block = res[scen]
        assert list(block["conditions"]) == conds
        for cond in conds:
            methods = block["conditions"][cond]["methods"]
            assert list(methods) == list(QUICK_METHODS)
            for m in methods.values():
                for stat in list(m["final"].values()) + [m["criterion"]]:
                    assert set(stat) == {"mean", "lo", "hi", "values"}
                    assert stat["lo"] <= stat["mean"] <= stat["hi"]
                assert m["cost"]["example_grads"]["mean"] > 0
            plain, agem = methods["plain"], methods["agem"]
            assert agem["cost"]["example_grads"]["mean"] > plain["cost"]["example_grads"]["mean"]  # live references
        for r in block["runs"]:
            for st in r["stages"]:
                assert len(st["windows"]["predicted"]) == len(st["curve"]["step"]) - 1 > 0
                assert -1.0 <= st["cosine"] <= 1.0
    c = res["continual"]["conditions"]["permuted"]["methods"]["plain"]["final"]
    assert set(c) >= {"acc", "bwt", "fwt", "learn_acc", "old_acc", "new_acc"}
    s = res["lm-safety"]["conditions"]["harmful-0.1"]["methods"]["plain"]["final"]
    assert set(s) >= {"refusal", "harmful", "ft_acc", "helpful", "over_refusal", "harmful_rise"}
    assert res["lm-safety"]["aligned"]["harmful"]["mean"] < 0.5  # the shipped aligned model refuses
    # quick ignores the protocol's selection, and says so; lm-safety runs the protocol's methods only
    assert res["meta"]["untuned"]["continual"] == list(QUICK_METHODS)
    assert res["meta"]["untuned"]["lm-safety"] == [m for m in QUICK_METHODS if m in DEFAULT_METHODS]
    assert res["predictions"]["safety"] == "lm-safety" and res["predictions"]["also"] == {}
    for key in "abcd":
        assert res["predictions"][key]["verdict"] in ("confirmed", "refuted", "inconclusive", "not run")


def test_quick_toy_safety(toy_run):
    rc, printed, out = toy_run
    assert rc == 0
    for text in ("## safety:", "label-flip toy", "### safety: `benign-only`", "Continual against `safety`"):
        assert text in printed, text
    res = json.loads((out / "results.json").read_text())
    s = res["safety"]["conditions"]["harmful-0.1"]["methods"]["plain"]["final"]
    assert set(s) >= {"refusal", "new_acc", "benign_acc", "refusal_drop", "refusal_align"}
    assert res["safety"]["aligned"]["refusal"]["mean"] > 0.5  # the aligned model refuses the held-out family
    assert set(res["safety"]["conditions"]["harmful-0.1"]["methods"]) == {"plain", "agem"}
    assert res["predictions"]["a"]["verdict"] == "not run"  # one domain only


def test_quick_outputs_written(quick_run):
    _, _, out = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# gradsafe study results")
    assert md.count("| method |") >= 3 and "## The thesis's predictions" in md
    for png in ("continual_pareto.png", "lm-safety_pareto.png", "continual_curves.png", "lm-safety_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert f"({png})" in md


def test_grid_is_the_protocols():
    sc = jobs.make_scenario("safety")
    assert len(jobs.grid(sc, "plain")) == 3 * 2
    assert len(jobs.grid(sc, "ewc")) == 3 * 2 * 2
    assert {s.lr for s in jobs.grid(sc, "ogd")} == {0.01, 0.03, 0.1}  # SGD's grid
    assert {s.steps for s in jobs.grid(sc, "plain")} == {100, 200}
    lm = jobs.make_scenario("lm-safety")  # the protocol's budget there: seven methods, two learning rates
    assert len(jobs.grid(lm, "plain")) == 2 * 2 and len(jobs.grid(lm, "safegrad")) == 2 * 2 * 2
    assert [m for m in METHODS if lm.runs_method(m)] == [m for m in METHODS if m in DEFAULT_METHODS]
    lm_tune = jobs.tune_jobs(jobs.make_config(scenarios=["lm-safety"], methods=["gem", "safegrad"]))
    assert {j.method for j in lm_tune} == {"plain", "safegrad"}
    cfg = jobs.make_config(methods=["ewc"])
    tune = jobs.tune_jobs(cfg)
    assert {j.seed for j in tune} == set(jobs.DEV_SEEDS) and not set(jobs.DEV_SEEDS) & set(cfg.report_seeds)
    assert {j.condition for j in tune} == {"permuted", "harmful-0.1"}
    assert len(cfg.report_seeds) >= 5
    stored = jobs.load_selection()  # the shipped selection: every setting is a point of the protocol's grid
    for scen, block in stored["selection"].items():
        sc = jobs.make_scenario(scen)
        for method, chosen in block["selected"].items():
            assert chosen in [s.as_dict() for s in jobs.grid(sc, method)], (scen, method)


def test_parse_seeds_and_config():
    assert demo.parse_seeds("3") == (0, 1, 2)
    assert demo.parse_seeds("0,4,7") == (0, 4, 7)
    for bad in ("0", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            demo.parse_seeds(bad)
    assert study.make_config is jobs.make_config
    cfg = jobs.make_config(quick=True)
    assert cfg.report_seeds == (0,) and cfg.methods == QUICK_METHODS
    full = jobs.make_config(full=True)
    assert full.report_seeds == (0, 1, 2, 3, 4) and len(full.methods) == len(METHODS) and full.tune
    assert full.conditions["safety"] == jobs.make_scenario("safety").conditions
    assert full.scenarios == jobs.FULL_SCENARIOS and "safety" in full.scenarios
    default = jobs.make_config()
    assert default.scenarios == jobs.SCENARIOS == ("continual", "lm-safety")
    assert not default.tune and "split-class" in default.plain_conditions["continual"]
    assert default.plain_conditions["lm-safety"] == ()  # its subset: the tuned condition only
    assert default.subset and default.methods == DEFAULT_METHODS and not full.subset
    assert not jobs.make_config(methods=["ewc"]).subset and not jobs.make_config(tune=True).subset
    with pytest.raises(ValueError):
        jobs.make_config(scenarios=["vision"])
    with pytest.raises(ValueError, match="development seeds"):
        jobs.make_config(seeds=[0, 100])


def test_the_default_demo_is_a_subset_of_the_full_report():
    """Every run of the default demo is the same job, at the same setting, as one of ``--full``'s."""
    default, full = jobs.make_config(), jobs.make_config(full=True)
    selection = {name: {m: jobs.default_setting(jobs.make_scenario(name), m) for m in METHODS} for name in full.scenarios}
    ours, theirs = jobs.report_jobs(default, selection), set(jobs.report_jobs(full, selection))
    assert ours and set(ours) <= theirs and len(ours) < len(theirs)
    assert {j.method for j in ours} == set(DEFAULT_METHODS)
    lm = [j for j in ours if j.scenario == "lm-safety"]  # its own smaller subset, the tuned condition only
    assert {j.method for j in lm} == set(lm_safety.DEMO_METHODS) and {j.condition for j in lm} == {"harmful-0.1"}
    assert len(lm) == len(lm_safety.DEMO_METHODS) * len(jobs.REPORT_SEEDS)


def test_cli_rejects_unknown_methods(capsys):
    assert cli.main(["demo", "--methods", "plain,magic", "--no-progress"]) == 2
    assert "unknown methods" in capsys.readouterr().err
