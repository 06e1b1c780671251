"""What the benchmarks share: interleaved timing, device choice and naming, printing a table."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from .._optional import UserError

__all__ = ["sync", "measure", "pick_device", "device_label", "emit", "stderr_progress"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cases: dict[str, Callable[[int], None]],
    rounds: int,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time each case once per round, interleaved; returns seconds per case.

    On a CUDA device each timing is bracketed by synchronisations (so it is the time the
    step takes, launch overhead included). ``progress`` is told, as one line each, when a
    case's warm-up starts and when a timed round starts.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i, (name, fn) in enumerate(cases.items()):  # warm-up (and compilation)
        if progress is not None:
            progress(f"warm-up {i + 1}/{len(cases)}: {name}")
        fn(0)
        fn(1)
    sync(device)
    for r in range(rounds):
        if progress is not None:
            progress(f"timed round {r + 1}/{rounds} (every variant once)")
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn(r)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def stderr_progress(prefix: str = "gradsafe bench") -> Callable[[str], None]:
    """A ``progress`` for ``measure``: each line on stderr, with the seconds since it was made."""
    start = time.perf_counter()

    def report(line: str) -> None:
        print(f"{prefix}: [{time.perf_counter() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    return report


def pick_device(name: str | None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or CUDA when available, else the CPU.

    Raises ``UserError`` (one line at the command line) for a string torch does not know and
    for a device this machine does not have ("CUDA is not available"), before any work.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name}: not a device torch knows; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available (this torch has no CUDA or sees no GPU)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available")
        return device
    raise UserError(f"--device {name}: unsupported device type {device.type!r}; expected cpu, cuda or mps")


def device_label(device: torch.device) -> str:
    """The GPU's name, or ``cpu, N threads``: where a table was measured."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def emit(text: str, out: str | None) -> None:
    """Print ``text`` and, when ``out`` is given, also write it to that file."""
    print(text, flush=True)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
