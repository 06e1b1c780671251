"""The study behind ``gradsafe demo``: tune (optionally), report, aggregate, judge, write.

The parts, by job (none imports a later one): ``jobs`` (configuration, grid, schedule) ->
``stats`` (bootstrap, selection, aggregation) -> ``tables`` (Markdown) -> ``plots``
(matplotlib) -> this module (``run_study``, ``write_outputs``). ``predictions`` (the
thesis's verdicts) reads only ``stats``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .jobs import (
    SCENARIOS,
    Job,
    StudyConfig,
    default_setting,
    execute,
    make_config,
    report_jobs,
    tune_jobs,
)
from .plots import plot_curves, plot_pareto
from .predictions import all_predictions
from .stats import (
    aggregate,
    bootstrap_ci,
    pearson,
    rankdata,
    select,
    settings_from,
    spearman,
)
from .tables import format_report

__all__ = ["SCENARIOS", "StudyConfig", "Job", "make_config", "execute", "aggregate", "pearson", "rankdata",
           "spearman", "bootstrap_ci", "format_report", "write_outputs", "write_tables", "write_plots", "run_study",
           "tune"]


def _clean(x: Any) -> Any:
    """JSON-ready: floats rounded to 6 significant digits, nan/inf as None, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return x


def write_tables(agg: dict[str, Any], out_dir: str, report: str) -> dict[str, str]:
    """``results.json`` and ``results.md`` (the report, no plots yet) in ``out_dir``; returns name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(_clean(agg), f, indent=1)
        f.write("\n")
    _write_markdown(paths, report)
    return paths


def _write_markdown(paths: dict[str, str], report: str) -> None:
    with open(paths["markdown"], "w") as f:
        f.write("# gradsafe study results\n\n")
        f.write(report)
        for key, path in paths.items():
            if key.endswith("_png"):
                f.write(f"\n![{key[:-4]}]({os.path.basename(path)})\n")


def write_plots(agg: dict[str, Any], out_dir: str, report: str, paths: dict[str, str]) -> dict[str, str]:
    """The PNGs in ``out_dir``, added to ``paths``; ``results.md`` is rewritten with their links."""
    for name in agg["meta"]["scenarios"]:
        block = agg[name]
        paths[f"{name}_pareto_png"] = os.path.join(out_dir, f"{name}_pareto.png")
        plot_pareto(paths[f"{name}_pareto_png"], name, block)
        cond = block["config"]["tuned_condition"]
        if any(r["condition"] == cond for r in block["runs"]):
            paths[f"{name}_curves_png"] = os.path.join(out_dir, f"{name}_curves.png")
            plot_curves(paths[f"{name}_curves_png"], name, block, cond)
    _write_markdown(paths, report)
    return paths


def write_outputs(agg: dict[str, Any], out_dir: str, report: str) -> dict[str, str]:
    """``results.json`` and ``results.md`` first, then the PNGs; a failing plot loses no numbers."""
    return write_plots(agg, out_dir, report, write_tables(agg, out_dir, report))


def tune(cfg: StudyConfig, progress: bool = False, journal: str | None = None) -> dict[str, Any]:
    """The tuning stage: every method over its grid on the development seeds; returns the selection record.

    ``journal``: see ``jobs.execute`` (an interrupted tuning resumes from it).
    """
    t0 = time.perf_counter()
    results = execute(tune_jobs(cfg), cfg.quick, cfg.workers, progress, desc="tuning", journal=journal)
    return {
        "command": "gradsafe " + " ".join(sys.argv[1:]) if sys.argv else "gradsafe demo --tune",
        "date": datetime.date.today().isoformat(),
        "quick": cfg.quick,
        "dev_seeds": list(cfg.dev_seeds),
        "methods": list(cfg.methods),
        "wall_seconds": time.perf_counter() - t0,
        "selection": select(cfg, results),
    }


def run_study(cfg: StudyConfig, out_dir: str | None = "results", progress: bool = False,
              printer: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Tune (``cfg.tune``) or read the stored selection, run the report, aggregate, judge, print, write."""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.tune:
        record = tune(cfg, progress, journal=os.path.join(out_dir, "tuning.jsonl") if out_dir else None)
        if out_dir:
            with open(os.path.join(out_dir, "tuned.json"), "w") as f:
                json.dump(_clean(record), f, indent=1)
                f.write("\n")
    else:
        record = cfg.stored
    settings, untuned = settings_from(record.get("selection", {}), cfg, default_setting)
    results = execute(report_jobs(cfg, settings), cfg.quick, cfg.workers, progress, desc="report",
                      journal=os.path.join(out_dir, "report.jsonl") if out_dir and cfg.tune else None)
    wall = time.perf_counter() - t0
    agg = aggregate(cfg, results, settings, untuned, record.get("selection", {}), wall_seconds=wall)
    agg["meta"]["selection_source"] = {k: record.get(k) for k in ("command", "date", "dev_seeds", "wall_seconds", "note")}
    agg["predictions"] = all_predictions(agg)
    report = format_report(agg, agg["predictions"])
    if printer is not None:
        printer(report)
    agg["paths"] = write_outputs(agg, out_dir, report) if out_dir else {}
    return agg
