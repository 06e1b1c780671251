"""The command line's user errors: one line ``gradsafe <command>: <message>`` on stderr, exit code 2.

Every test writes only under ``tmp_path``; commands that could hang run in a subprocess
with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gradsafe
from gradsafe import cli

PNG = b"\x89PNG\r\n\x1a\n"
ROW = {"step": 1, "gradsafe/old/cosine": 0.5}


def one_error_line(err: str, command: str) -> str:
    """The single stderr line of a user error (asserts there is exactly one, and no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradsafe {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def write_rows(path, rows, tail: str = "") -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(path)


# ----------------------------------------------------------------------------- gradsafe plot
BAD_INPUTS = {
    "missing": (None, "No such file"),
    "empty": ("", "no rows"),
    "garbage": ("hello world\nmore garbage\n", "not JSON"),
    "binary": (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    "list": ("[1, 2, 3]\n", "expected a JSON object"),
    "no-step": (json.dumps({"gradsafe/old/cosine": 0.5}) + "\n", "'step'"),
    "string-value": (json.dumps({"step": 1, "gradsafe/old/cosine": "high"}) + "\n", "not a number"),
    "no-stats": (json.dumps({"step": 1, "loss": 0.3}) + "\n", "no gradsafe/"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_plot_bad_input_is_one_line(tmp_path, capsys, case):
    content, expected = BAD_INPUTS[case]
    path = tmp_path / "run.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "out.png")]) == 2
    out = capsys.readouterr()
    assert expected in one_error_line(out.err, "plot") and out.out == ""
    assert not (tmp_path / "out.png").exists()


def test_plot_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert cli.main(["plot", str(tmp_path / "adir"), "-o", str(tmp_path / "out.png")]) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err, "plot")


def test_plot_an_interrupted_run_keeps_every_complete_row(tmp_path, capsys):
    rows = [{"step": s, "gradsafe/old/cosine": 0.1 * s} for s in (1, 2, 3)]
    path = write_rows(tmp_path / "run.jsonl", rows, tail='{"step": 4, "gradsafe/old/cos')
    out_png = tmp_path / "run.png"
    assert cli.main(["plot", path, "-o", str(out_png)]) == 0
    out = capsys.readouterr()
    warning = out.err.splitlines()
    assert len(warning) == 1 and warning[0].startswith("gradsafe plot: warning: ") and "3 complete rows" in warning[0]
    assert out_png.read_bytes()[:8] == PNG and f"wrote {out_png}" in out.out


def test_plot_into_an_existing_folder_writes_the_input_stem(tmp_path, capsys):
    path = write_rows(tmp_path / "run.jsonl", [ROW])
    folder = tmp_path / "adir"
    folder.mkdir()
    assert cli.main(["plot", path, "-o", str(folder)]) == 0
    assert (folder / "run.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "adir.png").exists()
    assert f"wrote {folder / 'run.png'}" in capsys.readouterr().out


def test_plot_into_a_missing_folder_is_one_line(tmp_path, capsys):
    path = write_rows(tmp_path / "run.jsonl", [ROW])
    assert cli.main(["plot", path, "-o", str(tmp_path / "no" / "such" / "x.png")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err, "plot")


def test_plot_an_unknown_statistic_is_one_line(tmp_path, capsys):
    path = write_rows(tmp_path / "run.jsonl", [ROW])
    assert cli.main(["plot", path, "-o", str(tmp_path / "x.png"), "--stats", "nonsense"]) == 2
    assert "no statistic" in one_error_line(capsys.readouterr().err, "plot")


def run_cli_subprocess(argv: list[str], cwd) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom gradsafe.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_plot_dev_zero_is_refused_without_hanging(tmp_path):
    res = run_cli_subprocess(["plot", "/dev/zero", "-o", str(tmp_path / "z.png")], tmp_path)
    assert res.returncode == 2
    assert "not a regular file" in one_error_line(res.stderr, "plot")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_plot_a_pipe_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    res = run_cli_subprocess(["plot", str(fifo), "-o", str(tmp_path / "p.png")], tmp_path)
    assert res.returncode == 2
    assert "not a regular file" in one_error_line(res.stderr, "plot")


def test_plot_a_line_longer_than_the_bound_is_refused(tmp_path, capsys):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"{" + b" " * (2 << 20) + b"}\n")  # 2 MiB on one line
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "h.png")]) == 2
    assert "longer than" in one_error_line(capsys.readouterr().err, "plot")


# ----------------------------------------------------------------------------- gradsafe demo
def _no_study(*args, **kwargs):
    raise AssertionError("the study ran before the options were checked")


@pytest.fixture
def no_study(monkeypatch):
    from gradsafe.experiments import study

    monkeypatch.setattr(study, "run_study", _no_study)


@pytest.mark.parametrize("where", ["proc", "file", "under-a-file"])
def test_demo_checks_the_output_folder_before_any_work(tmp_path, capsys, no_study, where):
    (tmp_path / "afile").write_text("x")
    out = {"proc": "/proc/gradsafe-nope", "file": str(tmp_path / "afile"),
           "under-a-file": str(tmp_path / "afile" / "results")}[where]
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", out]) == 2
    assert one_error_line(capsys.readouterr().err, "demo").startswith(f"gradsafe demo: --out {out}")


def test_demo_bad_option_values_are_one_line(capsys, no_study):
    assert cli.main(["demo", "--quick", "--no-progress", "--methods", "plain,magic"]) == 2
    assert "unknown methods" in one_error_line(capsys.readouterr().err, "demo")


def test_tables_are_written_before_the_plots(tmp_path, monkeypatch):
    from gradsafe.experiments import study

    def broken_plot(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(study, "plot_pareto", broken_plot)
    agg = {"meta": {"methods": ["plain"], "scenarios": ["continual"]},
           "continual": {"config": {"tuned_condition": "permuted"}, "conditions": {}, "runs": []}}
    with pytest.raises(RuntimeError, match="the plot failed"):
        study.write_outputs(agg, str(tmp_path / "results"), "the report\n")
    assert json.loads((tmp_path / "results" / "results.json").read_text())["meta"] == agg["meta"]
    assert "the report" in (tmp_path / "results" / "results.md").read_text()


# ----------------------------------------------------------------------------- gradsafe bench
@pytest.fixture
def no_bench(monkeypatch):
    import gradsafe.bench as bench

    monkeypatch.setattr(bench, "run_flat", _no_study)
    monkeypatch.setattr(bench, "run_factored", _no_study)


def test_bench_cuda_without_cuda_is_one_line(monkeypatch, capsys, no_bench):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_error_line(capsys.readouterr().err, "bench")


@pytest.mark.parametrize("device", ["nope", "meta", "cuda:99" if torch.cuda.is_available() else "cuda:0"])
def test_bench_unusable_device_is_one_line(capsys, no_bench, device):
    assert cli.main(["bench", "--quick", "--device", device]) == 2
    assert f"--device {device}" in one_error_line(capsys.readouterr().err, "bench")


def test_bench_out_in_a_missing_folder_is_one_line(tmp_path, capsys, no_bench):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path / "no" / "t.txt")]) == 2
    assert "--out" in one_error_line(capsys.readouterr().err, "bench")


@pytest.mark.parametrize("argv", [
    ["bench", "--rank", "0"],
    ["bench", "--numel", "-5"],
    ["bench", "--tensors", "0"],
    ["bench", "--rounds", "0"],
    ["bench", "--shape", "0", "4", "--scope", "factored"],
    ["bench", "--shape", "a", "4", "--scope", "factored"],
    ["bench", "--layers", "-1", "--scope", "factored"],
    ["bench", "--ks", "1,x"],
    ["bench", "--backend", "nope"],
    ["demo", "--workers", "0", "--no-progress"],
])
def test_bad_numbers_are_usage_errors(capsys, no_bench, no_study, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--quick"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"gradsafe {argv[0]}: error: argument ")


def test_bench_numel_below_tensors_is_one_line(capsys, no_bench):
    assert cli.main(["bench", "--device", "cpu", "--numel", "10", "--tensors", "50"]) == 2
    assert "--numel 10" in one_error_line(capsys.readouterr().err, "bench")


# ----------------------------------------------------------------------------- gradsafe --version
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"gradsafe {gradsafe.__version__}\n"
