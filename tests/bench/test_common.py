"""What the benchmarks share (``gradsafe.bench.common``)."""

from __future__ import annotations

import torch

from gradsafe.bench.common import device_label, emit, measure, pick_device


def test_measure_interleaves_rounds_after_a_warm_up():
    calls = []
    times = measure({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))}, rounds=3)
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())


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
