"""The digits task sequences, the continual-learning plug-in, and a third plug-in through the whole study."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("sklearn")

from gradsafe.experiments import continual, jobs, study  # noqa: E402
from gradsafe.experiments.data import make_sequence, make_tasks  # noqa: E402
from gradsafe.experiments.methods import Protected  # noqa: E402
from gradsafe.experiments.runner import Stage, run_stage  # noqa: E402
from gradsafe.experiments.scenario import Metric, Scenario, Setting  # noqa: E402

TINY = continual.ContinualConfig(tasks={"permuted": 3, "split-class": 3}, memory={"permuted": 8, "split-class": 8},
                                 pretrain_steps=20, eval_every=6, steps_grid=(12,))


def test_task_sequences():
    tasks, heads, classes = make_sequence("permuted", 10)
    assert len(tasks) == 10 and heads == 1 and classes == 10
    assert torch.equal(tasks[1].x_test, make_tasks("permuted").b.x_test)
    tasks, heads, classes = make_sequence("split-class")
    assert heads == 1 and classes == 10 and [int(t.y_train.max()) for t in tasks] == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        make_sequence("rotated")


def test_the_full_protocol_sizes():
    sc = jobs.make_scenario("continual")
    assert sc.config.tasks["permuted"] >= 10 and sc.tuned_condition == "permuted"
    assert set(sc.conditions) == {"permuted", "split-class"}


def test_continual_run_is_deterministic_and_its_metrics_follow_the_matrix():
    sc = continual.ContinualScenario(config=TINY)
    pre = sc.pretrain(3, "permuted")
    s = Setting(1e-3, 12, ())
    r1 = sc.run(3, "permuted", "agem", s, pre)
    r2 = sc.run(3, "permuted", "agem", s, pre)
    assert r1["final"] == r2["final"] and r1["stages"][0]["windows"] == r2["stages"][0]["windows"]
    R = np.array(r1["acc_matrix"])
    b = pre["untrained"]
    f = r1["final"]
    assert f["acc"] == pytest.approx(R[2].mean())
    assert f["bwt"] == pytest.approx(np.mean([R[2, 0] - R[0, 0], R[2, 1] - R[1, 1]]))
    assert f["fwt"] == pytest.approx(np.mean([R[0, 1] - b[1], R[1, 2] - b[2]]))
    assert f["learn_acc"] == pytest.approx(np.mean([R[1, 1], R[2, 2]]))
    assert [st["stage"] for st in r1["stages"]] == [1, 2]
    assert r1["cost"]["steps"] == 24
    other = sc.run(3, "permuted", "agem", Setting(1e-3, 12, ()), pre, monitor=False)
    assert other["final"] == r1["final"]  # the monitor only watches
    assert sc.run(3, "split-class", "plain", s, sc.pretrain(3, "split-class"))["final"]["acc"] <= 1.0


# ----------------------------------------------------------------------------- a third plug-in
class Blobs(Scenario):
    """Two tasks on the same Gaussian points (task 2 relabels them): all a new plug-in has to write."""

    def __init__(self) -> None:
        super().__init__(name="blobs", title="two blob tasks", conditions=("shift",), tuned_condition="shift",
                         protected=Metric("old", "task 1 accuracy"), new=Metric("new", "task 2 accuracy"),
                         metrics=(), criterion_label="(old + new) / 2", steps_grid=(8,),
                         lr_grid={"adamw": (1e-2,), "sgd": (0.1,)})
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(80, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.y[40:] = (self.x[40:, 1] > 0).long()

    def _model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def _acc(self, m, lo: int) -> float:
        with torch.no_grad():
            return float((m(self.x[lo:lo + 40]).argmax(1) == self.y[lo:lo + 40]).float().mean())

    def pretrain(self, seed, key):
        m = self._model(seed)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(m(self.x[:40]), self.y[:40]).backward()
            opt.step()
        return {"state": m.state_dict()}

    def run(self, seed, condition, method, setting, pretrained, monitor=True):
        m = self._model(seed)
        m.load_state_dict(pretrained["state"])
        x, y = self.x, self.y
        prot = Protected("task 1", m, torch.arange(10), loss=lambda mm, i: F.cross_entropy(mm(x[i]), y[i]),
                         logits=lambda mm, i: mm(x[i]), target_logit=lambda mm, i: mm(x[i]).gather(1, y[i, None]).mean(),
                         forward=lambda mm, i: mm(x[i]), pool=torch.arange(40))
        batches = [torch.arange(40, 80)[torch.randperm(40, generator=torch.Generator().manual_seed(s))[:8]]
                   for s in range(setting.steps)]
        stage = Stage(batches, lambda mm, i: F.cross_entropy(mm(x[i]), y[i]), lambda mm, i: mm(x[i]), [prot],
                      lambda: {"protected": self._acc(m, 0), "new": self._acc(m, 40),
                               "protected_loss": float(F.cross_entropy(m(x[:40]), y[:40]).detach())},
                      eval_every=4, seed=seed, monitor=monitor)
        res = run_stage(m, method, setting.knob_dict, setting.lr, stage)
        final = {"old": self._acc(m, 0), "new": self._acc(m, 40)}
        return {"final": final, "stages": [{"stage": 1, **{k: res[k] for k in ("cosine", "curve", "windows")}}],
                "cost": res["cost"]}

    def criterion(self, final):
        return (final["old"] + final["new"]) / 2


def test_a_third_scenario_plugs_in_without_touching_the_protocol(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(jobs.FACTORIES, "blobs", lambda quick: Blobs())
    cfg = jobs.make_config(scenarios=["blobs"], seeds=[0, 1], methods=["replay", "ewc"], workers=1, tune=True)
    agg = study.run_study(cfg, out_dir=str(tmp_path), printer=None)
    sel = agg["selection"]["blobs"]
    assert set(sel["selected"]) == {"plain", "replay", "ewc"}
    assert len(sel["scores"]["replay"]) == 2 and len(sel["scores"]["plain"]) == 1  # share {0.25, 0.5}; plain has no knob
    for m in ("plain", "replay", "ewc"):
        best = max(e["mean"] for e in sel["scores"][m].values())
        chosen = next(e for e in sel["scores"][m].values() if e["setting"] == sel["selected"][m])
        assert chosen["mean"] == best
        assert agg["blobs"]["conditions"]["shift"]["methods"][m]["seeds"] == [0, 1]
    md = (tmp_path / "results.md").read_text()
    assert "## blobs: two blob tasks" in md and "### blobs: `shift`" in md
    assert (tmp_path / "blobs_pareto.png").stat().st_size > 1000
    assert agg["predictions"]["a"]["verdict"] == "not run"  # the predictions need the two domains
    # the tuning's journal: a second tuning reruns nothing and selects the same
    journal = tmp_path / "tuning.jsonl"
    assert len(journal.read_text().splitlines()) == 2 * (1 + 2 + 2)  # dev seeds x (plain, replay's 2, ewc's 2)
    assert study.tune(cfg, journal=str(journal))["selection"]["blobs"]["selected"] == sel["selected"]
    assert len(journal.read_text().splitlines()) == 10
    # an interrupted tuning: a method whose grid did not finish is not selected
    from gradsafe.experiments import stats

    results = jobs.read_journal(str(journal))
    dropped = next(j for j in results if j.method == "replay")
    del results[dropped]
    part = stats.select(cfg, results)["blobs"]
    assert "replay" not in part["selected"] and part["incomplete"] == ["replay"]
    assert part["selected"]["ewc"] == sel["selected"]["ewc"]
