"""The study's jobs: its configuration, the tuning grid, the jobs and how they are scheduled.

The protocol (docs/study.md) has two stages. *Tuning*: every method, on the development
seeds, on each scenario's tuned condition, over the grid (``grid``): learning rate x steps x
the method's own knobs. *Report*: every method with its selected setting on the report
seeds, on the report conditions. Per scenario, seed and pretrained model one ``pretrain``
job, then ``run`` jobs from it. Jobs run on ``workers`` processes (one torch thread each);
every job seeds itself, so results do not depend on the number of workers or the order.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from .._optional import require
from . import continual, lm_safety, safety
from .methods import DEFAULT_METHODS, METHODS, method_names
from .scenario import Scenario, Setting

__all__ = ["SCENARIOS", "FULL_SCENARIOS", "FACTORIES", "DEV_SEEDS", "REPORT_SEEDS", "StudyConfig", "Job", "make_scenario",
           "make_config", "grid", "default_setting", "tune_jobs", "report_jobs", "execute", "read_journal",
           "load_selection", "TUNED_PATH"]

SCENARIOS = ("continual", "lm-safety")  # the default study; ``FACTORIES`` may hold more plug-ins
FULL_SCENARIOS = ("continual", "safety", "lm-safety")  # ``--full``: the label-flip toy as well
DEV_SEEDS = (100, 101)
REPORT_SEEDS = (0, 1, 2, 3, 4)
TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned.json")


# name -> factory(quick): a new scenario plug-in adds its entry here (or at run time)
FACTORIES: dict[str, Callable[[bool], Scenario]] = {
    "continual": lambda quick: continual.ContinualScenario(config=continual.QUICK if quick else continual.FULL),
    "safety": lambda quick: safety.SafetyScenario(config=safety.QUICK if quick else safety.FULL),
    "lm-safety": lambda quick: lm_safety.LMSafetyScenario(config=lm_safety.QUICK if quick else lm_safety.FULL),
}


def make_scenario(name: str, quick: bool = False) -> Scenario:
    """The scenario plug-in ``name`` (full or ``--quick`` sizes)."""
    if name not in FACTORIES:
        raise ValueError(f"unknown scenario {name!r}; expected one of {tuple(FACTORIES)}")
    return FACTORIES[name](quick)


def grid(scenario: Scenario, method: str) -> list[Setting]:
    """The protocol's grid for ``method`` in ``scenario``: learning rate x steps x own knobs."""
    m = METHODS[method]
    knob_names = sorted(m.knobs)
    out = []
    for lr, steps in itertools.product(scenario.lr_grid[m.base], scenario.steps_grid):
        for values in itertools.product(*(m.knobs[k] for k in knob_names)):
            out.append(Setting(float(lr), int(steps), tuple(zip(knob_names, (float(v) for v in values)))))
    return out


def default_setting(scenario: Scenario, method: str) -> Setting:
    """The untuned setting (the grid's middle learning rate, most steps, first knob values): used when
    no selection is stored, and said so in the report."""
    m = METHODS[method]
    lrs = scenario.lr_grid[m.base]
    return Setting(float(lrs[len(lrs) // 2]), int(max(scenario.steps_grid)),
                   tuple(sorted((k, float(v[0])) for k, v in m.knobs.items())))


def load_selection(path: str = TUNED_PATH) -> dict[str, Any]:
    """The stored selection (``tuned.json``): command, date, grid, and per scenario and method its setting."""
    if not os.path.isfile(path):
        return {"selection": {}}
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs."""

    scenarios: tuple[str, ...] = SCENARIOS
    methods: tuple[str, ...] = tuple(METHODS)
    report_seeds: tuple[int, ...] = REPORT_SEEDS
    dev_seeds: tuple[int, ...] = DEV_SEEDS
    quick: bool = False
    tune: bool = False
    conditions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # report conditions per scenario (all methods)
    plain_conditions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # further conditions: plain only
    stored: dict[str, Any] = field(default_factory=dict)  # the stored selection (tuned.json)
    workers: int = 2
    subset: bool = False  # the default demo's subset of the report (``DEFAULT_METHODS``; a scenario's
    # ``demo_methods``, ``demo_plain_conditions``), said in the report


def make_config(quick: bool = False, scenarios: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                methods: Sequence[str] | None = None, workers: int = 2, tune: bool = False, full: bool = False) -> StudyConfig:
    """The default report run, ``--full`` (tuning, then every condition), or ``--quick`` (a smoke run).

    The default runs the default subset of methods (``DEFAULT_METHODS``) on each scenario's
    tuned condition, and plain alone on the other conditions; with ``methods`` or ``tune``,
    those methods run on the tuned condition and on the safety conditions identity-shift and
    benign-only, plain alone on the others; ``full`` runs every method on every condition.
    """
    scenarios = tuple((FULL_SCENARIOS if full else SCENARIOS) if scenarios is None else scenarios)
    unknown = [s for s in scenarios if s not in FACTORIES]
    if unknown or not scenarios:
        raise ValueError(f"unknown scenarios {unknown}; expected a subset of {tuple(FACTORIES)}")
    report = tuple((0,) if quick else REPORT_SEEDS) if seeds is None else tuple(int(s) for s in seeds)
    if not report:
        raise ValueError("at least one seed is needed")
    overlap = set(report) & set(DEV_SEEDS)
    if overlap:
        raise ValueError(f"report seeds {sorted(overlap)} are development seeds; pick others")
    subset = methods is None and not (quick or tune or full)
    if subset:
        methods = DEFAULT_METHODS
    conditions: dict[str, tuple[str, ...]] = {}
    plain_only: dict[str, tuple[str, ...]] = {}
    for name in scenarios:
        sc = make_scenario(name, quick)
        if full or quick:
            conditions[name] = sc.conditions
        else:
            main = (sc.tuned_condition,)
            if not subset:
                main += tuple(c for c in ("identity-shift", "benign-only") if c in sc.conditions)
            conditions[name] = main
            others = tuple(c for c in sc.conditions if c not in main)
            plain_only[name] = others if not subset or sc.demo_plain_conditions else ()
    return StudyConfig(
        scenarios=scenarios,
        methods=method_names(methods, quick=quick),
        report_seeds=report,
        dev_seeds=DEV_SEEDS[:1] if quick else DEV_SEEDS,
        quick=quick,
        tune=tune or full,
        conditions=conditions,
        plain_conditions=plain_only,
        stored={"selection": {}} if quick else load_selection(),  # the selection is the full protocol's
        workers=max(1, int(workers)),
        subset=subset,
    )


@dataclass(frozen=True)
class Job:
    """A pretrain, or one method's run at one setting from a pretrained model."""

    kind: str  # "pretrain" or "run"
    scenario: str
    seed: int
    key: str = "default"  # the pretrained model's key
    condition: str | None = None
    method: str | None = None
    setting: Setting | None = None
    phase: str = "report"  # "tune" or "report"


def tune_jobs(cfg: StudyConfig) -> list[Job]:
    """Every method over its grid on the development seeds, on each scenario's tuned condition (no monitor)."""
    jobs = []
    for name in cfg.scenarios:
        sc = make_scenario(name, cfg.quick)
        cond = sc.tuned_condition
        for seed in cfg.dev_seeds:
            for method in filter(sc.runs_method, cfg.methods):
                for s in grid(sc, method):
                    jobs.append(Job("run", name, seed, sc.pretrain_key(cond), cond, method, s, "tune"))
    return jobs


def report_jobs(cfg: StudyConfig, selection: dict[str, dict[str, Setting]]) -> list[Job]:
    """Every method at its selected setting on the report seeds and conditions."""
    jobs = []
    for name in cfg.scenarios:
        sc = make_scenario(name, cfg.quick)
        for cond in cfg.conditions.get(name, ()) + cfg.plain_conditions.get(name, ()):
            keep = sc.in_demo if cfg.subset else sc.runs_method
            methods = tuple(filter(keep, cfg.methods)) if cond in cfg.conditions.get(name, ()) else ("plain",)
            for seed in cfg.report_seeds:
                for method in methods:
                    jobs.append(Job("run", name, seed, sc.pretrain_key(cond), cond, method, selection[name][method]))
    return jobs


_SCENARIO_CACHE: dict[tuple[str, bool], Scenario] = {}


def _scenario(name: str, quick: bool) -> Scenario:
    if (name, quick) not in _SCENARIO_CACHE:
        _SCENARIO_CACHE[(name, quick)] = make_scenario(name, quick)
    return _SCENARIO_CACHE[(name, quick)]


def _work(job: Job, quick: bool, pretrained: dict[str, Any] | None) -> dict[str, Any]:
    """One job, on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        sc = _scenario(job.scenario, quick)
        if job.kind == "pretrain":
            out = sc.pretrain(job.seed, job.key)
        else:
            assert pretrained is not None and job.condition is not None and job.method and job.setting
            out = sc.run(job.seed, job.condition, job.method, job.setting, pretrained, monitor=job.phase == "report")
        out["wall_seconds"] = time.perf_counter() - t0
        return out
    finally:
        torch.set_num_threads(threads)


def _job_record(job: Job) -> dict[str, Any]:
    return {"kind": job.kind, "scenario": job.scenario, "seed": job.seed, "key": job.key, "condition": job.condition,
            "method": job.method, "setting": None if job.setting is None else job.setting.as_dict(), "phase": job.phase}


def _job_from(d: dict[str, Any]) -> Job:
    return Job(d["kind"], d["scenario"], int(d["seed"]), d["key"], d["condition"], d["method"],
               None if d["setting"] is None else Setting.from_dict(d["setting"]), d["phase"])


def read_journal(path: str) -> dict[Job, dict[str, Any]]:
    """The runs a journal (``execute(journal=...)``) holds; a last line cut short by an interruption is skipped."""
    out: dict[Job, dict[str, Any]] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[_job_from(rec["job"])] = rec["result"]
    return out


def execute(runs: Sequence[Job], quick: bool, workers: int = 2, progress: bool = False,
            desc: str = "gradsafe demo", journal: str | None = None) -> dict[Job, dict[str, Any]]:
    """Run ``runs`` and the pretrains they need (each pretrain first, its runs as soon as it is done).

    ``journal``: a JSON-lines file; every finished run is appended to it, and runs it already
    holds are not run again (an interrupted study resumes where it stopped).
    """
    results: dict[Job, dict[str, Any]] = {}
    if journal:
        wanted = set(runs)
        results = {j: r for j, r in read_journal(journal).items() if j in wanted}
        runs = [r for r in runs if r not in results]
    log = open(journal, "a") if journal else None
    pre_of = {r: Job("pretrain", r.scenario, r.seed, r.key) for r in runs}
    pres = list(dict.fromkeys(sorted(pre_of.values(), key=lambda j: j.scenario != "safety")))  # slow ones first
    waiting: dict[Job, list[Job]] = {p: [] for p in pres}
    for r in runs:
        waiting[pre_of[r]].append(r)
    bar = None
    if progress:
        tqdm = require("tqdm.auto", "demo", "the study's progress bar").tqdm
        bar = tqdm(total=len(pres) + len(runs), desc=desc, unit="run", leave=False)

    def done(job: Job) -> None:
        if log is not None and job.kind == "run":
            log.write(json.dumps({"job": _job_record(job), "result": results[job]}) + "\n")
            log.flush()
        if bar is not None:
            bar.set_postfix_str(f"{job.scenario} {job.seed} {job.method or 'pretrain'}", refresh=False)
            bar.update(1)

    try:
        if workers <= 1:
            for pj in pres:
                results[pj] = _work(pj, quick, None)
                done(pj)
                for rj in waiting[pj]:
                    results[rj] = _work(rj, quick, results[pj])
                    done(rj)
        else:
            ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix well
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending = {pool.submit(_work, pj, quick, None): pj for pj in pres}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        results[job] = fut.result()
                        if job.kind == "pretrain":
                            for rj in waiting[job]:
                                pending[pool.submit(_work, rj, quick, results[job])] = rj
                        done(job)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return results
