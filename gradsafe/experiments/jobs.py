"""The study's jobs: its configuration, the jobs it runs and how they are scheduled.

Per scenario and seed one ``pretrain`` job (task 1, or the aligned model), then one ``run``
job per method (and, for safety, per harmful fraction) from that pretrained model. Jobs run
on ``workers`` processes (one torch thread each); every job seeds itself, so the results do
not depend on the number of workers or on the order in which jobs finish.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from .._optional import require
from . import continual, safety
from .methods import METHODS, Hyper, method_names

__all__ = ["SCENARIOS", "StudyConfig", "Job", "make_config", "pretrain_jobs", "run_jobs", "execute"]

SCENARIOS = ("continual", "safety")


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs: scenarios, seeds, methods, each scenario's settings, workers."""

    scenarios: tuple[str, ...] = SCENARIOS
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    methods: tuple[str, ...] = tuple(METHODS)
    continual: continual.ContinualConfig = field(default_factory=lambda: continual.FULL)
    continual_extra: tuple[continual.ContinualConfig, ...] = ()  # further settings (their own method subsets)
    safety: safety.SafetyConfig = field(default_factory=lambda: safety.FULL)
    hyper: Hyper = field(default_factory=Hyper)
    workers: int = 2


def make_config(
    quick: bool = False,
    scenarios: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    workers: int = 2,
) -> StudyConfig:
    """The full study, or the reduced ``--quick`` one (one seed, four methods, fewer steps)."""
    scenarios = tuple(SCENARIOS if scenarios is None else scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise ValueError(f"unknown scenarios {unknown}; expected a subset of {SCENARIOS}")
    seeds = tuple((0,) if quick else (0, 1, 2)) if seeds is None else tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("at least one seed is needed")
    return StudyConfig(
        scenarios=scenarios,
        seeds=seeds,
        quick=quick,
        methods=method_names(methods, quick=quick),
        continual=continual.QUICK if quick else continual.FULL,
        continual_extra=() if quick else (continual.SPLIT_CLASS,),
        safety=safety.QUICK if quick else safety.FULL,
        workers=max(1, int(workers)),
    )


@dataclass(frozen=True)
class Job:
    """One unit of work: a pretrain, or one method's run from a pretrained model."""

    kind: str  # "pretrain" or "run"
    scenario: str
    seed: int
    method: str | None = None
    p: float | None = None
    setting: str | None = None  # continual: the setting of the sequence


def continual_cfg(cfg: StudyConfig, setting: str | None) -> continual.ContinualConfig:
    """The continual-learning settings of ``setting`` (the primary one or an extra)."""
    for c in (cfg.continual, *cfg.continual_extra):
        if c.setting == setting:
            return c
    raise KeyError(setting)


def continual_methods(cfg: StudyConfig, c: continual.ContinualConfig) -> list[str]:
    """The study's methods that the continual setting ``c`` runs, in the study's order."""
    return [m for m in cfg.methods if c.methods is None or m in c.methods]


def pretrain_jobs(cfg: StudyConfig) -> list[Job]:
    """The pretrain jobs, the slow ones (safety) first so that their runs are queued early."""
    pre_jobs = [Job("pretrain", "safety", seed) for seed in cfg.seeds if "safety" in cfg.scenarios]
    if "continual" in cfg.scenarios:
        pre_jobs += [Job("pretrain", "continual", seed, setting=c.setting)
                     for c in (cfg.continual, *cfg.continual_extra) for seed in cfg.seeds]
    return pre_jobs


def run_jobs(cfg: StudyConfig, pre: Job) -> list[Job]:
    """The runs that start from the pretrained model of ``pre``."""
    if pre.scenario == "continual":
        c = continual_cfg(cfg, pre.setting)
        return [Job("run", "continual", pre.seed, m, setting=pre.setting) for m in continual_methods(cfg, c)]
    jobs = []
    for p in cfg.safety.fractions:
        wanted = cfg.methods if p in cfg.safety.all_methods_at else cfg.safety.sweep_methods
        jobs += [Job("run", "safety", pre.seed, m, p) for m in cfg.methods if m in wanted]
    return jobs


def _work(job: Job, cfg: StudyConfig, pretrained: dict[str, Any] | None) -> dict[str, Any]:
    """One job, on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        if job.scenario == "continual":
            c = continual_cfg(cfg, job.setting)
            if job.kind == "pretrain":
                out = continual.pretrain(job.seed, c)
            else:
                out = continual.run(job.seed, c, job.method, cfg.hyper, pretrained)
        elif job.kind == "pretrain":
            out = safety.pretrain(job.seed, cfg.safety)
        else:
            out = safety.run(job.seed, cfg.safety, job.method, cfg.hyper, job.p, pretrained)
        out["wall_seconds"] = time.perf_counter() - t0
        return out
    finally:
        torch.set_num_threads(threads)


def execute(cfg: StudyConfig, progress: bool = False) -> dict[Job, dict[str, Any]]:
    """Run every job (pretrains first, each one's runs as soon as it is done).

    ``progress``: a tqdm progress bar (tqdm is in the ``[demo]`` extra).
    """
    pre_jobs = pretrain_jobs(cfg)
    total = len(pre_jobs) + sum(len(run_jobs(cfg, j)) for j in pre_jobs)
    bar = None
    if progress:
        tqdm = require("tqdm.auto", "demo", "the study's progress bar").tqdm
        bar = tqdm(total=total, desc="gradsafe demo", unit="run", leave=False)
    results: dict[Job, dict[str, Any]] = {}

    def done(job: Job) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{job.scenario} seed {job.seed} {job.method or 'pretrain'}", refresh=False)
            bar.update(1)

    try:
        if cfg.workers <= 1:
            for pj in pre_jobs:
                results[pj] = _work(pj, cfg, None)
                done(pj)
                for rj in run_jobs(cfg, pj):
                    results[rj] = _work(rj, cfg, results[pj])
                    done(rj)
        else:
            ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix well
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                pending = {pool.submit(_work, pj, cfg, None): pj for pj in pre_jobs}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        results[job] = fut.result()
                        if job.kind == "pretrain":
                            for rj in run_jobs(cfg, job):
                                pending[pool.submit(_work, rj, cfg, results[job])] = rj
                        done(job)
    finally:
        if bar is not None:
            bar.close()
    return results
