"""The monitor: report statistics against direct computation, staleness, sinks, plot."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from gradsafe import GradientMonitor, JsonlSink, LoggingSink, ProtectedOptimizer, TensorBoardSink, collect_gradients
from gradsafe.cli import main as cli_main
from gradsafe.monitor import read_jsonl


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def mse(model, b):
    return torch.nn.functional.mse_loss(model(b[0]), b[1])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def protected_samples(model, m=4):
    return collect_gradients(model, lambda b: mse(model, b), [batch(100 + i) for i in range(m)])


@pytest.mark.parametrize("mode", ["project", "conflict", "observe"])
def test_predicted_change_in_grad_space_is_minus_lr_times_dot(mode):
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, per_tensor=True)
    obj = opt.protect("old", protected_samples(model))
    before = flat([p.detach().clone() for p in model.parameters()])
    opt.zero_grad()
    (-mse(model, batch(1))).backward()  # a gradient that fights the protected objective
    opt.step()
    delta = flat([p.detach() for p in model.parameters()]) - before
    expected = float(obj.mean_ref.double() @ delta.double())
    scale = float(obj.mean_ref.norm() * delta.norm())  # parameter rounding makes delta exact to ~1e-7
    rep = opt.report["old"]
    assert rep["predicted_change"] == pytest.approx(expected, rel=1e-4, abs=1e-5 * scale)
    per_tensor = sum(v for k, v in rep.items() if k.startswith("predicted_change/"))
    assert per_tensor == pytest.approx(rep["predicted_change"], rel=1e-9, abs=1e-12)
    assert {k.split("/")[1] for k in rep if k.startswith("cosine/")} == {"0", "1", "2", "3"}
    if mode == "project":  # protected directions removed: no first-order change
        assert abs(rep["predicted_change"]) <= 1e-6 * scale
    if mode == "conflict":
        assert rep["predicted_change"] <= 1e-6 * scale
    if mode == "observe":  # the gradient fights the objective: the loss is predicted to rise
        assert rep["predicted_change"] > 1e-3 * scale


def test_predicted_change_in_update_space_uses_the_step_taken():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), space="update", mode="observe")
    obj = opt.protect("old", protected_samples(model))
    for i in range(3):
        before = flat([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        mse(model, batch(i)).backward()
        opt.step()
        delta = flat([p.detach() for p in model.parameters()]) - before
        scale = float(obj.mean_ref.norm() * delta.norm())
        expected = float(obj.mean_ref.double() @ delta.double())
        assert opt.report["old"]["predicted_change"] == pytest.approx(expected, rel=1e-4, abs=1e-5 * scale)


def test_predicted_change_tracks_the_protected_loss_for_small_steps():
    model = make_model()
    protected = batch(100, n=64)
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), mode="observe")
    opt.protect("old", collect_gradients(model, lambda b: mse(model, b), [protected]))
    loss0 = float(mse(model, protected).detach())
    opt.zero_grad()
    mse(model, batch(5)).backward()
    opt.step()
    actual = float(mse(model, protected).detach()) - loss0
    assert opt.report["old"]["predicted_change"] == pytest.approx(actual, rel=0.05)


def test_fisher_step_is_fisher_weighted_squared_step():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mode="project", fisher_metrics=True)
    obj = opt.protect("old", protected_samples(model))
    before = flat([p.detach().clone() for p in model.parameters()])
    opt.zero_grad()
    mse(model, batch(2)).backward()
    opt.step()
    delta = flat([p.detach() for p in model.parameters()]) - before
    expected = float((obj.fisher.double() * delta.double() ** 2).sum())
    assert opt.report["old"]["fisher_step"] == pytest.approx(expected, rel=1e-4)


def test_metrics_have_stable_keys_and_survive_a_skipped_step():
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.protect("old", protected_samples(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.zero_grad()
    scaler.scale(mse(model, batch(0))).backward()
    scaler.step(opt)
    scaler.update()
    metrics = opt.metrics
    assert set(metrics) == {f"gradsafe/old/{s}" for s in ("cosine", "conflict", "energy_in_subspace", "energy_removed",
                                                           "predicted_change", "predicted_change_unprotected", "grad_norm")}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())
    opt.zero_grad()
    scaler.scale(mse(model, batch(1))).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: inf found
    scaler.update()
    assert opt.gradsafe_steps == 1
    assert all(torch.equal(metrics[k], v) for k, v in opt.metrics.items())


def closure_setup(lr, refresh_every, auto_check_every=10):
    model = make_model()
    protected = batch(100, n=64)
    opt = ProtectedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), mode="observe", auto_check_every=auto_check_every
    )
    opt.protect("old", closure=lambda: mse(model, protected), refresh_every=refresh_every)
    return model, opt


def train(model, opt, steps):
    for i in range(steps):
        opt.zero_grad()
        mse(model, batch(i)).backward()
        opt.step()


def test_staleness_is_small_when_first_order_holds_and_large_when_not():
    model, opt = closure_setup(lr=1e-4, refresh_every=5)
    train(model, opt, 6)
    assert opt.objectives["old"].num_refreshes == 1
    small = opt.report["old"]["staleness"]
    assert 0.0 <= small < 0.05
    model, opt = closure_setup(lr=3.0, refresh_every=5)
    train(model, opt, 6)
    assert opt.report["old"]["staleness"] > 0.3


def test_auto_refresh_follows_staleness():
    model, opt = closure_setup(lr=1e-4, refresh_every="auto", auto_check_every=2)
    train(model, opt, 10)
    assert opt.objectives["old"].num_refreshes == 0  # the first-order picture holds: no refresh
    assert opt.objectives["old"].schedule.staleness is not None
    model, opt = closure_setup(lr=3.0, refresh_every="auto", auto_check_every=2)
    train(model, opt, 10)
    assert opt.objectives["old"].num_refreshes >= 2


def test_staleness_state_round_trips():
    model, opt = closure_setup(lr=0.05, refresh_every=3)
    train(model, opt, 4)
    state = opt.state_dict()
    fresh = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    fresh.load_state_dict(state)
    a, b = opt.objectives["old"], fresh.objectives["old"]
    a, b = a.schedule, b.schedule
    assert (a.loss_at_refresh, a.predicted_since_refresh, a.staleness, a.last_refresh_step) == (
        b.loss_at_refresh,
        b.predicted_since_refresh,
        b.staleness,
        b.last_refresh_step,
    )


def test_jsonl_sink_and_plot(tmp_path):
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), mode="observe")
    opt.protect("old", protected_samples(model))
    path = tmp_path / "run.jsonl"
    with JsonlSink(path, mode="w") as sink:
        opt.add_sink(sink, every=2)
        train(model, opt, 6)
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(math.isfinite(r["gradsafe/old/cosine"]) for r in rows)
    out = tmp_path / "fig.png"
    assert cli_main(["plot", str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a user error at the command line is exit code 2 and one line (tests/test_cli.py), not a traceback
    assert cli_main(["plot", str(path), "-o", str(out), "--stats", "nonsense"]) == 2


def test_read_jsonl_keeps_the_complete_rows_of_an_interrupted_run(tmp_path):
    path = tmp_path / "run.jsonl"
    with JsonlSink(path, mode="w") as sink:
        for step in (1, 2, 3):
            sink(step, {"gradsafe/old/cosine": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 4, "gradsafe/ol')  # the write an interruption cut short
    told: list[str] = []
    rows = read_jsonl(path, on_partial=told.append)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert len(told) == 1 and "line 4" in told[0]
    with pytest.warns(RuntimeWarning, match="incomplete"):
        assert len(read_jsonl(path)) == 3


def test_read_jsonl_refuses_what_is_not_a_jsonl_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        read_jsonl(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"line 2: not JSON"):
        read_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(bad)
    bad.write_text('{"step": 1}\n' + "x" * 100)
    with pytest.raises(ValueError, match="longer than 64 bytes"):
        read_jsonl(bad, max_line_bytes=64)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_jsonl("/dev/zero")


def test_tensorboard_sink_writes_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), mode="observe")
    opt.protect("old", protected_samples(model))
    writer = SummaryWriter(log_dir=str(tmp_path))
    opt.add_sink(TensorBoardSink(writer))
    train(model, opt, 3)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "gradsafe/old/cosine" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("gradsafe/old/cosine")] == [1, 2, 3]


def test_logging_sink_warns_once_on_conflict(caplog):
    model = make_model()
    opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), mode="observe")
    opt.protect("old", protected_samples(model))
    opt.add_sink(LoggingSink(cosine_below=-0.1))
    with caplog.at_level(logging.WARNING, logger="gradsafe"):
        for i in range(3):
            opt.zero_grad()
            (-mse(model, batch(100 + i))).backward()  # opposite of the protected gradient
            opt.step()
    warnings = [r for r in caplog.records if "conflicts" in r.getMessage()]
    assert len(warnings) == 1


def test_gradient_monitor_observes_without_changing_anything():
    model = make_model()
    samples = protected_samples(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(optimizer, {"old": samples})
    opt_ref = torch.optim.Adam(make_model().parameters(), lr=1e-3)
    del opt_ref
    mse(model, batch(3)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    report = monitor.measure()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    g = flat(grads).double()
    r = monitor.objectives["old"].mean_ref.double()
    assert report["old"]["cosine"] == pytest.approx(float(g @ r / (g.norm() * r.norm())), rel=1e-5)
    assert report["old"]["energy_removed"] == 0.0
    assert monitor.steps == 1
    with pytest.raises(ValueError, match="only observes"):
        monitor.protect("x", samples, mode="project")
    monitor_params = GradientMonitor(model, {"old": samples}, per_tensor=True)
    assert "cosine/0" in monitor_params.measure()["old"]


def test_jsonl_rows_are_valid_json_with_nan_as_null(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlSink(path, mode="w") as sink:
        sink(1, {"gradsafe/a/cosine": float("nan"), "gradsafe/a/grad_norm": 2.0})
    row = json.loads(path.read_text().strip())
    assert row == {"step": 1, "gradsafe/a/cosine": None, "gradsafe/a/grad_norm": 2.0}
