"""Run a multi-process job from a test: each rank's life, the spawn, a bounded wait, the results read back."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_spawned(worker: Callable, tmp: Path, world: int, timeout_s: float, label: str) -> dict[int, dict]:
    """Start ``worker(rank, init_file, out_dir)`` on ``world`` spawned processes and collect them.

    The rendezvous file lives in ``tmp``; each rank writes ``rank<r>.pt`` there. A job that
    runs past ``timeout_s`` fails the test and its processes are terminated.
    """
    ctx = mp.start_processes(worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{label} workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return {r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)}


def run_rank(rank: int, init_file: str, out_dir: str, world: int, timeout_s: float, results: Callable[[], dict]) -> None:
    """A spawned rank's whole life: join the gloo group, compute ``results()``, save, leave.

    The barrier before the teardown also lets gloo's worker threads release the tensors of
    the last collective (see examples/finetune_causal_lm.py, ``shutdown``).
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        torch.save(results(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
