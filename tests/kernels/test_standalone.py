"""The kernels/ folder stands alone: it imports only the standard library, torch and triton.

Whatever the kernels need from a plan and its rule (the address tables, the rule's
matrices, the degeneracy threshold) reaches them as a ``KernelLayout`` that the gradsafe
side (``gradsafe.backends.triton_layout``) fills. Checked twice: statically, on every
import statement of every file (inside functions too; ``if TYPE_CHECKING:`` blocks aside),
and by importing the folder under another package name in a fresh interpreter, where no
gradsafe module may be loaded.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
ALLOWED_TOP = frozenset(sys.stdlib_module_names) | {"torch", "triton"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node (and dynamic import call) of ``tree``, outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            if name in ("__import__", "import_module"):
                yield node
        stack.extend(ast.iter_child_nodes(node))


def violations(source: str, depth: int = 0, filename: str = "<kernels>") -> list[str]:
    """What in ``source`` imports anything but the stdlib, torch, triton or kernels/ itself
    (``depth``: how many folders below kernels/ the file is; a relative import may climb that
    many levels and no further)."""
    bad = []
    for node in _imports(ast.parse(source, filename)):
        where = f"{filename}:{node.lineno}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in ALLOWED_TOP:
                    bad.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").split(".")[0] not in ALLOWED_TOP:
                    bad.append(f"{where}: from {node.module} import ...")
            elif node.level - 1 > depth:
                bad.append(f"{where}: from {'.' * node.level}{node.module or ''} import ... (outside kernels/)")
        else:  # a dynamic import: only a literal name that the rule allows
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                bad.append(f"{where}: dynamic import of a computed name")
            elif arg.value.startswith(".") or arg.value.split(".")[0] not in ALLOWED_TOP:
                bad.append(f"{where}: dynamic import of {arg.value!r}")
    return bad


def test_kernels_folder_exists_and_has_the_kernel_files():
    files = {p.name for p in KERNELS.glob("*.py")}
    assert {"__init__.py", "common.py", "reduce.py", "finalize.py", "apply.py", "layout.py", "compile_check.py"} <= files
    assert not (ROOT / "gradsafe" / "kernels").exists()
    assert not (KERNELS / "surgery.py").exists()  # no file shares its name with gradsafe/surgery.py


def test_kernels_import_only_stdlib_torch_and_triton():
    bad = []
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 7
    for path in files:
        depth = len(path.relative_to(KERNELS).parent.parts)
        bad += violations(path.read_text(), depth, str(path.relative_to(ROOT)))
    assert not bad, "kernels/ reaches outside stdlib/torch/triton:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np",
        "from gradsafe.qp import DEGENERATE",
        "import gradsafe.plan",
        "from ..qp import DEGENERATE",
        "from .. import rule",
        "def f():\n    from ..plan import Plan\n    return Plan",
        "class C:\n    def m(self):\n        import numpy\n",
        "import importlib\nimportlib.import_module('gradsafe.rule')",
        "__import__('numpy')",
        "import importlib\nname = 'x'\nimportlib.import_module(name)",
    ],
)
def test_the_check_catches_what_it_should(source):
    assert violations(source), source


def test_a_subfolder_may_reach_kernels_but_not_above():
    assert violations("from .. import layout", depth=1) == []
    assert violations("from ... import qp", depth=1)


def test_the_check_allows_what_it_should():
    source = textwrap.dedent(
        """
        from __future__ import annotations
        import os, re, sys
        from dataclasses import dataclass
        from typing import TYPE_CHECKING
        import torch
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from . import INTERPRETED, layout
        from .common import as_ptr
        if TYPE_CHECKING:
            from gradsafe.plan import Plan
            import numpy as np
        def f():
            from .layout import KernelConfig
            import importlib
            return importlib.import_module("triton.compiler")
        """
    )
    assert violations(source) == []


def test_kernels_import_as_a_standalone_package_without_gradsafe(tmp_path):
    """kernels/ copied under another name imports (every module) with no gradsafe module loaded."""
    pkg = tmp_path / "standalone_kernels"
    shutil.copytree(KERNELS, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(
        """
        import importlib, sys
        pkg = importlib.import_module("standalone_kernels")
        for name in ("common", "reduce", "finalize", "apply", "layout", "compile_check"):
            importlib.import_module("standalone_kernels." + name)
        loaded = sorted(m for m in sys.modules if m == "gradsafe" or m.startswith("gradsafe."))
        assert not loaded, loaded
        assert pkg.INTERPRETED is True
        lay_fields = set(pkg.KernelLayout.__dataclass_fields__)
        assert "degenerate" in lay_fields and "rule" not in lay_fields
        print("ok", pkg.TRITON_VERSION, pkg.launches.total)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok "), r.stdout
