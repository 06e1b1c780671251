"""Watching interference: a standalone monitor, and sinks for the per-step metrics.

Every statistic comes from the surgery's coefficient pass (gradsafe/report.py); a monitor
never changes the gradient. ``ProtectedOptimizer.add_sink(sink)`` calls a sink after each
step with ``(step, {"gradsafe/<objective>/<stat>": float})``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .optimizer import ProtectedOptimizer

__all__ = ["GradientMonitor", "JsonlSink", "TensorBoardSink", "LoggingSink", "read_jsonl"]


class JsonlSink:
    """Append one JSON object per call to a file: ``{"step": n, "gradsafe/...": value, ...}``.

    Each line is flushed, so a run that is interrupted keeps every step written so far.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError("mode must be 'a' (append) or 'w' (truncate)")
        self.path = os.fspath(path)
        self._file = open(self.path, mode, encoding="utf-8")

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step)}
        row.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    max_line_bytes: int = 1 << 20,
    on_partial: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The rows a JsonlSink wrote: one JSON object per line, blank lines skipped.

    Only a regular file is read (a directory, a device such as ``/dev/zero`` or a pipe raises
    ``ValueError`` before anything is read), and no line may be longer than
    ``max_line_bytes`` (1 MiB), so reading never hangs or grows without bound. A last line
    cut by an interrupted run (no final newline, not valid JSON, after at least one complete
    row) is dropped: every complete row is returned and ``on_partial(message)`` is called
    (default: ``warnings.warn``). Any other line that is not UTF-8, not JSON or not a JSON
    object raises ``ValueError`` naming the file and line; a missing file raises
    ``FileNotFoundError``.
    """
    import stat as stat_mod
    import warnings

    name = os.fspath(path)
    mode = os.stat(name).st_mode  # FileNotFoundError / PermissionError pass through
    if not stat_mod.S_ISREG(mode):
        kind = "a directory" if stat_mod.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{name} is {kind}; expected a JSONL file written by JsonlSink")
    rows: list[dict[str, Any]] = []
    with open(name, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > max_line_bytes:
                raise ValueError(f"{name}, line {lineno}: longer than {max_line_bytes} bytes; not a JsonlSink run")
            complete = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and not text.strip():
                continue
            try:
                if text is None:
                    raise ValueError("not UTF-8")
                row = json.loads(text)
            except ValueError as exc:
                if not complete and rows:
                    message = (f"{name}, line {lineno}: the last line is incomplete (an interrupted run?); "
                               f"read the {len(rows)} complete rows before it")
                    (on_partial or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(message)
                    break
                reason = "not UTF-8" if text is None else f"not JSON ({getattr(exc, 'msg', exc)})"
                raise ValueError(f"{name}, line {lineno}: {reason}") from None
            if not isinstance(row, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(row), "number")
                raise ValueError(f"{name}, line {lineno}: expected a JSON object, got a JSON {kind}")
            rows.append(row)
    return rows



class TensorBoardSink:
    """Write each metric as a scalar to a ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, writer: Any) -> None:
        if not hasattr(writer, "add_scalar"):
            raise TypeError("writer must have add_scalar (a torch.utils.tensorboard.SummaryWriter)")
        self.writer = writer

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)


class LoggingSink:
    """One-off warnings through Python logging.

    Warns the first time an objective's gradient conflicts with it beyond ``cosine_below``
    and the first time its staleness exceeds ``staleness_above``; says nothing else.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        cosine_below: float = -0.1,
        staleness_above: float = 0.5,
    ) -> None:
        self.logger = logger or logging.getLogger("gradsafe")
        self.cosine_below = cosine_below
        self.staleness_above = staleness_above
        self._warned: set[tuple[str, str]] = set()

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) != 3:
                continue
            _, name, stat = parts
            if stat == "cosine" and value < self.cosine_below and (name, stat) not in self._warned:
                self._warned.add((name, stat))
                self.logger.warning(
                    "gradsafe: step %d: the gradient conflicts with protected objective %r (cosine %.3f)",
                    step, name, value,
                )
            if stat == "staleness" and value > self.staleness_above and (name, stat) not in self._warned:
                self._warned.add((name, stat))
                self.logger.warning(
                    "gradsafe: step %d: objective %r is stale (its loss moved away from the first-order "
                    "prediction, staleness %.2f); consider refresh_every='auto'",
                    step, name, value,
                )


class GradientMonitor:
    """Measure interference with protected objectives around any optimizer, changing nothing.

    Give it the optimizer (or the parameters) and protected gradients; call ``measure()``
    after ``backward()`` and before the optimizer's step. Objectives are always in mode
    "observe" without damping. ``predicted_change`` assumes a plain SGD step with the
    optimizer's learning rate (1 when given parameters).
    """

    def __init__(
        self,
        optimizer_or_params: torch.optim.Optimizer | torch.nn.Module | Iterable[torch.Tensor],
        protected_grads: Mapping[str, Any] | None = None,
        *,
        rank: int = 16,
        scope: str = "global",
        per_tensor: bool = False,
    ) -> None:
        if isinstance(optimizer_or_params, torch.optim.Optimizer):
            holder = optimizer_or_params
        else:
            params = (
                list(optimizer_or_params.parameters())
                if isinstance(optimizer_or_params, torch.nn.Module)
                else list(optimizer_or_params)
            )
            # only a container for param_groups: it is never stepped
            holder = torch.optim.SGD(params, lr=1.0)
        self._inner = ProtectedOptimizer(holder, mode="observe", rank=rank, scope=scope, per_tensor=per_tensor)
        for name, value in (protected_grads or {}).items():
            self.protect(name, value) if not callable(value) else self.protect(name, closure=value)

    def protect(self, name: str, grads: Any = None, **options: Any) -> None:
        for key in ("mode", "damping"):
            if key in options and options[key] not in (None, "observe", 0, 0.0):
                raise ValueError(f"a GradientMonitor only observes: {key}={options[key]!r} is not allowed")
        options.pop("mode", None)
        options.pop("damping", None)
        self._inner.protect(name, grads, **options)

    def unprotect(self, name: str) -> None:
        self._inner.unprotect(name)

    @property
    def objectives(self) -> Mapping[str, Any]:
        return self._inner.objectives

    def measure(self) -> dict[str, dict[str, float]]:
        """Statistics of the gradients now in ``.grad``; the gradients are not changed."""
        if not self._inner.objectives:
            return {}
        with torch.no_grad():
            plan, record, _ = self._inner._surgery(step_base=False)
        self._inner._record(plan, record, None)
        return self._inner.report

    @property
    def steps(self) -> int:
        """How many times ``measure`` ran."""
        return self._inner.gradsafe_steps

    def add_sink(self, sink: Any, every: int = 1) -> None:
        """Call ``sink(step, metrics)`` after every N-th measurement."""
        self._inner.add_sink(sink, every)

    @property
    def report(self) -> dict[str, dict[str, float]]:
        return self._inner.report

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        return self._inner.metrics
