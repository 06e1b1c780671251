"""The flat surgery's two passes as compiled CPU loops (``kernels/cpu_surgery.cpp``).

``TorchBackend(cpu_kernels=True)`` runs its dense float32 coefficient and apply passes on the
CPU through these instead of ``torch.mv`` / ``addmv_``. They are compiled on first use with
``torch.utils.cpp_extension.load`` (a C++ compiler and ninja are needed; the build, about a
minute, announced by one line on stderr, is cached in ``TORCH_EXTENSIONS_DIR`` and reused by
later processes) and built for
the machine they run on (``-march=native``; the cached build's name carries a hash of the
CPU's model and flags, so a build cache shared between machines keeps one per kind of CPU).

- ``coefficients(rows, h, out, norm=None)``: ``out = rows @ h`` for rows ``(r, n)`` with unit
  column stride, and ``norm[0] = |h|^2`` when given;
- ``accumulate(rows_t, w, h, overwrite=False)``: ``h += rows_t @ w`` (``h = rows_t @ w`` with
  ``overwrite``) for the transposed rows ``(n, r)``.

Both take float32 CPU tensors, release the GIL and run on the calling thread.

``GRADSAFE_CPU_KERNELS=1`` in the environment turns them on for every ``TorchBackend`` built
without an explicit ``cpu_kernels`` (``backend="torch"``, the auto backend's CPU steps);
``GRADSAFE_VERBOSE_BUILD=1`` shows the build's commands and the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["load_cpu_kernels", "cpu_kernels_unavailable_reason", "cpu_kernels_from_env", "ENV_VAR", "SOURCE"]

ENV_VAR = "GRADSAFE_CPU_KERNELS"
SOURCE = "cpu_surgery.cpp"
# seconds a load may take before a line on stderr says a build is under way
BUILD_NOTICE_AFTER_S = 2.0

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _source() -> Path:
    """``kernels/cpu_surgery.cpp``, found without importing ``gradsafe.kernels`` (that imports triton)."""
    spec = importlib.util.find_spec("gradsafe.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gradsafe.kernels folder is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / SOURCE


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags.

    The build is cached under its name, and ``-march=native`` code built on one CPU may not
    run on another: machines that share a home folder (and so torch's build cache) build one
    copy per kind of CPU instead of loading another's.
    """
    described = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        described += "".join(line for line in info.splitlines(keepends=True)
                             if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:  # not Linux: the machine and processor names are what there is
        pass
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def load_cpu_kernels() -> ModuleType:
    """The compiled module (built on the first call of the process, then cached).

    Raises ``RuntimeError`` saying why when it cannot be built (no compiler, no ninja, a
    failed compile); the reason is kept, so later calls fail at once the same way.
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        # a cached build loads in well under a second; only a real build says it is building
        notice = threading.Timer(BUILD_NOTICE_AFTER_S, lambda: print(
            f"gradsafe: building the CPU kernels (kernels/{SOURCE}); once per kind of CPU, about a minute",
            file=sys.stderr, flush=True))
        notice.daemon = True
        notice.start()
        try:
            from torch.utils.cpp_extension import load

            path = _source()
            _module = load(
                name=f"gradsafe_cpu_surgery_{_cpu_tag()}",
                sources=[str(path)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                verbose=os.environ.get("GRADSAFE_VERBOSE_BUILD") == "1",
            )
        except Exception as exc:  # a missing compiler or ninja surfaces as several exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _error = (
                f"gradsafe's CPU kernels (kernels/{SOURCE}) could not be built: {type(exc).__name__}: {first} "
                "(they need a C++ compiler and ninja: `pip install ninja`; or use TorchBackend() without cpu_kernels)"
            )
            raise RuntimeError(_error) from exc
        finally:
            notice.cancel()
        return _module


def cpu_kernels_unavailable_reason() -> str | None:
    """None when the CPU kernels build (building them if needed), else why not."""
    try:
        load_cpu_kernels()
    except RuntimeError as exc:
        return str(exc)
    return None


def cpu_kernels_from_env() -> bool:
    """``GRADSAFE_CPU_KERNELS``: ``1`` on, ``0`` or unset off; anything else is an error."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 1 (compiled CPU loops) or 0 (torch ops)")
    return value == "1"
