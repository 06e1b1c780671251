"""The study's plots (matplotlib, in the ``[demo]`` extra): Pareto fronts and protected-metric curves.

One colour per method family (``FAMILY_COLORS``), the same in every figure; methods of a
family differ by marker (Pareto) and line style (curves). Each figure is saved as a small PNG.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .._optional import require
from .methods import FAMILIES, METHODS

matplotlib = require("matplotlib", "demo", "gradsafe.experiments.plots")

__all__ = ["FAMILY_COLORS", "plot_pareto", "plot_curves", "save"]

FAMILY_COLORS = dict(zip(FAMILIES, ("#000000", "#1f77b4", "#17becf", "#2ca02c", "#bcbd22", "#ff7f0e", "#d62728",
                                    "#9467bd", "#7f7f7f")))
MARKERS = "osD^vP*X"
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict[str, Any]:
    fam = METHODS[name].family
    index = [m for m in METHODS if METHODS[m].family == fam].index(name)
    return {"color": FAMILY_COLORS[fam], "marker": MARKERS[index % len(MARKERS)],
            "ls": LINESTYLES[index % len(LINESTYLES)]}


def plot_pareto(path: str, name: str, block: dict[str, Any]) -> None:
    """Protected metric against new-task metric, one point per method (bars: 95% intervals), one panel per condition."""
    plt = _pyplot()
    conds = [c for c, v in block["conditions"].items() if len(v["methods"]) > 1]
    if not conds:
        conds = list(block["conditions"])
    fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds) + 1.8, 3.8), squeeze=False)
    px, py = block["new"], block["protected"]
    for ax, cond in zip(axes[0], conds):
        for m, r in block["conditions"][cond]["methods"].items():
            x, y = r["final"][px], r["final"][py]
            st = _style(m)
            ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]],
                        yerr=[[y["mean"] - y["lo"]], [y["hi"] - y["mean"]]], fmt=st["marker"], color=st["color"],
                        ms=6, capsize=2, lw=0.8, label=METHODS[m].label)
        ax.set_title(f"{name}: {cond}", fontsize=9)
        ax.set_xlabel(px.replace("_", " "))
        ax.set_ylabel(py.replace("_", " "))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4.2 * len(conds) + 1.8), 1))
    save(fig, path)


def plot_curves(path: str, name: str, block: dict[str, Any], condition: str) -> None:
    """The protected metric and the new-task metric over training steps (mean over seeds), per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for m in dict.fromkeys(r["method"] for r in block["runs"] if r["condition"] == condition):
        runs = [r for r in block["runs"] if r["condition"] == condition and r["method"] == m]
        steps = np.concatenate([st["curve"]["step"] for st in runs[0]["stages"]])
        prot = np.mean([np.concatenate([st["curve"]["protected"] for st in r["stages"]]) for r in runs], 0)
        new = np.mean([np.concatenate([st["curve"]["new"] for st in r["stages"]]) for r in runs], 0)
        st = _style(m)
        axes[0].plot(steps, prot, color=st["color"], ls=st["ls"], lw=1.2, label=METHODS[m].label)
        axes[1].plot(steps, new, color=st["color"], ls=st["ls"], lw=1.2)
    axes[0].set_ylabel(f"protected: {block['protected'].replace('_', ' ')} (the stage's)", fontsize=8)
    axes[1].set_ylabel(f"new task: {block['new'].replace('_', ' ')}", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: {condition} (mean over report seeds)", fontsize=10)
    fig.legend(loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    save(fig, path)


def save(fig: Any, path: str) -> None:
    """Save as a small PNG (an adaptive palette of 128 colours) and close the figure."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
