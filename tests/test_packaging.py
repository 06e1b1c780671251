"""What ``pip install gradsafe`` needs: the core dependencies are torch and numpy, the rest
are extras; the core imports and runs without them; the study and bench modules import
one another without cycles."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gradsafe"
OPTIONAL = ("sklearn", "matplotlib", "tqdm", "threadpoolctl", "triton")


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The distribution a requirement names, normalised (``scikit_learn>=1`` -> ``scikit-learn``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def test_core_dependencies_are_torch_and_numpy():
    deps = _project()["dependencies"]
    assert sorted(_name(d) for d in deps) == ["numpy", "torch"]
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch_req and "==" not in torch_req  # a range, not a pin
    for absent in ("scikit-learn", "matplotlib", "tqdm", "threadpoolctl", "triton"):
        assert absent not in {_name(d) for d in deps}


def test_extras():
    extras = _project()["optional-dependencies"]
    assert {_name(d) for d in extras["demo"]} >= {"scikit-learn", "matplotlib", "tqdm", "threadpoolctl"}
    assert [_name(d) for d in extras["triton"]] == ["triton"]
    assert "platform_system == 'Linux'" in extras["triton"][0]
    dev = extras["dev"]
    assert "gradsafe[demo,triton]" in dev
    assert {"pytest", "pytest-benchmark", "hypothesis", "transformers", "accelerate", "lightning",
            "tensorboard"} <= {_name(d) for d in dev}


def test_import_gradsafe_pulls_no_extra():
    # torch itself may import tqdm when it is installed: only what gradsafe adds counts
    code = ("import sys, torch\nbefore = set(sys.modules)\n"
            "import gradsafe, gradsafe.cli, gradsafe.bench, gradsafe.experiments.demo\n"
            f"print(sorted(m for m in {OPTIONAL[:3]!r} if m in set(sys.modules) - before))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_core_runs_without_the_extras(tmp_path):
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in OPTIONAL)
    code = blocked + (
        "import torch, gradsafe\n"
        "from gradsafe.cli import main\n"
        "model = torch.nn.Linear(4, 2)\n"
        "opt = gradsafe.ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),\n"
        "    protected_grads={'old': [[torch.randn_like(p) for p in model.parameters()]]}, rank=1)\n"
        "model(torch.randn(3, 4)).sum().backward()\n"
        "opt.step()\n"
        "print(type(opt).__name__, opt.report['old']['cosine'] is not None)\n"
        "sys.exit(main(['bench', '--scope', 'factored', '--quick', '--device', 'cpu', '--layers', '1',\n"
        "               '--shape', '16', '8', '--rank', '2', '--rounds', '1']))\n"
    )
    res = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "ProtectedOptimizer True"
    assert "gradsafe bench --scope factored" in res.stdout


# ----------------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The gradsafe modules ``path`` imports, at any depth of the file (function bodies too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gradsafe")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("gradsafe"):
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # ``from . import x`` imports a module x
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


@pytest.mark.parametrize("package", ["gradsafe.experiments", "gradsafe.bench"])
def test_no_import_cycle(package):
    graph = _graph()
    inside = {m for m in graph if m.startswith(package + ".")}
    assert inside, package
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m] & inside):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(inside):
        if m not in state:
            visit(m, [m])


def test_the_study_modules_are_layered():
    """jobs -> stats -> tables -> plots -> study: each imports only earlier ones."""
    graph = _graph()
    order = ["jobs", "stats", "tables", "plots", "study"]
    for i, name in enumerate(order):
        later = {f"gradsafe.experiments.{n}" for n in order[i + 1:]}
        assert not graph[f"gradsafe.experiments.{name}"] & later, name
    assert "gradsafe.bench" not in graph["gradsafe.bench.flat"] | graph["gradsafe.bench.factored"]
    assert not any(m.startswith("gradsafe.bench") for m in graph["gradsafe.bench.common"])
