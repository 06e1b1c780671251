"""Optional dependencies (``gradsafe._optional``): a missing one is one line naming the extra.

In this process a module is made missing with ``sys.modules[name] = None``; the command line
is run in a subprocess whose imports of the module are blocked (by the same means, or by a
path finder that does not find it, as when it is not installed), and its stderr must be
exactly the one line, its exit code 2.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from gradsafe._optional import MissingDependency, require, require_installed, run_command
from gradsafe.experiments import data

DEMO_LINE = 'gradsafe demo needs {}: pip install "gradsafe[demo]"'

# the prelude of a subprocess: makes the modules in BLOCKED missing, by ``mode``: ``"none"``,
# ``sys.modules[name] = None``; ``"finder"``, the path finder does not find them (as when
# they are not installed: ``find_spec`` gives None, ``import`` "No module named ...")
PRELUDE = textwrap.dedent('''
    import sys
    from importlib.machinery import PathFinder
    BLOCKED = {blocked!r}
    if {mode!r} == "none":
        for name in BLOCKED:
            sys.modules[name] = None
    else:
        _find_spec = PathFinder.find_spec.__func__

        def _not_installed(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return _find_spec(cls, name, path, target)

        PathFinder.find_spec = classmethod(_not_installed)
''')


def run_python(code: str, blocked: tuple[str, ...] = (), mode: str = "none", cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the modules ``blocked`` cannot be imported."""
    prelude = PRELUDE.format(blocked=tuple(blocked), mode=mode)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def run_cli(argv: list[str], blocked: tuple[str, ...], mode: str = "none", cwd=None) -> subprocess.CompletedProcess:
    return run_python(f"from gradsafe.cli import main\nsys.exit(main({argv!r}))\n", blocked, mode, cwd)


# ----------------------------------------------------------------------------- the helper
def test_require_returns_the_module():
    assert require("json", "demo", "x") is json


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError) as info:
        require("sklearn", "demo", "gradsafe demo")
    exc = info.value
    assert isinstance(exc, MissingDependency)
    assert str(exc) == DEMO_LINE.format("scikit-learn")
    assert (exc.package, exc.extra, exc.what, exc.name) == ("scikit-learn", "demo", "gradsafe demo", "sklearn")
    assert "\n" not in str(exc)


def test_require_a_submodule_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.delitem(sys.modules, "tqdm.auto", raising=False)  # imported earlier by another test's library
    with pytest.raises(MissingDependency, match=r'^x needs tqdm: pip install "gradsafe\[demo\]"$'):
        require("tqdm.auto", "demo", "x")


def test_a_broken_install_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "gradsafe_broken_mod.py").write_text("import gradsafe_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("gradsafe_broken_mod", "demo", "x")
    assert not isinstance(info.value, MissingDependency)
    assert info.value.name == "gradsafe_no_such_module"


def test_require_installed_does_not_import(monkeypatch):
    require_installed("json", "demo", "x")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"^gradsafe plot needs matplotlib: "):
        require_installed("matplotlib", "demo", "gradsafe plot")
    with pytest.raises(MissingDependency, match=r"needs gradsafe_no_such_module: "):
        require_installed("gradsafe_no_such_module", "demo", "x")


def test_run_command_prints_one_line(capsys):
    def missing(args):
        raise MissingDependency("triton", "triton", "gradsafe bench --sweep")

    assert run_command(missing, None) == 2
    out = capsys.readouterr()
    assert out.err == 'gradsafe bench --sweep needs triton: pip install "gradsafe[triton]"\n' and out.out == ""
    assert run_command(lambda args: None, None) == 0
    assert run_command(lambda args: 3, None) == 3


def test_run_command_prints_a_user_error_as_one_line(capsys):
    import argparse

    from gradsafe._optional import UserError  # imported here: the rest of this file predates it

    def bad(args):
        raise UserError("run.jsonl, line 3:\nnot JSON")

    assert run_command(bad, None, "plot") == 2
    out = capsys.readouterr()
    assert (out.err, out.out) == ("gradsafe plot: run.jsonl, line 3: not JSON\n", "")
    assert run_command(bad, argparse.Namespace(command="demo")) == 2
    assert capsys.readouterr().err.startswith("gradsafe demo: ")


# ----------------------------------------------------------------------------- library imports and calls
@pytest.mark.parametrize("module", ["gradsafe.experiments.plots", "gradsafe.experiments.study"])
def test_importing_the_plots_without_matplotlib(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in ("gradsafe.experiments.plots", "gradsafe.experiments.study"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r'^gradsafe.experiments.plots needs matplotlib: pip install "gradsafe\[demo\]"$'):
        importlib.import_module(module)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingDependency, match=r'scikit-learn: pip install "gradsafe\[demo\]"$'):
        data._digits_arrays()


def test_plot_run_without_matplotlib(monkeypatch, tmp_path):
    from gradsafe.plot import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r'^gradsafe plot needs matplotlib: pip install "gradsafe\[demo\]"$'):
        plot_run(tmp_path / "run.jsonl", tmp_path / "run.png")


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("mode", ["none", "finder"])
def test_demo_without_scikit_learn(tmp_path, mode):
    res = run_cli(["demo", "--quick", "--out", str(tmp_path / "results")], ("sklearn",), mode, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr == DEMO_LINE.format("scikit-learn") + "\n"
    assert res.stdout == ""
    assert not (tmp_path / "results").exists()


def test_demo_without_matplotlib(tmp_path):
    res = run_cli(["demo", "--quick", "--out", str(tmp_path / "results")], ("matplotlib",), cwd=tmp_path)
    assert (res.returncode, res.stderr, res.stdout) == (2, DEMO_LINE.format("matplotlib") + "\n", "")


def test_demo_without_tqdm(tmp_path):
    res = run_cli(["demo", "--quick"], ("tqdm",), cwd=tmp_path)
    assert (res.returncode, res.stderr, res.stdout) == (2, DEMO_LINE.format("tqdm") + "\n", "")
    # no progress bar, no tqdm needed: the run gets as far as checking its options
    res = run_cli(["demo", "--no-progress", "--methods", "plain,magic"], ("tqdm",), cwd=tmp_path)
    assert res.returncode == 2 and "unknown methods" in res.stderr and "tqdm" not in res.stderr


@pytest.mark.parametrize("mode", ["none", "finder"])
def test_plot_without_matplotlib(tmp_path, mode):
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps({"step": 0, "gradsafe/old/cosine": 0.5}) + "\n")
    res = run_cli(["plot", str(run), "-o", str(tmp_path / "run.png")], ("matplotlib",), mode, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr == 'gradsafe plot needs matplotlib: pip install "gradsafe[demo]"\n'
    assert res.stdout == "" and not (tmp_path / "run.png").exists()
