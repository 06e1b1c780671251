"""What ``pip install gradsafe`` needs: the core dependencies are torch, numpy and
threadpoolctl, the rest are extras; the core imports and runs without them; the study's
modules are layered."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_layering import import_graph

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("sklearn", "matplotlib", "tqdm", "triton")


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The distribution a requirement names, normalised (``scikit_learn>=1`` -> ``scikit-learn``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def test_core_dependencies_are_torch_numpy_and_threadpoolctl():
    deps = _project()["dependencies"]
    assert sorted(_name(d) for d in deps) == ["numpy", "threadpoolctl", "torch"]
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch_req and "==" not in torch_req  # a range, not a pin
    for absent in ("scikit-learn", "matplotlib", "tqdm", "triton"):
        assert absent not in {_name(d) for d in deps}


def test_extras():
    extras = _project()["optional-dependencies"]
    assert {_name(d) for d in extras["demo"]} >= {"scikit-learn", "matplotlib", "tqdm"}
    assert [_name(d) for d in extras["triton"]] == ["triton"]
    assert "platform_system == 'Linux'" in extras["triton"][0]
    assert [_name(d) for d in extras["cpu"]] == ["ninja"]  # builds the CPU loops (cpp_extension)
    dev = extras["dev"]
    assert "gradsafe[demo,triton,cpu]" in dev
    assert {"pytest", "pytest-benchmark", "hypothesis", "transformers", "accelerate", "lightning",
            "tensorboard", "peft"} <= {_name(d) for d in dev}


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


def test_the_study_modules_are_layered():
    """jobs -> stats -> tables -> plots -> study: each imports only earlier ones."""
    graph = import_graph()
    order = ["jobs", "stats", "tables", "plots", "study"]
    for i, name in enumerate(order):
        later = {f"gradsafe.experiments.{n}" for n in order[i + 1:]}
        assert not graph[f"gradsafe.experiments.{name}"] & later, name
    assert "gradsafe.bench" not in graph["gradsafe.bench.flat"] | graph["gradsafe.bench.factored"]
    assert not any(m.startswith("gradsafe.bench") for m in graph["gradsafe.bench.common"])
