"""Greedy batched generation of the shipped character-level GPT on one CPU thread: KV cache vs recomputation.

Run: ``python benchmarks/charlm_generate.py [--batch 160] [--new 32] [--repeats 3]``. Prompts are the
lm-safety scenario's evaluation prompts (benign and task requests, whose answers run longest); every
row generates up to ``--new`` characters (a row stops at ``<eos>``, which the pretrained model never saw: its
rows run to the full length; the printed lengths say so).
Prints the median wall time of each path over ``--repeats`` interleaved runs, and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from gradsafe.experiments import charlm
from gradsafe.experiments import requests as R


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=160)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = charlm.load()
    rng = random.Random(0)
    ex = R.benign(args.batch // 2, rng, "eval") + R.task(args.batch - args.batch // 2, rng, "eval")
    prompts = [charlm.VOCAB.encode(R.prompt_text(e.prompt)) for e in ex]
    times: dict[str, list[float]] = {"cache": [], "recompute": []}
    for _ in range(args.repeats):
        for name, cache in (("cache", True), ("recompute", False)):
            t = time.perf_counter()
            out = charlm.generate(model, prompts, args.new, cache=cache)
            times[name].append(time.perf_counter() - t)
    lens = [len(o) for o in out]
    print(f"batch {args.batch}, prompt length {min(map(len, prompts))}-{max(map(len, prompts))}, generated "
          f"{min(lens)}-{max(lens)} chars (mean {sum(lens) / len(lens):.1f}), torch {torch.__version__}, 1 thread, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, ts in times.items():
        print(f"{name:>10}: median {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
