"""``gradsafe plot run.jsonl -o fig.png``: the monitor's curves over steps (matplotlib, in the
``[demo]`` extra)."""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from ._optional import require
from .monitor import read_jsonl

__all__ = ["plot_run", "add_arguments", "run"]

_ORDER = ("cosine", "energy_in_subspace", "energy_removed", "predicted_change", "staleness", "fisher_step", "grad_norm", "conflict")


def plot_run(path: str | os.PathLike[str], out: str | os.PathLike[str], stats: list[str] | None = None) -> list[str]:
    """Draw one panel per statistic, one line per objective; returns the statistics drawn.

    Raises ``MissingDependency`` (an ImportError naming the ``[demo]`` extra) without matplotlib.
    """
    matplotlib = require("matplotlib", "demo", "gradsafe plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for row in rows:
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "gradsafe" or value is None:
                continue  # per-tensor entries have 4 parts; plotted only when asked by name
            _, name, stat = parts
            xs, ys = series[stat].setdefault(name, ([], []))
            xs.append(int(row["step"]))
            ys.append(float(value))
    chosen = stats or [s for s in _ORDER if s in series] + sorted(set(series) - set(_ORDER))
    missing = [s for s in chosen if s not in series]
    if missing:
        raise ValueError(f"{path} has no statistic {missing}; it has {sorted(series)}")
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.2 * len(chosen)), sharex=True, squeeze=False)
    for ax, stat in zip(axes[:, 0], chosen):
        for name, (xs, ys) in sorted(series[stat].items()):
            ax.plot(xs, ys, label=name, linewidth=1.2)
        if stat in ("cosine", "predicted_change"):
            ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_ylabel(stat.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"gradsafe monitor: {os.path.basename(os.fspath(path))}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jsonl", help="a run written by gradsafe.monitor.JsonlSink")
    parser.add_argument("-o", "--out", default=None, help="output PNG (default: next to the input)")
    parser.add_argument("--stats", nargs="*", default=None, help="statistics to draw (default: all)")


def run(args: argparse.Namespace) -> int:
    out = args.out or os.path.splitext(args.jsonl)[0] + ".png"
    drawn = plot_run(args.jsonl, out, args.stats)
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0
