"""``gradsafe plot run.jsonl -o fig.png``: the monitor's curves over steps (matplotlib, in the
``[demo]`` extra).

A bad input (missing, empty, a directory or device, not JSONL, rows without an integer
``step``, values that are not numbers) or an unwritable output is a ``UserError`` at the
command line: one line on stderr, exit code 2. A run whose last line was cut by an
interruption is plotted from its complete rows, with one warning line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Callable

from ._optional import UserError, require
from .monitor import read_jsonl

__all__ = ["load_series", "plot_run", "output_path", "add_arguments", "run"]

_ORDER = ("cosine", "energy_in_subspace", "energy_removed", "predicted_change", "staleness", "fisher_step", "grad_norm", "conflict")

Series = dict[str, dict[str, tuple[list[int], list[float]]]]


def load_series(path: str | os.PathLike[str], on_partial: Callable[[str], None] | None = None) -> Series:
    """Read a JsonlSink run: ``{stat: {objective: (steps, values)}}``.

    Raises ``ValueError`` (one line, naming the file and line) for anything that is not such a
    run, ``OSError`` when the file cannot be read; ``on_partial`` is told about a cut last line.
    """
    name = os.fspath(path)
    rows = read_jsonl(name, on_partial=on_partial)
    if not rows:
        raise ValueError(f"{name} holds no rows")
    series: Series = defaultdict(dict)
    for lineno, row in enumerate(rows, 1):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{name}, row {lineno}: no integer 'step' (got {step!r}); not a JsonlSink run")
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "gradsafe" or value is None:
                continue  # per-tensor entries have 4 parts; plotted only when asked by name
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}, row {lineno}: {key} is {value!r}, not a number")
            _, objective, stat = parts
            xs, ys = series[stat].setdefault(objective, ([], []))
            xs.append(step)
            ys.append(float(value))
    if not series:
        raise ValueError(f"{name} has no gradsafe/<objective>/<stat> values to plot")
    return series


def plot_run(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    stats: list[str] | None = None,
    on_partial: Callable[[str], None] | None = None,
) -> list[str]:
    """Draw one panel per statistic, one line per objective, as a PNG; returns the statistics drawn.

    Raises ``MissingDependency`` (an ImportError naming the ``[demo]`` extra) without matplotlib,
    ``ValueError`` for an input that is not a JsonlSink run or an unknown statistic.
    """
    matplotlib = require("matplotlib", "demo", "gradsafe plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_series(path, on_partial)
    chosen = stats or [s for s in _ORDER if s in series] + sorted(set(series) - set(_ORDER))
    missing = [s for s in chosen if s not in series]
    if missing:
        raise ValueError(f"{os.fspath(path)} has no statistic {missing}; it has {sorted(series)}")
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.2 * len(chosen)), sharex=True, squeeze=False)
    try:
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
        fig.savefig(out, dpi=110, format="png")
    finally:
        plt.close(fig)
    return chosen


def output_path(jsonl: str, out: str | None) -> str:
    """Where the PNG goes: ``out``; ``<out>/<input stem>.png`` when ``out`` is a folder; else next to the input."""
    stem = os.path.splitext(os.path.basename(jsonl))[0] + ".png"
    if out is None:
        return os.path.join(os.path.dirname(jsonl), stem)
    if os.path.isdir(out):
        return os.path.join(out, stem)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradsafe plot``."""
    parser.add_argument("jsonl", help="a run written by gradsafe.monitor.JsonlSink")
    parser.add_argument("-o", "--out", default=None, metavar="PNG|DIR",
                        help="output PNG; an existing folder gets <folder>/<input stem>.png "
                             "(default: <input stem>.png next to the input)")
    parser.add_argument("--stats", nargs="*", default=None, help="statistics to draw (default: all)")


def run(args: argparse.Namespace) -> int:
    """``gradsafe plot``: draw the run, print where it went; a bad input or output is a ``UserError``."""
    out = output_path(args.jsonl, args.out)
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{out}: the folder {folder} is not writable")
    warnings: list[str] = []  # printed only when the plot is written: an error stays one line
    try:
        drawn = plot_run(args.jsonl, out, args.stats, on_partial=warnings.append)
    except OSError as exc:  # the input cannot be read, or the output cannot be written
        where = exc.filename if exc.filename is not None else out
        raise UserError(f"{where}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for message in warnings:
        print(f"gradsafe plot: warning: {message}", file=sys.stderr)
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0
