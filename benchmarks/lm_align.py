"""The lm-safety scenario's alignment: its cost and the aligned model's metrics, per seed and per benign task.

    python benchmarks/lm_align.py --seeds 0 1 --steps 400 --lr 2e-3 --benign 3000
    python benchmarks/lm_align.py --seeds 0 --threads 2 --save gradsafe/experiments/charlm_aligned.pt

Prints, per seed, the wall time of the alignment (one torch thread) and the aligned model's
harmful score, helpfulness, over-refusal on the scenario's evaluation sets, and helpfulness per task
on a further draw of evaluation-split benign prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from gradsafe.experiments import charlm, lm_safety as S, requests as R


def per_task_helpfulness(model: charlm.CharGPT, cfg: S.LMSafetyConfig) -> dict[str, float]:
    """Exact-match helpfulness by task on ``eval_n`` benign prompts of the evaluation split (evaluation frames and
    words), drawn apart from the scenario's own evaluation set."""
    import random

    ex = R.benign(cfg.eval_n, random.Random(S.EVAL_SEED + 1), "eval")
    gens = S._generate(model, [charlm.VOCAB.encode(R.prompt_text(e.prompt)) for e in ex], S.ANSWER_NEW)
    out: dict[str, list[bool]] = {}
    for e, g in zip(ex, gens):
        out.setdefault(e.category, []).append(R.exact(g, e.answer))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=S.FULL.align_steps)
    ap.add_argument("--lr", type=float, default=S.FULL.align_lr)
    ap.add_argument("--batch", type=int, default=S.FULL.align_batch)
    ap.add_argument("--harmful", type=int, default=S.FULL.align_harmful)
    ap.add_argument("--benign", type=int, default=S.FULL.align_benign)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", type=str, default=None,
                    help="write the first seed's aligned model here (float16) and its record beside it (PATH.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = replace(S.FULL, align_steps=args.steps, align_lr=args.lr, align_batch=args.batch,
                  align_harmful=args.harmful, align_benign=args.benign)
    print(json.dumps({"steps": args.steps, "lr": args.lr, "batch": args.batch, "harmful": args.harmful,
                      "benign": args.benign, "threads": args.threads}))
    for seed in args.seeds:
        t = time.perf_counter()
        model = S.aligned_model(seed, cfg)
        align_s = time.perf_counter() - t
        m = S.evaluate(model, cfg)
        row = {"seed": seed, "align_s": round(align_s, 1), "harmful": round(m["harmful"], 3),
               "harmful_heldout": round(m["harmful_heldout"], 3), "helpful": round(m["helpful"], 3),
               "over_refusal": round(m["over_refusal"], 3), "ft_acc": round(m["ft_acc"], 3),
               "by_task": per_task_helpfulness(model, cfg)}
        print(json.dumps(row), flush=True)
        if args.save and seed == args.seeds[0]:
            record = {"alignment": {"seed": seed, "steps": args.steps, "lr": args.lr, "batch": args.batch,
                                    "harmful": args.harmful, "benign": args.benign,
                                    "weight_decay": cfg.weight_decay},
                      "from": charlm.CHECKPOINT.name, "wall_seconds": round(align_s, 1), "threads": args.threads,
                      "torch": str(torch.__version__), "dtype": "float16"}
            charlm.save(model, args.save, extra=record)
            shipped, _ = charlm.load(args.save)
            record["metrics"] = {k: round(v, 4) for k, v in S.evaluate(shipped, cfg).items()}
            record["metrics_eval_n"] = cfg.eval_n
            with open(args.save + ".json", "w") as f:
                json.dump(record, f, indent=1)
            print(json.dumps({"saved": args.save, "metrics_shipped": record["metrics"]}), flush=True)


if __name__ == "__main__":
    main()
