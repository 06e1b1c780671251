"""The study's statistics: ranks, correlations, the thesis test (``gradsafe.experiments.stats``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradsafe.experiments import stats, study


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


def test_thesis_stats_on_a_hand_made_run():
    run = {"windows": {"predicted": [0.1, 0.2, -0.1, 0.3], "measured": [0.2, 0.4, -0.2, 0.6],
                       "measured_memory": [0.1, 0.2, -0.1, 0.3], "conflicts": [1, 2, 0, 3],
                       "steps": [5, 5, 5, 5], "stage": [1, 1, 2, 2]}}
    t = stats.thesis_stats([run])
    assert t["windows"] == 4 and t["runs"] == 1
    assert math.isclose(t["pearson_window"], 1.0) and math.isclose(t["slope_window"], 2.0)
    assert math.isclose(t["slope_window_memory"], 1.0) and t["sign_agreement"] == 1.0
    # running sums restart with each stage: predicted [.1, .3, -.1, .2], measured [.2, .6, -.2, .4]
    assert math.isclose(t["pearson_cumulative"], 1.0)
    assert math.isclose(t["spearman_cumulative"], 1.0)



def test_study_reexports_the_statistics():
    for name in ("pearson", "rankdata", "spearman", "thesis_stats", "aggregate"):
        assert getattr(study, name) is getattr(stats, name), name
