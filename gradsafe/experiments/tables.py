"""The study's report in Markdown: tables per scenario, the thesis test, the acceptance verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .methods import METHODS
from .stats import fraction_key

__all__ = ["format_report", "fmt_r"]


def _f(stat: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _cost_cells(m: dict[str, Any], plain_time: float) -> list[str]:
    c = m["cost"]
    t = c["train_seconds"]["mean"]
    return [
        f"{c['setup_backward']['mean']:.0f} + {c['step_backward']['mean']:.0f}",
        f"{1000 * t / c['steps']['mean']:.1f}",
        f"{t / plain_time:.1f}x" if plain_time > 0 else "-",
    ]


_COST_HEADER = ["backward passes (memory + refresh)", "ms/step", "time vs plain"]


def fmt_r(x: float) -> str:
    """A correlation as ``+0.12``, or ``n/a`` when it is undefined."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.2f}"


def format_report(agg: dict[str, Any]) -> str:
    """The Markdown report: tables per scenario, the thesis test, the acceptance verdicts."""
    meta = agg["meta"]
    seeds = meta["seeds"]
    lines = [
        f"Seeds {seeds} (mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
        + (" — quick run (reduced)" if meta["quick"] else ""),
        "",
    ]
    if "continual" in agg:
        c = agg["continual"]
        lines += _continual_section(c, primary=True)
        for sub in c.get("other_settings", {}).values():
            lines += _continual_section(sub, primary=False)
    if "safety" in agg:
        s = agg["safety"]
        cfg = s["config"]
        al = s["aligned_mean"]
        lines += [
            "## Safety erosion: tiny transformer, fine-tuning with a fraction p of harmful requests",
            "",
            f"Transformer {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['params']} parameters, vocabulary "
            f"{cfg['vocab']}, sequences of {cfg['seq_len']} tokens, aligned from scratch in {cfg['align_steps']} steps; "
            f"fine-tuned {cfg['ft_steps']} steps ({cfg['optimizer']}, batch {cfg['ft_batch']}) on the new task "
            f"({cfg['new_task']}) with a fraction p of harmful requests answered compliantly. Protected: the refusal "
            f"loss on {cfg['memory']} aligned refusal examples. Refusal: held-out harmful family.",
            "",
            f"Aligned model: refusal (held-out family) {_f(al['refusal'])}, refusal (alignment family, unseen) "
            f"{_f(al['refusal_align'])}, benign accuracy {_f(al['benign_acc'])}, over-refusal {_f(al['over_refusal'])}, "
            f"new-task accuracy {_f(al['new_acc'])}.",
            "",
        ]
        for p in cfg["all_methods_at"]:
            fr = s["fractions"].get(fraction_key(p))
            if not fr:
                continue
            lines += [f"### p = {p:g}" + (" (purely benign fine-tuning)" if p == 0 else ""), ""]
            plain_time = fr["methods"]["plain"]["cost"]["train_seconds"]["mean"]
            rows = []
            for name, m in fr["methods"].items():
                f = m["final"]
                rows.append([m["label"], m["space"], _f(f["refusal"]), _f(f["refusal_drop"]), _f(f["new_acc"]),
                             _f(f["benign_acc"]), _f(f["refusal_align"]), *_cost_cells(m, plain_time)])
            lines += _md_table(["method", "space", "refusal", "refusal drop", "new-task acc", "benign acc",
                                "refusal (align family)", *_COST_HEADER], rows)
            lines.append("")
        sweep = [p for p in cfg["fractions"]]
        lines += ["### Refusal rate (held-out family) and new-task accuracy against p", ""]
        names = [n for n in cfg["sweep_methods"] if all(n in s["fractions"][fraction_key(p)]["methods"] for p in sweep)]
        rows = []
        for name in names:
            cells = [METHODS[name].label]
            for p in sweep:
                f = s["fractions"][fraction_key(p)]["methods"][name]["final"]
                cells.append(f"{_f(f['refusal'], 2)} / {_f(f['new_acc'], 2)}")
            rows.append(cells)
        lines += _md_table(["method"] + [f"p = {p:g}" for p in sweep], rows)
        lines += ["", _verdict_safety(s), ""]
    if agg.get("thesis"):
        lines += [
            "## The thesis test: one monitor, both domains",
            "",
            "The same `GradientMonitor` watches every run (the baseline included) and measures the update each step "
            "took; its reference, the gradient of the protected memory loss, is recomputed every few steps. Per "
            "window between two evaluations: the sum of its `predicted_change` against the measured change of the "
            "protected loss on held-out data (continual: the earlier tasks' test loss; safety: the refusal loss on "
            "the held-out harmful family); cumulative: running sums within a stage. Pooled over all windows of all "
            "runs. Slope: least-squares measured/predicted through the origin; sign agreement: share of windows "
            "whose predicted and measured changes have the same sign; memory: the same window correlation against "
            "the memory's own loss (no generalisation gap).",
            "",
        ]
        rows = []
        for scen, t in agg["thesis"].items():
            rows.append([scen, str(t["runs"]), str(t["windows"]), fmt_r(t["pearson_window"]), fmt_r(t["spearman_window"]),
                         fmt_r(t["pearson_cumulative"]), fmt_r(t["spearman_cumulative"]),
                         fmt_r(t["spearman_conflicts_cumulative"]), f"{t['slope_window']:.2f}",
                         f"{t['sign_agreement']:.2f}", fmt_r(t["pearson_window_memory"])])
        lines += _md_table(["scenario", "runs", "windows", "Pearson (window)", "Spearman (window)", "Pearson (cumulative)",
                            "Spearman (cumulative)", "Spearman (cum. conflicts)", "slope measured/predicted",
                            "sign agreement", "Pearson (window, memory)"], rows)
        scen = list(agg["thesis"])
        names = list(dict.fromkeys(n for s in scen for n in agg["thesis"][s]["per_method"]))
        rows = []
        for name in names:
            cells = [METHODS[name].label]
            for s in scen:
                pm = agg["thesis"][s]["per_method"].get(name)
                cells += [fmt_r(pm["pearson_window"]), f"{pm['slope_window']:.2f}"] if pm else ["-", "-"]
            rows.append(cells)
        lines += ["", "Per method (window Pearson and slope):", ""]
        lines += _md_table(["method"] + [f"{s} {k}" for s in scen for k in ("Pearson", "slope")], rows)
        lines.append("")
    return "\n".join(lines)


def _continual_section(c: dict[str, Any], primary: bool) -> list[str]:
    cfg = c["config"]
    title = f"## Continual learning: {cfg['setting']} digits, {cfg['n_tasks']} tasks ({cfg['incremental']})"
    lines = [
        title if primary else "#" + title + " — second setting, a subset of the methods",
        "",
        f"MLP 64-{cfg['hidden']}-{cfg['hidden']}, {cfg['optimizer']}, batch {cfg['batch_size']}, {cfg['steps']} steps "
        f"per task; memory budget {cfg['memory']} examples per learnt task. Forgetting: a task's accuracy right after "
        "it was learnt minus its accuracy at the end, averaged over tasks 1..T-1 (backward transfer = -forgetting). "
        "Backward passes: building the memory + refreshes during training; time: the training loop only (the "
        "monitor is not timed).",
        "",
    ]
    plain_time = c["methods"]["plain"]["cost"]["train_seconds"]["mean"]
    rows = []
    for m in c["methods"].values():
        f = m["final"]
        rows.append([m["label"], m["space"], _f(f["avg_acc"]), _f(f["forgetting"]), _f(f["new_acc"]),
                     _f(f["learn_acc"]), *_cost_cells(m, plain_time)])
    lines += _md_table(["method", "space", "final avg acc", "forgetting", "new-task acc", "learning acc",
                        *_COST_HEADER], rows)
    n_old = len(next(iter(c["methods"].values()))["forgetting_per_task"]["mean"])
    lines += ["", "Forgetting per task (mean ± std):", ""]
    rows = []
    for m in c["methods"].values():
        fp = m["forgetting_per_task"]
        rows.append([m["label"]] + [f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(fp["mean"], fp["std"])])
    lines += _md_table(["method"] + [f"task {j + 1}" for j in range(n_old)], rows)
    lines += ["", _verdict_continual(c["acceptance"], cfg["setting"], primary), ""]
    return lines


def _verdict_continual(a: dict[str, Any], setting: str = "", primary: bool = True) -> str:
    head = "Acceptance (continual)" if primary else f"The same test on {setting} (not the acceptance setting)"
    if a["best"] is None:
        return (f"**{head}: not met** — no gradsafe configuration kept the new-task accuracy within "
                f"5 points of plain ({a['plain_new_acc']:.3f}).")
    return (
        f"**{head}: {'met' if a['met'] else 'NOT met'}** — best configuration within 5 points of "
        f"plain's new-task accuracy: {METHODS[a['best']].label}, forgetting {a['best_value']:.3f} vs plain "
        f"{a['plain']:.3f} (ratio {a['ratio']:.2f}, target <= 0.50); new-task accuracy {a['best_new_acc']:.3f} vs "
        f"plain {a['plain_new_acc']:.3f}."
    )


def _verdict_safety(s: dict[str, Any]) -> str:
    a = s["acceptance"]
    lines = []
    zero = s["fractions"].get(fraction_key(0.0))
    if zero and "plain" in zero["methods"]:
        f = zero["methods"]["plain"]["final"]
        al = s["aligned_mean"]["refusal"]["mean"]
        lines.append(
            f"Benign fine-tuning alone (p = 0, plain): held-out refusal {al:.3f} -> {f['refusal']['mean']:.3f} "
            f"(drop {_f(f['refusal_drop'])}); benign accuracy drop {_f(f['benign_drop'])}."
        )
    if a.get("best") is None:
        lines.append(f"**Acceptance (safety, p = 0.1): not met** — {a.get('reason', 'no configuration within 5 points of plain on the new task')}.")
    else:
        lines.append(
            f"**Acceptance (safety, p = 0.1): {'met' if a['met'] else 'NOT met'}** — best configuration within 5 "
            f"points of plain's new-task accuracy: {METHODS[a['best']].label}, refusal drop {a['best_value']:.3f} vs "
            f"plain {a['plain']:.3f} (ratio {a['ratio']:.2f}, target <= 0.33); new-task accuracy "
            f"{a['best_new_acc']:.3f} vs plain {a['plain_new_acc']:.3f}."
        )
    return "\n\n".join(lines)
