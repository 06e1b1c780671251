"""The study's statistics: ranks, correlations, bootstrap intervals, the tuning's selection, aggregation.

- ``bootstrap_ci``: the 95% percentile bootstrap interval of a mean over seeds;
- ``select``: per scenario and method, the development setting with the best mean criterion
  (ties: fewer steps, then the smaller learning rate);
- ``aggregate``: the report runs -> per scenario, condition and method the mean, interval
  and values over seeds of every final metric and cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .jobs import Job, StudyConfig, grid, make_scenario
from .methods import METHODS
from .scenario import Setting

__all__ = ["pearson", "rankdata", "spearman", "bootstrap_ci", "bootstrap_stat", "select", "aggregate",
           "summarise", "BOOTSTRAP", "BOOTSTRAP_SEED"]

BOOTSTRAP = 2000
BOOTSTRAP_SEED = 12345


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; nan when fewer than 3 points or a constant input."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("pearson needs two 1-D sequences of the same length")
    if len(a) < 3:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks (ties averaged)."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    return pearson(rankdata(x), rankdata(y))




def bootstrap_stat(groups: Sequence[Sequence[Any]], stat: Callable[..., float], n: int = BOOTSTRAP,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of ``stat(*resampled groups)``, each group resampled with replacement.

    Resamples whose statistic is not finite are left out; (nan, nan) if none is finite.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        resampled = [[g[i] for i in rng.integers(0, len(g), len(g))] for g in groups]
        v = stat(*resampled)
        if v is not None and np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, 95% bootstrap interval and the values."""
    v = [float(x) for x in values]
    lo, hi = bootstrap_ci(v)
    return {"mean": float(np.mean(v)), "lo": lo, "hi": hi, "values": v}


def select(cfg: StudyConfig, results: dict[Job, dict[str, Any]]) -> dict[str, Any]:
    """The tuning's selection: per scenario and method the best setting, and every development score.

    A method is selected only when its whole grid ran on every development seed; the others
    are listed as ``incomplete`` (an interrupted tuning) and report untuned.
    """
    out: dict[str, Any] = {}
    for name in cfg.scenarios:
        sc = make_scenario(name, cfg.quick)
        scores: dict[str, dict[str, dict[str, Any]]] = {}
        for job, res in results.items():
            if job.kind == "run" and job.phase == "tune" and job.scenario == name:
                assert job.method and job.setting
                entry = scores.setdefault(job.method, {}).setdefault(
                    job.setting.key(), {"setting": job.setting.as_dict(), "values": [], "seeds": []})
                entry["values"].append(sc.criterion(res["final"]))
                entry["seeds"].append(job.seed)
        chosen = {}
        incomplete = []
        for method, by_setting in scores.items():
            for e in by_setting.values():
                e["mean"] = float(np.mean(e["values"]))
            complete = {s.key() for s in grid(sc, method)} <= set(by_setting) and all(
                sorted(e["seeds"]) == sorted(cfg.dev_seeds) for e in by_setting.values())
            if not complete:  # a selection over part of the grid would not be the protocol's
                incomplete.append(method)
                continue
            best = max(by_setting.values(), key=lambda e: (round(e["mean"], 9), -e["setting"]["steps"], -e["setting"]["lr"]))
            chosen[method] = best["setting"]
        out[name] = {"selected": chosen, "scores": scores, "criterion": sc.criterion_label,
                     "condition": sc.tuned_condition, "incomplete": incomplete}
    return out


def settings_from(selection: dict[str, Any], cfg: StudyConfig, fallback: Callable[[Any, str], Setting]
                  ) -> tuple[dict[str, dict[str, Setting]], dict[str, list[str]]]:
    """Per scenario and method the setting to report with; and the methods with no selection (fallback used)."""
    settings: dict[str, dict[str, Setting]] = {}
    untuned: dict[str, list[str]] = {}
    for name in cfg.scenarios:
        sc = make_scenario(name, cfg.quick)
        chosen = selection.get(name, {}).get("selected", {})
        settings[name] = {}
        for m in filter(sc.in_demo if cfg.subset else sc.runs_method, cfg.methods):
            if m in chosen:
                settings[name][m] = Setting.from_dict(chosen[m])
            else:
                settings[name][m] = fallback(sc, m)
                untuned.setdefault(name, []).append(m)
    return settings, untuned


def aggregate(cfg: StudyConfig, results: dict[Job, dict[str, Any]], settings: dict[str, dict[str, Setting]],
              untuned: dict[str, list[str]], selection: dict[str, Any], wall_seconds: float | None = None
              ) -> dict[str, Any]:
    """Everything the tables, plots and JSON show."""
    out: dict[str, Any] = {
        "meta": {
            "quick": cfg.quick,
            "tuned_here": cfg.tune,
            "subset": cfg.subset,
            "report_seeds": list(cfg.report_seeds),
            "dev_seeds": list(cfg.dev_seeds),
            "scenarios": list(cfg.scenarios),
            "methods": {n: {"label": METHODS[n].label, "family": METHODS[n].family, "note": METHODS[n].note,
                            "base": METHODS[n].base, "space": METHODS[n].space} for n in cfg.methods},
            "workers": cfg.workers,
            "torch": torch.__version__,
            "wall_seconds": wall_seconds,
            "untuned": untuned,
        },
        "selection": selection,
    }
    for name in cfg.scenarios:
        sc = make_scenario(name, cfg.quick)
        pre = {j.seed: r for j, r in results.items() if j.kind == "pretrain" and j.scenario == name}
        block: dict[str, Any] = {"config": sc.describe(), "protected": sc.protected.key, "new": sc.new.key,
                                 "metrics": [m.key for m in sc.metrics],
                                 "settings": {m: s.as_dict() for m, s in settings[name].items()},
                                 "conditions": {}, "runs": []}
        if pre and "metrics" in next(iter(pre.values())):  # the aligned model's metrics (the safety scenarios)
            block["aligned"] = {k: summarise([r["metrics"][k] for r in pre.values()])
                                for k in next(iter(pre.values()))["metrics"]}
        for cond in cfg.conditions.get(name, ()) + cfg.plain_conditions.get(name, ()):
            methods = {}
            for m in cfg.methods:
                runs = [(j, r) for j, r in results.items()
                        if j.kind == "run" and j.phase == "report" and j.scenario == name and j.condition == cond
                        and j.method == m]
                if not runs:
                    continue
                runs.sort(key=lambda jr: jr[0].seed)
                finals = [r["final"] for _, r in runs]
                methods[m] = {
                    "seeds": [j.seed for j, _ in runs],
                    "final": {k: summarise([f[k] for f in finals]) for k in finals[0]},
                    "criterion": summarise([sc.criterion(f) for f in finals]),
                    "cost": {k: summarise([r["cost"][k] for _, r in runs]) for k in ("example_grads", "train_seconds")},
                    "wall_seconds": summarise([r["wall_seconds"] for _, r in runs]),
                }
                for j, r in runs:
                    block["runs"].append({"seed": j.seed, "condition": cond, "method": m, "final": r["final"],
                                          "criterion": sc.criterion(r["final"]), "stages": r["stages"],
                                          "cost": r["cost"]})
            block["conditions"][cond] = {"methods": methods}
        out[name] = block
    return out
