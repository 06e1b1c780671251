"""The study's plots (matplotlib, in the ``[demo]`` extra): curves per scenario, the thesis
scatter, the A-GEM refresh variants. Each figure is saved as a small PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._optional import require
from .jobs import SCENARIOS
from .methods import METHODS
from .stats import fraction_key, mean_curve
from .tables import fmt_r

matplotlib = require("matplotlib", "demo", "gradsafe.experiments.plots")

__all__ = ["PLOT_METHODS", "plot_scenario", "plot_thesis", "plot_refresh", "save"]

PLOT_METHODS = ("plain", "damping", "ogd", "ogd_tensor", "agem_1", "agem_10", "agem_100", "agem_cached", "gem", "damping_ogd")


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10"]
    order = [n for n in PLOT_METHODS] + [n for n in METHODS if n not in PLOT_METHODS]
    return {n: cmap(i % 10) for i, n in enumerate(order) if n in names}


def _window_steps(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    w = r["windows"]
    ends = np.cumsum(w["steps"])
    return ends, np.cumsum(w["predicted"]), np.cumsum(w["measured"]), np.asarray(w["conflicts"]) / np.asarray(w["steps"])


def plot_scenario(path: str, title: str, runs: Sequence[dict[str, Any]], methods: Sequence[str],
                  protected_key: str, protected_label: str, boundaries: Sequence[int] = ()) -> None:
    """Mean curves over seeds per method: protected metric, new-task accuracy, predicted and
    measured protected-loss change, share of steps in conflict."""
    plt = _pyplot()
    shown = [m for m in PLOT_METHODS if m in methods]
    colors = _colors(shown)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    for name in shown:
        mr = [r for r in runs if r["method"] == name]
        if not mr:
            continue
        style = dict(color=colors[name], lw=1.6 if name in ("plain", "agem_1") else 1.0,
                     ls="--" if name == "plain" else "-")
        steps = mean_curve(mr, "step")
        axes[0, 0].plot(steps, mean_curve(mr, protected_key), label=METHODS[name].label, **style)
        axes[0, 1].plot(steps, mean_curve(mr, "new_acc"), **style)
        ws = [_window_steps(r) for r in mr]
        n = min(len(w[0]) for w in ws)
        ends = ws[0][0][:n]
        axes[1, 0].plot(ends, np.mean([w[1][:n] for w in ws], 0), **style)
        axes[1, 0].plot(ends, np.mean([w[2][:n] for w in ws], 0), color=colors[name], lw=0.8, ls=":")
        axes[1, 1].plot(ends, np.mean([w[3][:n] for w in ws], 0), **style)
    axes[0, 0].set_ylabel(protected_label)
    axes[0, 1].set_ylabel("new-task accuracy")
    axes[1, 0].set_ylabel("protected-loss change\n(solid: predicted, dotted: measured)")
    axes[1, 1].set_ylabel("share of steps in conflict\n(monitor, per window)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for b in boundaries:
            ax.axvline(b, color="grey", lw=0.6)
    for ax in axes[1]:
        ax.set_xlabel("fine-tuning step")
    fig.legend(loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    save(fig, path)


def plot_thesis(path: str, agg: dict[str, Any]) -> None:
    """Predicted against measured protected-loss change per window, one panel per scenario."""
    plt = _pyplot()
    scen = [s for s in SCENARIOS if s in agg["thesis"]]
    families = list(dict.fromkeys(m.family for m in METHODS.values()))
    cmap = matplotlib.colormaps["tab10"]
    fig, axes = plt.subplots(1, len(scen), figsize=(5 * len(scen), 4.2), squeeze=False)
    for ax, s in zip(axes[0], scen):
        runs = agg[s]["runs"]
        for i, fam in enumerate(families):
            fr = [r for r in runs if METHODS[r["method"]].family == fam]
            pw = [p for r in fr for p in r["windows"]["predicted"]]
            mw = [m for r in fr for m in r["windows"]["measured"]]
            if pw:
                ax.scatter(pw, mw, s=7, alpha=0.55, color=cmap(i), label=fam)
        t = agg["thesis"][s]
        lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lim, lim, color="grey", lw=0.7)
        ax.set_title(f"{s}: Pearson {fmt_r(t['pearson_window'])}, Spearman {fmt_r(t['spearman_window'])}\n"
                     f"({t['windows']} windows, {t['runs']} runs; grey: measured = predicted)", fontsize=9)
        ax.set_xlabel("monitor: predicted protected-loss change (window)")
        ax.set_ylabel("measured held-out protected-loss change")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False, markerscale=2)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    save(fig, path)


def plot_refresh(path: str, agg: dict[str, Any]) -> bool:
    """Protection and cost of the A-GEM refresh variants; False if there is nothing to draw."""
    plt = _pyplot()
    ticks = {"agem_cached": "never", "agem_100": "every 100", "agem_10": "every 10", "agem_auto": "auto",
             "agem_1": "every 1"}
    variants = [m for m in ticks if m in agg["meta"]["methods"]]
    panels = []
    if "continual" in agg:
        panels.append(("continual", agg["continual"]["methods"], "forgetting", "forgetting (lower is better)"))
    if "safety" in agg and fraction_key(0.1) in agg["safety"]["fractions"]:
        panels.append(("safety, p = 0.1", agg["safety"]["fractions"][fraction_key(0.1)]["methods"], "refusal_drop",
                       "refusal drop (lower is better)"))
    if len(variants) < 2 or not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (title, methods, key, ylabel) in zip(axes[0], panels):
        names = [v for v in variants if v in methods]
        x = np.arange(len(names))
        y = [methods[n]["final"][key]["mean"] for n in names]
        e = [methods[n]["final"][key]["std"] for n in names]
        ax.errorbar(x, y, yerr=e, fmt="o-", color="tab:purple", capsize=3, label="A-GEM")
        if "plain" in methods:
            ax.axhline(methods["plain"]["final"][key]["mean"], color="tab:blue", ls="--", lw=1, label="plain AdamW")
        ax.set_xticks(x, [ticks[n] for n in names], fontsize=8)
        ax.set_xlabel("reference recomputed")
        ax.set_ylabel(ylabel, color="tab:purple")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        cost = ax.twinx()
        ms = [1000 * methods[n]["cost"]["train_seconds"]["mean"] / methods[n]["cost"]["steps"]["mean"] for n in names]
        cost.bar(x, ms, width=0.35, color="grey", alpha=0.3)
        cost.set_ylabel("training ms/step (bars)", color="grey")
        ax.set_zorder(cost.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    save(fig, path)
    return True


def save(fig: Any, path: str) -> None:
    """Save as a small PNG (an adaptive palette of 128 colours) and close the figure."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
