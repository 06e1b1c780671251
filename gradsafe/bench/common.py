"""What the benchmarks share: interleaved timing, device choice and naming, printing a table."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["sync", "measure", "pick_device", "device_label", "emit"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cases: dict[str, Callable[[int], None]], rounds: int, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Time each case once per round, interleaved; returns seconds per case.

    On a CUDA device each timing is bracketed by synchronisations (so it is the time the
    step takes, launch overhead included).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up (and compilation)
        fn(0)
        fn(1)
    sync(device)
    for r in range(rounds):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn(r)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def pick_device(name: str | None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ...), or CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_label(device: torch.device) -> str:
    """The GPU's name, or ``cpu, N threads``: where a table was measured."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def emit(text: str, out: str | None) -> None:
    """Print ``text`` and, when ``out`` is given, also write it to that file."""
    print(text, flush=True)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
