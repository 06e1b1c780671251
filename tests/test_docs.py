"""The python examples in docs/ run as written."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


# the paths opened for writing while an example runs (None: not recording); filled by an
# audit hook, installed once per process (audit hooks cannot be removed)
_WRITES: list[str] | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(event: str, args: tuple) -> None:
    if _WRITES is None or event != "open" or len(args) < 3:
        return
    path, mode, flags = args[:3]
    if isinstance(path, int):
        return
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
    if writes:
        _WRITES.append(os.path.abspath(os.fsdecode(path)))


@pytest.fixture
def writes_only_under(tmp_path, monkeypatch):
    """Run with the working directory and ``tempfile``'s folder in ``tmp_path``; yield the paths written."""
    global _WRITES
    if not getattr(sys, "_gradsafe_docs_hook", False):
        sys.addaudithook(_record_writes)
        sys._gradsafe_docs_hook = True
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _WRITES = []
    try:
        yield _WRITES
    finally:
        _WRITES = None


@pytest.mark.parametrize("page", ["api.md", "monitor.md"])
def test_examples_write_only_under_tmp_path(page: str, tmp_path, writes_only_under) -> None:
    namespace: dict = {"__name__": f"docs_{page}"}
    for i, block in enumerate(python_blocks(DOCS / page)):
        exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
    root = os.path.realpath(tmp_path)
    outside = [p for p in writes_only_under if not os.path.realpath(p).startswith(root + os.sep)]
    assert not outside, f"{page}'s examples write outside the test's folder: {outside}"


@pytest.mark.parametrize("page", ["api.md", "monitor.md"])
def test_examples_run(page: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths and temporary files stay in the test's folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python examples"
    namespace: dict = {"__name__": f"docs_{page}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page}, example {i} failed: {exc!r}\n{block}") from exc


# ----------------------------------------------------------------------------- the README: the newcomer's path
ROOT = DOCS.parent
DEMO_COMMAND = 'pip install ".[demo]" && gradsafe demo'
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -q'


def test_readme_leads_with_what_protected_best() -> None:
    readme = (ROOT / "README.md").read_text()
    first = python_blocks(ROOT / "README.md")[0]
    # the study's best gradsafe operator (SafeGrad), and the README says the two losses beat it
    assert 'protect("safety", closure=kl, mode="conflict", refresh_every=1, rho=1)' in first
    assert "gradsafe.kl_to_reference" in first and "Try replay or the\nKL loss first." in readme
    assert "## Which configuration should I use?" in readme and "(docs/results.md)" in readme
    # every figure before the install section is one of docs/results.md's (none invented)
    head = readme[: readme.index("## Install")]
    results = (DOCS / "results.md").read_text()
    figures = set(re.findall(r"(?<![\w.])\d+\.\d+", head))
    assert figures and not [f for f in sorted(figures) if f not in results]


def test_the_full_reports_tables_fit_a_120_column_terminal() -> None:
    """The tables ``gradsafe demo --full`` printed (docs/results.md keeps them) fit 120 columns."""
    report = (DOCS / "results.md").read_text().split("# The full report", 1)[1]
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert len(rows) > 100 and max(len(r) for r in rows) <= 120


def test_readme_commands_and_the_cpu_note() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines
    first_pip = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    fence = first_pip - 1
    assert lines[fence] == "```bash" and lines[fence - 1] == ""
    note = lines[fence - 2]  # the paragraph right above the first install commands
    assert "https://download.pytorch.org/whl/cpu" in note and "CPU" in lines[fence - 3]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == TEST_COMMAND
