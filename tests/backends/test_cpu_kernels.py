"""The compiled CPU loops (kernels/cpu_surgery.cpp) against float64 references, and the torch
backend with them against the torch backend without them.

The loops are built once per session (about a minute, then cached by torch); where no C++
compiler is at hand the module is skipped, with the build's reason.
"""

from __future__ import annotations

import pytest
import torch

from _reference import all_params, flatten, step_capture
from gradsafe import ProtectedOptimizer
from gradsafe.backends import cpu_kernels as ck
from gradsafe.backends.torch_backend import TorchBackend

from test_torch_backend import BIG, make_opt, mixture, rand_grads, rel_err, undamped_mixture


@pytest.fixture(scope="module")
def kernels():
    reason = ck.cpu_kernels_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return ck.load_cpu_kernels()


@pytest.fixture
def calls(kernels, monkeypatch):
    """Count the loops' calls (by name) for the test's duration: a step said to run through
    them must really have."""
    seen = {"coefficients": 0, "accumulate": 0}

    def counted(name):
        real = getattr(kernels, name)

        def call(*args):
            seen[name] += 1
            return real(*args)

        return staticmethod(call)

    monkeypatch.setattr(ck, "_module", type("Counted", (), {n: counted(n) for n in seen})())
    return seen


ROWS = [0, 1, 2, 3, 5, 8, 9, 16, 19]
# across the lane widths (8 to 32), a block (16384 columns) and its tail
COLUMNS = [1, 7, 33, 1000, 16384 + 5, 40001]


def strided_rows(r: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(r, n) rows that are columns 3..n+3 of wider rows: a chunk's view, not contiguous."""
    return torch.randn(r, n + 11, generator=gen)[:, 3 : n + 3]


@pytest.mark.parametrize("r", ROWS)
@pytest.mark.parametrize("n", COLUMNS)
def test_coefficients_and_norm_match_float64(kernels, r, n):
    gen = torch.Generator().manual_seed(r * 1000 + n)
    rows, h = strided_rows(r, n, gen), torch.randn(n, generator=gen)
    out, norm = torch.full((r,), float("nan")), torch.full((1,), float("nan"))
    kernels.coefficients(rows, h, out, norm)
    expected = rows.double() @ h.double()
    scale = rows.double().norm(dim=1) * h.double().norm()  # what float32 rounding is relative to
    assert bool(((out.double() - expected).abs() <= 1e-6 * scale + 1e-30).all())
    assert float(norm) == pytest.approx(float(h.double() @ h.double()), rel=1e-6)
    again = torch.empty(r)
    kernels.coefficients(rows, h, again)  # without the norm: the same coefficients
    assert torch.equal(again, out)


@pytest.mark.parametrize("r", ROWS)
@pytest.mark.parametrize("n", COLUMNS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_accumulate_matches_float64(kernels, r, n, overwrite):
    gen = torch.Generator().manual_seed(r * 1000 + n + overwrite)
    rows, w = strided_rows(r, n, gen), torch.randn(r, generator=gen)
    h = torch.randn(n, generator=gen)
    expected = rows.double().T @ w.double() + (0.0 if overwrite else h.double())
    out = h.clone()
    kernels.accumulate(rows.T, w, out, overwrite)
    scale = (rows.double().abs().T @ w.double().abs()) + (0.0 if overwrite else h.double().abs())
    assert bool(((out.double() - expected).abs() <= 2e-6 * scale + 1e-30).all())


def test_bad_arguments_are_refused_with_what_is_wrong(kernels):
    rows, h, out = torch.randn(3, 10), torch.randn(10), torch.empty(3)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.coefficients(rows.double(), h, out)
    with pytest.raises(RuntimeError, match="unit column stride"):
        kernels.coefficients(torch.randn(3, 20)[:, ::2], h, out)
    with pytest.raises(RuntimeError, match="h must be contiguous with 10 entries"):
        kernels.coefficients(rows, torch.randn(11), out)
    with pytest.raises(RuntimeError, match="out must be contiguous with 3 entries"):
        kernels.coefficients(rows, h, torch.empty(4))
    with pytest.raises(RuntimeError, match="w must be contiguous with 3 entries"):
        kernels.accumulate(rows.T, torch.empty(2), h)
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        kernels.accumulate(rows.T, torch.empty(3), torch.randn(20)[::2])


# ---------------------------------------------------------------------------- in the backend
def steps_with_and_without(seed, threads, dtype=torch.float32):
    """The same step by the torch backend with and without the loops: results and records."""
    out = {}
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(seed)
        backend = TorchBackend(threads=threads, cpu_kernels=compiled)
        opt = make_opt(BIG, dtype=dtype, gen=gen, backend=backend)
        grads = rand_grads(opt, gen)
        mixture(opt, gen, grads)
        originals = [g.clone() for g in grads]
        out[compiled] = (step_capture(opt, grads), opt.report, originals, all_params(opt))
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_backend_with_the_loops_takes_the_torch_ops_step(calls, small_parts, seed, threads):
    out = steps_with_and_without(seed, threads)
    assert calls["coefficients"] and calls["accumulate"]
    (plain, plain_report, originals, params), (fused, fused_report, *_) = out[False], out[True]
    moved = float((flatten(plain, params) - flatten(originals, params)).norm() / flatten(originals, params).norm())
    assert moved > 0.05  # the surgery is not vacuous
    assert rel_err(fused, plain, originals, params) <= 1e-6
    for name, rep in plain_report.items():
        for key, value in rep.items():
            atol = 1e-3 if key.startswith("predicted_change") else 1e-6
            assert fused_report[name][key] == pytest.approx(value, rel=1e-5, abs=atol), (name, key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_other_dtypes_through_the_loops(kernels, small_parts, dtype, threads):
    out = steps_with_and_without(2, threads, dtype)
    (plain, _, originals, params), (fused, *_) = out[False], out[True]
    assert all(f.dtype == dtype for f in fused)
    assert rel_err(fused, plain, originals, params) <= (1e-6 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("threads", [1, 2])
def test_subtract_from_through_the_loops(kernels, small_parts, threads):
    gen = torch.Generator().manual_seed(5)
    plain, fused = TorchBackend(threads=threads, cpu_kernels=False), TorchBackend(threads=threads, cpu_kernels=True)
    opt = make_opt(BIG, gen=gen, backend=plain)
    u = rand_grads(opt, gen)
    undamped_mixture(opt, gen, u)
    plan = opt._current_plan(all_params(opt))
    targets = [torch.randn(t.shape, generator=gen) for t in u]
    a, b = [t.clone() for t in targets], [t.clone() for t in targets]
    ra = plain.run(plan, u, subtract_from=a)
    rb = fused.run(plan, u, subtract_from=b)
    assert torch.as_tensor(ra.weights).any()
    params = all_params(opt)
    assert rel_err(b, a, u, params) <= 1e-6
    assert torch.allclose(torch.as_tensor(rb.coefs), torch.as_tensor(ra.coefs), rtol=1e-5, atol=1e-4)


def test_a_live_reference_lent_to_the_loops(calls):
    """A conflict closure refreshed every step (its rows are the closure's gradients): both
    backends take the same steps over several refreshes."""
    params_of, runs = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        x, y, xa, ya = torch.randn(32, 12), torch.randint(0, 3, (32,)), torch.randn(32, 12), torch.randint(0, 3, (32,))
        opt = ProtectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                 backend=TorchBackend(threads=1, cpu_kernels=compiled))
        opt.protect("align", closure=lambda: torch.nn.functional.cross_entropy(model(xa), 2 - ya),
                    mode="conflict", refresh_every=1)
        active = 0
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            active += opt.report["align"]["conflict"] > 0
        runs[compiled] = active
        if compiled:  # six steps, each through the loops
            assert calls["coefficients"] >= 6 * 4 and calls["accumulate"] > 0
        params_of[compiled] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert runs[False] > 0  # the constraint acted
    assert runs[True] == runs[False]
    assert torch.allclose(params_of[True], params_of[False], rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_is_seen_through_the_loops(kernels):
    gen = torch.Generator().manual_seed(7)
    backend = TorchBackend(threads=1, cpu_kernels=True)
    opt = make_opt(BIG, gen=gen, backend=backend)
    grads = rand_grads(opt, gen)
    mixture(opt, gen, grads)
    grads[1][3] = float("inf")
    record = backend.run(opt._current_plan(all_params(opt)), grads)
    assert not record.finite and record.weights is None  # refused before the rule: nothing spread
    assert int((~grads[1].isfinite()).sum()) == 1


def test_the_bench_times_the_backend_with_the_loops(kernels, capsys):
    from gradsafe.bench.flat import CPU_KERNELS
    from gradsafe.cli import main

    assert main(["bench", "--numel", "4000", "--tensors", "4", "--rank", "2", "--rounds", "2", "--device", "cpu",
                 "--cpu-kernels"]) == 0
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith(CPU_KERNELS))
    assert row.split()[-4] == "32"  # its bytes floor, the torch backend's
    assert f"{CPU_KERNELS}: " in captured.out and "building the CPU kernels" in captured.err


def test_a_failed_build_at_the_bench_is_one_line(monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(ck, "_module", None)
    monkeypatch.setattr(ck, "_error", None)
    monkeypatch.setattr(cpp, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("ninja: not found")))
    from gradsafe.cli import main

    assert main(["bench", "--numel", "4000", "--tensors", "4", "--rank", "2", "--rounds", "1", "--device", "cpu",
                 "--cpu-kernels"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("gradsafe bench: gradsafe's CPU kernels (kernels/cpu_surgery.cpp) could not be built: "
                              "OSError: ninja: not found")


# ---------------------------------------------------------------------------- switching them on
def test_the_environment_switches_them_on(kernels, monkeypatch):
    monkeypatch.setenv(ck.ENV_VAR, "1")
    assert TorchBackend().cpu_kernels
    assert not TorchBackend(cpu_kernels=False).cpu_kernels
    monkeypatch.setenv(ck.ENV_VAR, "0")
    assert not TorchBackend().cpu_kernels


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_an_optimizer_with_the_loops_copies(calls, how):
    """The backend keeps a flag, not the compiled module: a wrapper with it deep-copies and
    pickles, and the copy steps through the loops too."""
    import copy
    import pickle

    gen = torch.Generator().manual_seed(9)
    opt = make_opt(BIG, gen=gen, backend=TorchBackend(threads=1, cpu_kernels=True))
    grads = rand_grads(opt, gen)
    mixture(opt, gen, grads)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin._backend.cpu_kernels
    for p, g in zip(all_params(twin), grads):
        p.grad = g.clone()
    twin.step()
    assert calls["coefficients"] and calls["accumulate"]


def test_a_slow_load_says_a_build_is_under_way(monkeypatch, capsys):
    import time

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(ck, "_module", None)
    monkeypatch.setattr(ck, "_error", None)
    monkeypatch.setattr(ck, "BUILD_NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(cpp, "load", lambda *a, **k: (time.sleep(0.5), "built")[1])
    assert ck.load_cpu_kernels() == "built"
    assert capsys.readouterr().err == (
        "gradsafe: building the CPU kernels (kernels/cpu_surgery.cpp); once per kind of CPU, about a minute\n")
    monkeypatch.setattr(ck, "_module", None)
    monkeypatch.setattr(cpp, "load", lambda *a, **k: "cached")
    assert ck.load_cpu_kernels() == "cached"
    time.sleep(0.2)  # past the notice's delay: a fast load says nothing
    assert capsys.readouterr().err == ""


def test_the_build_is_named_for_this_kind_of_cpu(kernels):
    """-march=native code is cached under a name that carries the CPU's model and flags."""
    tag = ck._cpu_tag()
    assert len(tag) == 12 and tag == ck._cpu_tag()
    assert kernels.__name__ == f"gradsafe_cpu_surgery_{tag}"


def test_bad_switches_are_refused(monkeypatch):
    monkeypatch.setenv(ck.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="GRADSAFE_CPU_KERNELS='yes'"):
        TorchBackend()
    monkeypatch.delenv(ck.ENV_VAR)
    with pytest.raises(TypeError, match="cpu_kernels"):
        TorchBackend(cpu_kernels="yes")


def test_a_failed_build_says_why_and_is_not_retried(monkeypatch):
    import torch.utils.cpp_extension as cpp

    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(1)
        raise OSError("c++: command not found")

    monkeypatch.setattr(ck, "_module", None)
    monkeypatch.setattr(ck, "_error", None)
    monkeypatch.setattr(cpp, "load", no_compiler)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"could not be built: OSError: c\+\+: command not found .*ninja"):
            TorchBackend(cpu_kernels=True)
    assert len(calls) == 1
    assert "command not found" in ck.cpu_kernels_unavailable_reason()
