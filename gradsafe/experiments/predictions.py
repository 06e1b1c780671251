"""The thesis's predictions (a)-(d) of docs/study.md, each with its verdict computed here.

Every function takes the aggregated results (``stats.aggregate``) and returns a dict with
the statistic, its interval where it has one, what it was computed on, and ``verdict``:
"confirmed", "refuted" or "inconclusive" by the rule docs/study.md fixed before the runs
(or "not run" when the runs it needs are missing).

Each prediction compares continual learning with one safety-domain scenario (``safety`` argument,
default the toy ``"safety"``); ``all_predictions`` judges each safety-domain scenario present
(``SAFETY_DOMAIN``) against continual by the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .stats import BOOTSTRAP, BOOTSTRAP_SEED, spearman

__all__ = ["rank_agreement", "hyper_transfer", "cosine_predicts_erosion", "monitor_warns", "all_predictions",
           "WARN_NATS", "DROP", "SAFETY_DOMAIN"]

SAFETY_DOMAIN = ("safety", "lm-safety")  # the scenarios that stand for the safety domain, in report order

WARN_NATS = 0.05  # (d): the monitor's running predicted protected-loss increase that counts as a warning
DROP = 0.05  # (d): the protected metric's drop that counts as erosion


def _not_run(why: str) -> dict[str, Any]:
    return {"verdict": "not run", "why": why}


def _tuned_condition(block: dict[str, Any]) -> str:
    return block["config"]["tuned_condition"]


def rank_agreement(agg: dict[str, Any], safety: str = "safety") -> dict[str, Any]:
    """(a) Spearman's rho between the methods' criteria in the two domains, bootstrap over seeds per domain."""
    if "continual" not in agg or safety not in agg:
        return _not_run("needs both scenarios")
    a = agg["continual"]["conditions"].get(_tuned_condition(agg["continual"]), {}).get("methods", {})
    b = agg[safety]["conditions"].get(_tuned_condition(agg[safety]), {}).get("methods", {})
    names = [m for m in a if m in b and m != "joint"]  # the upper bound is not a method one would choose
    if len(names) < 3:
        return _not_run("fewer than 3 methods run in both domains")
    va = np.array([a[m]["criterion"]["values"] for m in names])  # methods x seeds
    vb = np.array([b[m]["criterion"]["values"] for m in names])
    rho = spearman(va.mean(1), vb.mean(1))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    boots = []
    for _ in range(BOOTSTRAP):
        ia = rng.integers(0, va.shape[1], va.shape[1])
        ib = rng.integers(0, vb.shape[1], vb.shape[1])
        r = spearman(va[:, ia].mean(1), vb[:, ib].mean(1))
        if np.isfinite(r):
            boots.append(r)
    lo, hi = (np.percentile(boots, [2.5, 97.5]).tolist() if boots else (float("nan"), float("nan")))
    verdict = "confirmed" if lo > 0 else ("refuted" if hi < 0.3 else "inconclusive")
    return {"rho": rho, "lo": lo, "hi": hi, "methods": names, "verdict": verdict,
            "rule": "confirmed if the 95% interval's lower bound > 0; refuted if its upper bound < 0.3"}


def hyper_transfer(agg: dict[str, Any], safety: str = "safety") -> dict[str, Any]:
    """(b) The normalised regret of using the other domain's selected knob values (development runs)."""
    sel = agg.get("selection", {})
    if "continual" not in sel or safety not in sel or not sel["continual"].get("scores") or not sel[safety].get("scores"):
        return _not_run("needs the tuning's development scores of both scenarios")
    regrets: dict[str, float] = {}
    for src, dst in (("continual", safety), (safety, "continual")):
        for method, chosen in sel[src]["selected"].items():
            knobs = chosen["knobs"]
            if method not in sel[dst].get("selected", {}):  # its grid did not finish there: no regret to read
                continue
            scores = sel[dst]["scores"].get(method)
            if not knobs or not scores:
                continue
            means = [e["mean"] for e in scores.values()]
            same = [e["mean"] for e in scores.values() if e["setting"]["knobs"] == knobs]
            spread = max(means) - min(means)
            if not same:
                continue
            regrets[f"{method} {src}->{dst}"] = (max(means) - max(same)) / spread if spread > 0 else 0.0
    if not regrets:
        return _not_run("no method with its own knobs was tuned in both domains")
    med = float(np.median(list(regrets.values())))
    verdict = "confirmed" if med <= 0.25 else ("refuted" if med >= 0.5 else "inconclusive")
    return {"median_regret": med, "regrets": regrets, "verdict": verdict,
            "rule": "confirmed if the median normalised regret <= 0.25; refuted if >= 0.5"}


def _cosine_points(block: dict[str, Any]) -> dict[str, dict[int, tuple[float, float]]]:
    """Per dataset (condition, or condition and stage), per seed: (cosine, erosion) of plain's runs."""
    points: dict[str, dict[int, tuple[float, float]]] = {}
    for r in block["runs"]:
        if r["method"] != "plain":
            continue
        for st in r["stages"]:
            prot = st["curve"]["protected"]
            key = r["condition"] if len(r["stages"]) == 1 else f"{r['condition']} stage {st['stage']}"
            points.setdefault(key, {})[r["seed"]] = (float(st["cosine"]), float(prot[0] - prot[-1]))
    return points


def _spearman_over_seeds(points: dict[str, dict[int, tuple[float, float]]]) -> dict[str, Any]:
    keys = sorted(points)
    seeds = sorted(set.intersection(*(set(points[k]) for k in keys))) if keys else []
    if len(keys) < 3 or not seeds:
        return {"rho": float("nan"), "lo": float("nan"), "hi": float("nan"), "datasets": len(keys)}
    cos = np.array([[points[k][s][0] for s in seeds] for k in keys])
    ero = np.array([[points[k][s][1] for s in seeds] for k in keys])
    rho = spearman(-cos.mean(1), ero.mean(1))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    boots = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(seeds), len(seeds))
        r = spearman(-cos[:, i].mean(1), ero[:, i].mean(1))
        if np.isfinite(r):
            boots.append(r)
    lo, hi = (np.percentile(boots, [2.5, 97.5]).tolist() if boots else (float("nan"), float("nan")))
    return {"rho": rho, "lo": lo, "hi": hi, "datasets": len(keys), "seeds": len(seeds),
            "cosine": dict(zip(keys, cos.mean(1).tolist())), "erosion": dict(zip(keys, ero.mean(1).tolist()))}


def cosine_predicts_erosion(agg: dict[str, Any], safety: str = "safety") -> dict[str, Any]:
    """(c) Spearman's rho between -cosine at the stage's start and erosion, per domain (plain's runs)."""
    out: dict[str, Any] = {}
    for name in ("continual", safety):
        if name in agg:
            out[name] = _spearman_over_seeds(_cosine_points(agg[name]))
    if len(out) < 2 or any(v["datasets"] < 3 or not np.isfinite(v["rho"]) for v in out.values()):
        out["verdict"] = "not run" if len(out) < 2 or any(v["datasets"] < 3 for v in out.values()) else "inconclusive"
        out["why"] = "needs both domains with at least 3 datasets each"
        return out
    los = [out[n]["lo"] for n in ("continual", safety)]
    his = [out[n]["hi"] for n in ("continual", safety)]
    out["verdict"] = "confirmed" if min(los) > 0 else ("refuted" if min(his) <= 0 else "inconclusive")
    out["rule"] = "confirmed if the lower bound > 0 in both domains; refuted if the upper bound <= 0 in either"
    return out


def _warn_and_drop(stage: dict[str, Any]) -> tuple[int | None, int | None]:
    """The steps (from the stage's start) of the monitor's first warning and of the first erosion."""
    w = stage["windows"]
    curve = stage["curve"]
    if not w:
        return None, None
    steps = np.asarray(curve["step"]) - curve["step"][0]
    cum = np.cumsum(w["predicted"])
    warn = next((int(steps[i + 1]) for i, c in enumerate(cum) if c > WARN_NATS), None)
    prot = curve["protected"]
    drop = next((int(steps[i]) for i, v in enumerate(prot) if v <= prot[0] - DROP), None)
    return warn, drop


def monitor_warns(agg: dict[str, Any], methods: Sequence[str] = ("plain",),
                  scenarios: Sequence[str] = ("continual", "safety")) -> dict[str, Any]:
    """(d) Does the monitor's running prediction cross its threshold before the protected metric drops?"""
    eroding = warned_first = false_alarms = quiet = 0
    leads = []
    for name in scenarios:
        for r in agg.get(name, {}).get("runs", []):
            if r["method"] not in methods:
                continue
            for st in r["stages"]:
                warn, drop = _warn_and_drop(st)
                if drop is not None and drop > 0:
                    eroding += 1
                    if warn is not None and warn < drop:
                        warned_first += 1
                    if warn is not None:
                        leads.append(drop - warn)
                elif drop is None:
                    quiet += 1
                    false_alarms += int(warn is not None)
    if eroding == 0:
        return {**_not_run("no eroding stage"), "quiet": quiet}
    first = warned_first / eroding
    false = false_alarms / quiet if quiet else 0.0
    verdict = "confirmed" if first >= 0.8 and false <= 0.2 else ("refuted" if first < 0.5 else "inconclusive")
    return {"eroding": eroding, "warned_first": first, "quiet": quiet, "false_alarm": false,
            "median_lead_steps": float(np.median(leads)) if leads else float("nan"), "verdict": verdict,
            "rule": "confirmed if the warning came first in >= 80% of eroding stages and fired in <= 20% of the "
                    "others; refuted if first in < 50%"}


def _judged(agg: dict[str, Any], safety: str) -> dict[str, Any]:
    every = list(agg["meta"]["methods"])
    pair = ("continual", safety)
    d_all = monitor_warns(agg, every, pair)
    d_all.pop("verdict", None)
    return {"safety": safety, "a": rank_agreement(agg, safety), "b": hyper_transfer(agg, safety),
            "c": cosine_predicts_erosion(agg, safety), "d": monitor_warns(agg, scenarios=pair), "d_every_method": d_all,
            "d_safety_only": monitor_warns(agg, scenarios=(safety,))}


def all_predictions(agg: dict[str, Any]) -> dict[str, Any]:
    """(a)-(d) for continual against the first safety-domain scenario present (its keys), and against each
    further one under ``"also"``; with (d) over every method's runs and (d) on the safety scenario alone
    (reported, not judged)."""
    present = [s for s in SAFETY_DOMAIN if s in agg] or ["safety"]
    out = _judged(agg, present[0])
    out["also"] = {s: _judged(agg, s) for s in present[1:]}
    return out
