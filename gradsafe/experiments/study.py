"""The study behind ``gradsafe demo``: run the jobs, aggregate, print the report, write the outputs.

The parts, by job (none imports a later one):

- ``jobs``: ``StudyConfig``, ``make_config``, ``Job``, the schedule and ``execute``;
- ``stats``: correlations, the thesis test, ``aggregate`` (means over seeds, acceptance);
- ``tables``: ``format_report``, the Markdown tables and verdicts;
- ``plots``: the PNGs (matplotlib, the ``[demo]`` extra);
- this module: ``write_outputs`` (JSON and Markdown first, then the PNGs) and ``run_study``, and the public
  names of the others.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .jobs import SCENARIOS, Job, StudyConfig, execute, make_config
from .plots import plot_refresh, plot_scenario, plot_thesis
from .stats import NEW_ACC_TOLERANCE, aggregate, fraction_key, pearson, rankdata, spearman, thesis_stats
from .tables import format_report

__all__ = [
    "SCENARIOS",
    "NEW_ACC_TOLERANCE",
    "StudyConfig",
    "Job",
    "make_config",
    "execute",
    "aggregate",
    "pearson",
    "rankdata",
    "spearman",
    "thesis_stats",
    "format_report",
    "write_outputs",
    "write_tables",
    "write_plots",
    "run_study",
]


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
    """``results.md``: the report, then a link to each PNG in ``paths``."""
    with open(paths["markdown"], "w") as f:
        f.write("# gradsafe study results\n\n")
        f.write(report)
        for key, path in paths.items():
            if key.endswith("_png"):
                f.write(f"\n![{key[:-4]}]({os.path.basename(path)})\n")


def write_plots(agg: dict[str, Any], out_dir: str, report: str, paths: dict[str, str]) -> dict[str, str]:
    """The PNGs in ``out_dir``, added to ``paths``; ``results.md`` is rewritten with their links."""
    methods = list(agg["meta"]["methods"])
    if "continual" in agg:
        c = agg["continual"]
        cfg = c["config"]
        paths["continual_png"] = os.path.join(out_dir, "continual.png")
        plot_scenario(paths["continual_png"], f"Continual learning: {cfg['setting']} digits, tasks 2..{cfg['n_tasks']} "
                      f"(mean over seeds)", c["runs"], methods, "old_acc", "mean accuracy on earlier tasks",
                      boundaries=[cfg["steps"] * t for t in range(1, cfg["n_tasks"] - 1)])
        for setting, sub in c.get("other_settings", {}).items():
            scfg = sub["config"]
            key = f"continual_{setting.replace('-', '_')}_png"
            paths[key] = os.path.join(out_dir, key[:-4] + ".png")
            plot_scenario(paths[key], f"Continual learning: {setting} digits ({scfg['incremental']}), tasks "
                          f"2..{scfg['n_tasks']} (mean over seeds)", sub["runs"], methods, "old_acc",
                          "mean accuracy on earlier tasks",
                          boundaries=[scfg["steps"] * t for t in range(1, scfg["n_tasks"] - 1)])
    if "safety" in agg:
        s = agg["safety"]
        p = 0.1 if fraction_key(0.1) in s["fractions"] else s["config"]["fractions"][-1]
        paths["safety_png"] = os.path.join(out_dir, "safety.png")
        plot_scenario(paths["safety_png"], f"Safety: fine-tuning with p = {p:g} harmful requests (mean over seeds)",
                      [r for r in s["runs"] if r["p"] == p], methods, "refusal", "refusal rate (held-out family)")
    if agg.get("thesis"):
        paths["thesis_png"] = os.path.join(out_dir, "thesis.png")
        plot_thesis(paths["thesis_png"], agg)
        refresh = os.path.join(out_dir, "refresh.png")
        if plot_refresh(refresh, agg):
            paths["refresh_png"] = refresh
    _write_markdown(paths, report)
    return paths


def write_outputs(agg: dict[str, Any], out_dir: str, report: str) -> dict[str, str]:
    """``results.json`` and ``results.md`` first, then the PNGs, in ``out_dir``; returns name -> path.

    The tables are on disk before any plot is drawn, so a failing plot loses no numbers.
    """
    return write_plots(agg, out_dir, report, write_tables(agg, out_dir, report))


def run_study(cfg: StudyConfig, out_dir: str | None = "results", progress: bool = False,
              printer: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run, aggregate, print and write; returns the aggregated results (with ``paths``).

    ``out_dir`` is created before the first job runs (an ``OSError`` then, not after the study).
    """
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    results = execute(cfg, progress=progress)
    wall = time.perf_counter() - t0
    agg = aggregate(cfg, results, wall_seconds=wall)
    report = format_report(agg)
    if printer is not None:
        printer(report)
    agg["paths"] = write_outputs(agg, out_dir, report) if out_dir else {}
    return agg
