"""Optional dependencies: import one, or fail with one line that names the extra to install.

The core (``pip install gradsafe``) needs torch, numpy and threadpoolctl only; the study,
its plots and ``gradsafe plot`` need the ``[demo]`` extra, the Triton kernels the
``[triton]`` extra.
``require`` imports a module of such an extra or raises ``MissingDependency`` (an
``ImportError``) whose message is one line: what needs it, the package, the pip command;
``require_installed`` checks the same without importing (scikit-learn takes seconds).
The command line (``run_command``) prints that line on stderr and exits with code 2; it does
the same for a ``UserError`` (a bad file, folder, device or option value), as one line
``gradsafe <command>: <message>``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["MissingDependency", "UserError", "require", "require_installed", "run_command", "PACKAGES"]

# import name -> the distribution pip installs it from (where the two differ or for the message)
PACKAGES = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "triton": "triton",
}


class MissingDependency(ImportError):
    """An optional dependency is not installed; ``str(exc)`` is the one-line message."""

    def __init__(self, module: str, extra: str, what: str) -> None:
        top = module.split(".")[0]
        self.package = PACKAGES.get(top, top)
        self.extra = extra
        self.what = what
        super().__init__(f'{what} needs {self.package}: pip install "gradsafe[{extra}]"', name=module)


class UserError(Exception):
    """A user error at the command line (a bad file, folder, device or value).

    ``str(exc)`` is the message without the command's name; ``run_command`` prints it as one
    line ``gradsafe <command>: <message>`` on stderr and returns exit code 2.
    """


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of whitespace folded into single spaces."""
    return " ".join(str(text).split())


def _is_missing(exc: ImportError, module: str) -> bool:
    """True when ``exc`` says ``module`` (or a package above it) is not there, not that it is broken."""
    name = getattr(exc, "name", None)
    return bool(name) and (module == name or module.startswith(name + "."))


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` and return it; if it is not installed raise ``MissingDependency``.

    ``extra``: the gradsafe extra that installs it (``"demo"``, ``"triton"``); ``what``: who
    needs it, as the message's subject (``"gradsafe demo"``). An installed module that fails
    to import for another reason re-raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not _is_missing(exc, module):
            raise
        raise MissingDependency(module, extra, what) from None


def require_installed(module: str, extra: str, what: str) -> None:
    """Raise ``MissingDependency`` unless the top-level module ``module`` can be found (not imported)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a blocked import, or a module without a spec
        spec = None
    if spec is None:
        raise MissingDependency(module, extra, what)


def run_command(
    run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, command: str | None = None
) -> int:
    """Run a command; a ``MissingDependency`` or ``UserError`` becomes one line on stderr and exit code 2.

    A ``MissingDependency`` prints its own line (it names the command already); a
    ``UserError`` prints ``gradsafe <command>: <message>``, where ``command`` defaults to
    ``args.command`` (set by the ``gradsafe`` parser).
    """
    try:
        return int(run(args) or 0)
    except MissingDependency as exc:
        print(one_line(str(exc)), file=sys.stderr)
        return 2
    except UserError as exc:
        name = command or getattr(args, "command", None)
        prefix = f"gradsafe {name}" if name else "gradsafe"
        print(f"{prefix}: {one_line(str(exc))}", file=sys.stderr)
        return 2
