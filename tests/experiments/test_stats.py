"""The study's statistics: ranks, correlations, the thesis test (``gradsafe.experiments.stats``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradsafe.experiments import predictions, stats, study


def test_rankdata_ties():
    assert stats.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert stats.rankdata([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]
    assert stats.rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_example():
    # ranks of y: [1, 2, 3.5, 5, 3.5]; deviations from 3: x [-2,-1,0,1,2], y [-2,-1,.5,2,.5]
    # sum dx dy = 8, sum dx^2 = 10, sum dy^2 = 9.5  ->  rho = 8 / sqrt(95)
    rho = stats.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert math.isclose(rho, 8 / math.sqrt(95), rel_tol=1e-12)
    assert math.isclose(stats.spearman([1, 2, 3, 4], [1, 10, 100, 1000]), 1.0)
    assert math.isclose(stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)


def test_pearson_matches_numpy_and_degenerate_cases():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert math.isclose(stats.pearson(x, y), float(np.corrcoef(x, y)[0, 1]), rel_tol=1e-10)
    assert math.isnan(stats.pearson([1, 1, 1], [1, 2, 3]))  # constant input
    assert math.isnan(stats.pearson([1, 2], [1, 2]))  # too few points
    with pytest.raises(ValueError):
        stats.pearson([1, 2, 3], [1, 2])


def test_bootstrap_ci_against_a_direct_resampling():
    values = [0.2, 0.5, 0.4, 0.9, 0.6]
    lo, hi = stats.bootstrap_ci(values, n=4000, seed=3)
    rng = np.random.default_rng(3)
    means = np.asarray(values)[rng.integers(0, 5, (4000, 5))].mean(1)
    assert (lo, hi) == tuple(np.percentile(means, [2.5, 97.5]))
    assert lo < np.mean(values) < hi and min(values) <= lo and hi <= max(values)
    assert stats.bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    s = stats.summarise(values)
    assert s["mean"] == pytest.approx(0.52) and s["values"] == values


def _agg(crit_a, crit_b, seeds=5):
    """A hand-made aggregate: per method, criterion values over seeds in each domain."""
    def block(crit, cond):
        methods = {m: {"criterion": {"values": [c + 0.001 * s for s in range(seeds)]}} for m, c in crit.items()}
        return {"config": {"tuned_condition": cond}, "conditions": {cond: {"methods": methods}}, "runs": []}

    return {"meta": {"methods": list(crit_a)}, "continual": block(crit_a, "permuted"),
            "safety": block(crit_b, "harmful-0.1")}


def test_prediction_a_verdicts():
    same = {"plain": 0.1, "replay": 0.5, "ewc": 0.3, "agem": 0.7, "ogd": 0.2}
    assert predictions.rank_agreement(_agg(same, same))["verdict"] == "confirmed"
    flipped = {m: -v for m, v in same.items()}
    a = predictions.rank_agreement(_agg(same, flipped))
    assert a["rho"] == pytest.approx(-1.0) and a["verdict"] == "refuted"
    assert predictions.rank_agreement({"meta": {"methods": []}})["verdict"] == "not run"


def test_prediction_b_regret():
    def scores(best_knob):
        return {"ewc": {f"k{k}": {"setting": {"lr": 1e-3, "steps": 10, "knobs": {"lam": k}}, "mean": m}
                        for k, m in ((1.0, 0.9 if best_knob == 1.0 else 0.1), (2.0, 0.9 if best_knob == 2.0 else 0.1))}}

    def sel(best_a, best_b):
        return {"selection": {
            "continual": {"selected": {"ewc": {"lr": 1e-3, "steps": 10, "knobs": {"lam": best_a}}}, "scores": scores(best_a)},
            "safety": {"selected": {"ewc": {"lr": 1e-3, "steps": 10, "knobs": {"lam": best_b}}}, "scores": scores(best_b)}}}

    assert predictions.hyper_transfer(sel(1.0, 1.0))["verdict"] == "confirmed"
    b = predictions.hyper_transfer(sel(1.0, 2.0))
    assert b["median_regret"] == pytest.approx(1.0) and b["verdict"] == "refuted"
    assert predictions.hyper_transfer({"selection": {}})["verdict"] == "not run"
    partial = sel(1.0, 2.0)
    partial["selection"]["safety"]["selected"] = {}  # an unfinished grid in one domain
    assert predictions.hyper_transfer(partial)["verdict"] == "not run"


def _stage(protected, predicted, cosine=0.0):
    steps = list(range(0, 10 * len(protected), 10))
    return {"stage": 1, "cosine": cosine, "curve": {"step": steps, "protected": protected},
            "windows": {"predicted": predicted, "measured": [0.0] * len(predicted), "steps": [10] * len(predicted)}}


def test_prediction_d_warning_before_the_drop():
    early = _stage([1.0, 1.0, 0.9], [0.06, 0.0])  # warned at step 10, dropped at step 20
    late = _stage([1.0, 0.9, 0.8], [0.0, 0.06])  # dropped at 10, warned at 20
    quiet = _stage([1.0, 1.0, 1.0], [0.0, 0.0])
    runs = lambda *st: {"meta": {"methods": ["plain"]},  # noqa: E731
                        "continual": {"runs": [{"method": "plain", "stages": list(st), "condition": "c", "seed": 0}]}}
    d = predictions.monitor_warns(runs(early, early, quiet))
    assert d["warned_first"] == 1.0 and d["false_alarm"] == 0.0 and d["verdict"] == "confirmed"
    assert d["median_lead_steps"] == 10
    assert predictions.monitor_warns(runs(late, late, early))["verdict"] == "refuted"
    assert predictions.monitor_warns(runs(quiet))["verdict"] == "not run"


def test_prediction_c_cosine_and_erosion():
    def block(pairs):  # per dataset: (cosine, erosion), on seeds 0 and 1
        runs = [{"method": "plain", "condition": f"d{i}", "seed": s,
                 "stages": [_stage([1.0, 1.0 - e], [0.0], c)]} for i, (c, e) in enumerate(pairs) for s in (0, 1)]
        return {"runs": runs}

    good = block([(0.5, 0.0), (0.0, 0.2), (-0.5, 0.6), (-0.8, 0.9)])
    c = predictions.cosine_predicts_erosion({"continual": good, "safety": good})
    assert c["continual"]["rho"] == pytest.approx(1.0) and c["verdict"] == "confirmed"
    bad = block([(0.5, 0.9), (0.0, 0.6), (-0.5, 0.2), (-0.8, 0.0)])
    assert predictions.cosine_predicts_erosion({"continual": good, "safety": bad})["verdict"] == "refuted"


def test_predictions_judged_for_each_safety_domain_scenario():
    same = {"plain": 0.1, "replay": 0.5, "ewc": 0.3, "agem": 0.7, "ogd": 0.2}
    flipped = {m: -v for m, v in same.items()}
    agg = _agg(same, same)
    agg["lm-safety"] = _agg(same, flipped)["safety"]
    pred = predictions.all_predictions(agg)
    assert pred["safety"] == "safety" and pred["a"]["verdict"] == "confirmed"  # the toy first, as pre-registered
    lm = pred["also"]["lm-safety"]
    assert lm["safety"] == "lm-safety" and lm["a"]["verdict"] == "refuted" and lm["a"]["rho"] == pytest.approx(-1.0)
    del agg["safety"]
    alone = predictions.all_predictions(agg)  # the default demo: continual against lm-safety
    assert alone["safety"] == "lm-safety" and alone["a"]["verdict"] == "refuted" and alone["also"] == {}


def test_study_reexports_the_statistics():
    for name in ("pearson", "rankdata", "spearman", "aggregate", "bootstrap_ci"):
        assert getattr(study, name) is getattr(stats, name), name


def test_the_safety_conditions_are_parsed_once_for_both_scenarios_and_the_ratio_table():
    from gradsafe.experiments.scenario import harmful_share, safety_condition

    assert safety_condition("harmful-0.05") == ("harmful", 0.05)
    assert safety_condition("identity-shift") == ("identity-shift", 0.0)
    assert safety_condition("benign-only") == ("benign-only", 0.0)
    for bad in ("harmful-0", "harmful-1", "harmful-x", "toxic"):
        with pytest.raises(ValueError, match=f"unknown lm-safety condition '{bad}'"):
            safety_condition(bad, "lm-safety")
    assert [harmful_share(c) for c in ("benign-only", "harmful-0.2", "identity-shift", "harmful-2", "task-3")] == \
        [0.0, 0.2, None, None, None]
