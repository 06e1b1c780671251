"""What the benchmarks share (``gradsafe.bench.common``)."""

from __future__ import annotations

import torch

from gradsafe.bench.common import device_label, emit, measure, pick_device, stderr_progress


def test_measure_interleaves_rounds_after_a_warm_up():
    calls = []
    times = measure({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))}, rounds=3)
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_measure_reports_progress_before_each_warm_up_and_round():
    events = []
    measure({"a": lambda r: events.append(("a", r)), "b": lambda r: events.append(("b", r))}, rounds=2,
            progress=lambda line: events.append(line))
    assert events == ["warm-up 1/2: a", ("a", 0), ("a", 1), "warm-up 2/2: b", ("b", 0), ("b", 1),
                      "timed round 1/2 (every variant once)", ("a", 0), ("b", 0),
                      "timed round 2/2 (every variant once)", ("a", 1), ("b", 1)]


def test_stderr_progress_prints_one_line_each(capsys):
    report = stderr_progress("gradsafe bench")
    report("warm-up 1/2: a")
    err = capsys.readouterr().err
    assert err.startswith("gradsafe bench: [") and err.endswith(" s] warm-up 1/2: a\n") and err.count("\n") == 1


def test_emit_prints_and_writes(tmp_path, capsys):
    path = tmp_path / "t.txt"
    emit("a table", str(path))
    emit("only printed", None)
    assert capsys.readouterr().out == "a table\nonly printed\n"
    assert path.read_text() == "a table\n"


def test_device_choice_and_label():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_label(torch.device("cpu")) == f"cpu, {torch.get_num_threads()} threads"
