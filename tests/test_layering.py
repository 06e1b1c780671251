"""The package's import graph: no cycles, the numerics at the bottom, operators standalone.

Every import counts, at module level or inside a function; only ``if TYPE_CHECKING:``
blocks (annotations) do not.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradsafe"


def _module_files() -> dict[str, pathlib.Path]:
    """Module name -> file, for the gradsafe package as installed (``kernels/`` maps to
    ``gradsafe.kernels`` when it is the top-level folder)."""
    out = {}
    roots = [(PACKAGE, "gradsafe")]
    if (ROOT / "kernels").is_dir():
        roots.append((ROOT / "kernels", "gradsafe.kernels"))
    for base, prefix in roots:
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The gradsafe modules ``module`` imports (``from X import name`` counts X.name when it
    is a module, else X)."""
    tree = ast.parse(path.read_text())
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "gradsafe":
                        found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "gradsafe":
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.add(sub if sub in known else target)
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    return {m: _imports(p, m, p.name == "__init__.py", known) - {m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports_and_skips_type_checking(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .b import X\n"
        "def f():\n    from .c import Y\n    import gradsafe.d\n"
    )
    known = {"gradsafe.b", "gradsafe.c", "gradsafe.d", "gradsafe.mod"}
    assert _imports(path, "gradsafe.mod", False, known) == {"gradsafe.c", "gradsafe.d"}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert _cycles(graph) == []


@pytest.mark.parametrize("module", ["gradsafe.numerics", "gradsafe.subspace", "gradsafe.sharding"])
def test_bottom_layer_imports_nothing_of_gradsafe(module):
    assert import_graph()[module] == set()


def test_operators_import_only_the_bottom_layer():
    graph = import_graph()
    allowed_prefix = "gradsafe.operators"
    bottom = {"gradsafe.numerics", "gradsafe.subspace", "gradsafe.qp"}
    for module, deps in graph.items():
        if module.startswith(allowed_prefix):
            assert {d for d in deps if not d.startswith(allowed_prefix)} <= bottom, module


def test_plans_and_backends_never_import_the_objective_or_the_optimizer():
    graph = import_graph()
    for module, deps in graph.items():
        if module in ("gradsafe.plan", "gradsafe.rule", "gradsafe.report") or module.startswith("gradsafe.backends"):
            assert not deps & {"gradsafe.objective", "gradsafe.optimizer", "gradsafe.registry"}, module


def test_mode_is_tested_only_inside_the_operators():
    """Which operator a configuration means is decided in one place (gradsafe/operators/)."""
    offenders = []
    for module, path in _module_files().items():
        if module.startswith(("gradsafe.operators", "gradsafe.experiments", "gradsafe.bench")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Attribute) and n.attr == "mode"]
                if names:
                    offenders.append(f"{module}:{node.lineno}")
    assert offenders == []
