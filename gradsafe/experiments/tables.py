"""The study's report in Markdown: one table per scenario and condition, the predictions' verdicts.

Cells are ``mean [lo, hi]`` (95% bootstrap interval over the report seeds); every table fits
a 120-column terminal. The full numbers (every seed, every curve) are in results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .methods import METHODS
from .scenario import harmful_share

__all__ = ["format_report", "fmt_r", "cell", "md_table"]


def _num(x: float) -> str:
    """``0.834`` -> ``.83``, ``-0.05`` -> ``-.05`` (two decimals, no leading zero)."""
    s = f"{x:.2f}"
    return s.replace("0.", ".", 1) if s.startswith(("0.", "-0.")) else s


def cell(stat: dict[str, Any]) -> str:
    """``.83 [.80,.86]``: the mean and its 95% bootstrap interval (no leading zeros, so that a
    table of seven such columns fits a 120-column terminal)."""
    if stat["mean"] is None or not np.isfinite(stat["mean"]):
        return "n/a"
    return f"{_num(stat['mean'])} [{_num(stat['lo'])},{_num(stat['hi'])}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def fmt_r(x: float | None) -> str:
    """A correlation as ``+0.12``, or ``n/a`` when it is undefined."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.2f}"


def _grads(stat: dict[str, Any]) -> str:
    v = stat["mean"]
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"


def _scenario_section(name: str, block: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    cfg = block["config"]
    labels = {"old_acc": "old-task acc", "learn_acc": "learn acc", "refusal": "refusal", "new_acc": "new acc",
              "bwt": "BWT", "fwt": "FWT", "benign_acc": "benign acc", "refusal_align": "refusal (align)",
              "ft_acc": "ft acc", "harmful_heldout": "harmful (held-out)", "over_refusal": "over-refusal"}
    lines = [f"## {name}: {cfg['title']}", "", f"Selection criterion: {cfg['criterion']}, tuned on `{cfg['tuned_condition']}`."]
    untuned = meta.get("untuned", {}).get(name, [])
    if untuned:
        lines.append(f"**Untuned** (no stored selection; the grid's middle learning rate, most steps, first knob "
                     f"values): {', '.join(METHODS[m].label for m in untuned)}.")
    lines.append("")
    keys = [block["protected"], block["new"], *[k for k in block["metrics"] if k not in (block["protected"], block["new"])]]
    for cond, c in block["conditions"].items():
        methods = c["methods"]
        if not methods:
            continue
        lines += [f"### {name}: `{cond}`", ""]
        rows = []
        for m, r in methods.items():
            rows.append([METHODS[m].label, cell(r["criterion"]), *[cell(r["final"][k]) for k in keys],
                         _grads(r["cost"]["example_grads"]), f"{r['cost']['train_seconds']['mean']:.1f}"])
        lines += md_table(["method", "criterion", *[labels.get(k, k) for k in keys], "ex-grads", "s"], rows)
        lines.append("")
    return lines + _harmful_ratio_section(name, block)


def _harmful_ratio_section(name: str, block: dict[str, Any]) -> list[str]:
    """The harmful-ratio curve (harmful score, fine-tune accuracy against p; benign-only is p = 0) of the methods
    run at every ratio, where the scenario scores ``harmful`` and ``ft_acc``."""
    points = sorted((p, cond) for cond in block["conditions"] if (p := harmful_share(cond)) is not None)
    if len(points) < 2:
        return []
    runs = [block["conditions"][cond]["methods"] for _, cond in points]
    names = [m for m in runs[0] if all(m in r for r in runs)]
    if not names or not all({"harmful", "ft_acc"} <= set(runs[0][m]["final"]) for m in names):
        return []
    lines = [f"### {name}: the harmful-ratio curve (harmful score / fine-tune accuracy; p = 0 is `benign-only`)", ""]
    rows = [[METHODS[m].label, *[f"{cell(r[m]['final']['harmful'])} / {_num(r[m]['final']['ft_acc']['mean'])}"
                                 for r in runs]] for m in names]
    return lines + md_table(["method", *[f"p = {p:g}" for p, _ in points]], rows) + [""]


def _settings_section(agg: dict[str, Any]) -> list[str]:
    lines = ["## Settings used (selected on the development seeds unless marked untuned)", ""]
    names = list(agg["meta"]["scenarios"])
    rows = []
    for m in agg["meta"]["methods"]:
        cells = [METHODS[m].label]
        for s in names:
            st = agg[s]["settings"].get(m)
            cells.append(" ".join([f"lr {st['lr']:g}", f"{st['steps']} st"] + [f"{k} {v:g}" for k, v in st["knobs"].items()])
                         if st else "-")
        rows.append(cells)
    return lines + md_table(["method", *names], rows) + [""]


def _predictions_section(pred: dict[str, Any]) -> list[str]:
    lines = ["## The thesis's predictions (verdicts computed by `predictions.py`, rules in docs/study.md)", ""]
    for p in [pred, *pred.get("also", {}).values()]:
        lines += _predictions_pair(p)
    return lines


def _predictions_pair(pred: dict[str, Any]) -> list[str]:
    a, b, c, d = pred["a"], pred["b"], pred["c"], pred["d"]
    safety = pred.get("safety", "safety")
    lines = [f"Continual against `{safety}`:", ""]
    if a["verdict"] == "not run":
        lines.append(f"- **(a) methods rank the same in both domains: not run** ({a['why']}).")
    else:
        lines.append(f"- **(a) methods rank the same in both domains: {a['verdict']}** — Spearman {fmt_r(a['rho'])} "
                     f"[{fmt_r(a['lo'])}, {fmt_r(a['hi'])}] over {len(a['methods'])} methods.")
    if b["verdict"] == "not run":
        lines.append(f"- **(b) hyperparameters transfer across domains: not run** ({b['why']}).")
    else:
        lines.append(f"- **(b) hyperparameters transfer across domains: {b['verdict']}** — median normalised regret "
                     f"{b['median_regret']:.2f} over {len(b['regrets'])} method-directions.")
    if c["verdict"] == "not run":
        lines.append(f"- **(c) the initial cosine predicts erosion: not run** ({c.get('why', '')}).")
    else:
        parts = [f"{n}: Spearman {fmt_r(c[n]['rho'])} [{fmt_r(c[n]['lo'])}, {fmt_r(c[n]['hi'])}] over "
                 f"{c[n]['datasets']} datasets" for n in ("continual", safety) if n in c]
        lines.append(f"- **(c) the initial cosine predicts erosion: {c['verdict']}** — " + "; ".join(parts) + ".")
    if d["verdict"] == "not run":
        lines.append(f"- **(d) the monitor warns before erosion: not run** ({d['why']}).")
    else:
        e = pred["d_every_method"]
        lines.append(f"- **(d) the monitor warns before erosion: {d['verdict']}** — plain: warned first in "
                     f"{d['warned_first']:.0%} of {d['eroding']} eroding stages (median lead {d['median_lead_steps']:.0f} "
                     f"steps), false alarms in {d['false_alarm']:.0%} of {d['quiet']} others; every method: "
                     + (f"{e['warned_first']:.0%} of {e['eroding']}, false alarms {e['false_alarm']:.0%}."
                        if "warned_first" in e else "no eroding stage."))
        s = pred.get("d_safety_only", {})
        if "warned_first" in s:
            lines.append(f"  On `{safety}` alone (plain): warned first in {s['warned_first']:.0%} of {s['eroding']} eroding "
                         f"stages, median lead {s['median_lead_steps']:.0f} steps, false alarms in "
                         f"{s['false_alarm']:.0%} of {s['quiet']} others.")
    return lines + [""]


def _demo_count(block: dict[str, Any]) -> int:
    return len({m for c in block["conditions"].values() for m in c["methods"]})


def format_report(agg: dict[str, Any], predictions: dict[str, Any]) -> str:
    """The Markdown report: the tables per scenario and condition, the settings, the verdicts."""
    meta = agg["meta"]
    seeds = meta["report_seeds"]
    lines = [f"Report seeds {seeds}: mean [95% bootstrap interval] over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}; "
             "ex-grads: example-gradients per run; s: training-loop seconds per run."
             + (" Quick run: a smoke test, its numbers mean nothing." if meta["quick"] else "")
             + (" The default demo's subset of the report (docs/study.md): "
                f"{', '.join(f'{n}: {_demo_count(agg[n])} methods' for n in meta['scenarios'])} of {len(METHODS)} "
                "(`gradsafe demo --full` runs them all; each run here is the same job as there)."
                if meta.get("subset") else ""), ""]
    for name in meta["scenarios"]:
        lines += _scenario_section(name, agg[name], meta)
    if "safety" in agg and agg["safety"].get("aligned"):
        al = agg["safety"]["aligned"]
        lines += [f"Aligned model (before fine-tuning): held-out refusal {cell(al['refusal'])}, benign accuracy "
                  f"{cell(al['benign_acc'])}, new-task accuracy {cell(al['new_acc'])}.", ""]
    if "lm-safety" in agg and agg["lm-safety"].get("aligned"):
        al = agg["lm-safety"]["aligned"]
        lines += [f"Aligned language model (before fine-tuning): harmful score {cell(al['harmful'])}, helpfulness "
                  f"{cell(al['helpful'])}, over-refusal {cell(al['over_refusal'])}, fine-tune accuracy "
                  f"{cell(al['ft_acc'])}.", ""]
    lines += _settings_section(agg)
    lines += _predictions_section(predictions)
    return "\n".join(lines)
