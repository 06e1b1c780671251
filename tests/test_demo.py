"""``gradsafe demo``: structure of the result, determinism, and the command line."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")

from gradsafe import cli  # noqa: E402
from gradsafe.experiments import demo  # noqa: E402
from gradsafe.experiments.data import make_tasks  # noqa: E402


@pytest.fixture(scope="module")
def quick_result():
    return demo.run_demo(seed=0, quick=True)


def test_quick_result_structure(quick_result):
    res = quick_result
    keys = ("seed", "quick", "setting", "task_a", "task_b", "config")
    keys += ("acc_a_before", "acc_b_before", "methods", "seconds")
    for key in keys:
        assert key in res, key
    assert res["quick"] is True and res["setting"] == "permuted"
    assert list(res["methods"]) == list(demo.METHODS)
    chance = res["config"]["chance"]
    # A broken training loop or data pipeline would sit near chance (0.1).
    assert res["acc_a_before"] > 0.5
    for name, r in res["methods"].items():
        for key in ("acc_a_after", "kept", "acc_b", "seconds"):
            assert key in r, (name, key)
        assert 0.0 <= r["acc_a_after"] <= 1.0
        assert 0.0 <= r["acc_b"] <= 1.0
        assert math.isclose(r["kept"], r["acc_a_after"] / res["acc_a_before"], rel_tol=1e-9)
        if name != "plain":
            assert set(r["report_mean"]) >= {"cosine", "conflict", "energy_in_subspace", "energy_removed"}
            assert 0.0 <= r["conflict_steps"] <= 1.0
            assert all(math.isfinite(v) for v in r["report_mean"].values())
    # every method actually learned task B
    assert res["methods"]["plain"]["acc_b"] > 0.5
    for r in res["methods"].values():
        assert r["acc_b"] > 2 * chance
    # the result is JSON as it stands
    json.loads(json.dumps(res))


def test_quick_table_mentions_every_method(quick_result):
    text = demo.format_result(quick_result)
    assert "Task A kept" in text
    assert "plain fine-tuning" in text
    assert "A-GEM" in text and "rank" in text and "damping" in text


def test_deterministic_for_a_seed():
    kw = dict(steps_a=40, steps_b=15, memory=16, rank=8, methods=("project", "conflict"))
    r1 = demo.run_demo(seed=3, **kw)
    r2 = demo.run_demo(seed=3, **kw)
    for name in ("plain", "project", "conflict"):
        for key in ("acc_a_after", "acc_b", "report_mean"):
            assert r1["methods"][name].get(key) == r2["methods"][name].get(key), (name, key)
    assert r1["acc_a_before"] == r2["acc_a_before"]


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_demo(methods=("plain", "magic"))


def test_tasks_are_fixed():
    t1, t2 = make_tasks("permuted"), make_tasks("permuted")
    assert (t1.b.x_test == t2.b.x_test).all()
    assert not (t1.a.x_train == t1.b.x_train).all()  # B is a different input distribution
    assert (t1.a.y_train == t1.b.y_train).all()
    split = make_tasks("split")
    assert int(split.a.y_train.max()) == 4 and int(split.b.y_train.max()) == 4
    assert split.a.head == 0 and split.b.head == 1


def test_cli_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Task A kept" in printed and "wall time" in printed
    res = json.loads(out.read_text())
    assert set(res["methods"]) == set(demo.METHODS)
    assert res["acc_a_before"] > 0.5
    assert "wall_seconds" in res
