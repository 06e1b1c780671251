"""Run a 2-process job from a test: spawn, bounded wait, per-rank results read back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
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
