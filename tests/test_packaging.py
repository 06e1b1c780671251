"""Packaging: the top-level kernels/ folder ships as ``gradsafe.kernels``.

pyproject.toml maps ``gradsafe.kernels`` to kernels/ (``package-dir``) and lists the packages.
Checked: the list matches the tree; the editable install this suite runs in resolves
``gradsafe.kernels`` to kernels/; a wheel built offline holds ``gradsafe/kernels/*`` and no
top-level ``kernels`` package, and, unpacked, imports and runs a Triton step from itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = ["__init__.py", "common.py", "reduce.py", "finalize.py", "apply.py", "layout.py", "compile_check.py"]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_of_the_tree():
    cfg = _setuptools_config()
    assert cfg["package-dir"] == {"gradsafe.kernels": "kernels"}
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gradsafe").rglob("__init__.py")}
    tree |= {".".join(("gradsafe", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "kernels").rglob("__init__.py")}
    tree = {t for t in tree if "__pycache__" not in t}
    assert set(cfg["packages"]) == tree


def test_editable_install_resolves_gradsafe_kernels_to_the_top_level_folder():
    import gradsafe
    import gradsafe.kernels
    import gradsafe.kernels.compile_check

    assert Path(gradsafe.__file__).resolve() == ROOT / "gradsafe" / "__init__.py", "not this tree's gradsafe"
    assert Path(gradsafe.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert list(gradsafe.kernels.__path__) == [str(ROOT / "kernels")]
    for mod in (gradsafe.kernels.reduce, gradsafe.kernels.finalize, gradsafe.kernels.apply, gradsafe.kernels.compile_check):
        assert Path(mod.__file__).resolve().parent == ROOT / "kernels"
    assert not (ROOT / "gradsafe" / "kernels").exists()


def _source_copy(dest: Path) -> Path:
    """What a build reads (a copy: the build writes build/ and *.egg-info next to it)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("gradsafe", "kernels"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


def test_wheel_ships_the_kernels_as_gradsafe_kernels(tmp_path):
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    out = tmp_path / "wheel"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    (whl,) = out.glob("gradsafe-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        top_level = next(z.read(n).decode() for n in names if n.endswith(".dist-info/top_level.txt"))
        z.extractall(tmp_path / "site")
    for f in KERNEL_FILES:
        assert f"gradsafe/kernels/{f}" in names, f
    assert "gradsafe/kernels/cpu_surgery.cpp" in names  # the CPU loops' source, built on first use
    assert "gradsafe/backends/triton_layout.py" in names
    assert "gradsafe/kernels/surgery.py" not in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package in the wheel"
    assert top_level.split() == ["gradsafe"]

    # the unpacked wheel alone (first on sys.path, the tree out of reach) imports and steps
    code = textwrap.dedent(
        """
        import sys, torch
        import gradsafe, gradsafe.kernels
        from gradsafe import ProtectedOptimizer
        from gradsafe.backends.triton_backend import TritonBackend
        p = torch.nn.Parameter(torch.randn(6))
        opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0), backend=TritonBackend())
        opt.protect("a", [[torch.randn(6)], [torch.randn(6)]])
        p.grad = torch.randn(6)
        gradsafe.kernels.launches.reset()
        opt.step()
        assert gradsafe.kernels.launches.by_kernel == {"reduce": 1, "finalize": 1, "apply": 1}
        print(gradsafe.__file__)
        print(gradsafe.kernels.__file__)
        print(sys.modules["gradsafe.backends.triton_layout"].__file__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADSAFE_BACKEND")}
    env["TRITON_INTERPRET"] = "1"
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=site, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = [Path(line) for line in r.stdout.split()[-3:]]
    assert files == [site / "gradsafe" / "__init__.py", site / "gradsafe" / "kernels" / "__init__.py",
                     site / "gradsafe" / "backends" / "triton_layout.py"], files
