"""``gradsafe demo``: the quick run through the command line, its outputs, its options."""

from __future__ import annotations

import argparse
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from gradsafe import cli  # noqa: E402
from gradsafe.experiments import demo, jobs, study  # noqa: E402
from gradsafe.experiments.methods import METHODS, QUICK_METHODS  # noqa: E402


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


def test_parse_seeds_and_config():
    assert demo.parse_seeds("3") == (0, 1, 2)
    assert demo.parse_seeds("0,4,7") == (0, 4, 7)
    for bad in ("0", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            demo.parse_seeds(bad)
    assert study.make_config is jobs.make_config
    cfg = jobs.make_config(quick=True)
    assert cfg.seeds == (0,) and cfg.methods == QUICK_METHODS
    assert jobs.make_config().seeds == (0, 1, 2) and len(jobs.make_config().methods) == len(METHODS)
    with pytest.raises(ValueError):
        jobs.make_config(scenarios=["vision"])


def test_cli_rejects_unknown_methods(capsys):
    assert cli.main(["demo", "--methods", "plain,magic", "--no-progress"]) == 2
    assert "unknown methods" in capsys.readouterr().err
