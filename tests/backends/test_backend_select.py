"""Backend selection: ``get_backend``, ``GRADSAFE_BACKEND``, auto, and the errors.

Whatever runs in this process uses the Triton interpreter (set before ``gradsafe.kernels``
is first imported, as in tests/backends/test_triton_backend.py); the cases that need another
environment (no triton, no TRITON_INTERPRET) run in a subprocess.
"""

from __future__ import annotations

import os

if os.environ.get("GRADSAFE_TRITON_NATIVE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradsafe import ProtectedOptimizer  # noqa: E402
from gradsafe.backends import AutoBackend, TorchBackend, get_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run_py(code: str, env_drop=(), env_set=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_set or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def small_opt(backend):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(6, generator=gen)), nn.Parameter(torch.randn(3, 2, generator=gen))]
    opt = ProtectedOptimizer(torch.optim.SGD(params, lr=1.0), backend=backend)
    opt.protect("a", [[torch.randn(6, generator=gen), torch.randn(3, 2, generator=gen)] for _ in range(2)])
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return opt


def test_names(monkeypatch):
    monkeypatch.delenv("GRADSAFE_BACKEND", raising=False)
    assert isinstance(get_backend("torch"), TorchBackend)
    assert isinstance(get_backend("auto"), AutoBackend)
    assert isinstance(get_backend(None), AutoBackend)
    from gradsafe.backends.triton_backend import TritonBackend

    assert isinstance(get_backend("triton"), TritonBackend)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        get_backend("cuda")
    with pytest.raises(TypeError, match="backend must be"):
        get_backend(3)


def test_a_backend_object_is_used_as_is():
    from gradsafe.backends.triton_backend import TritonBackend

    be = TritonBackend(basis_dtype=torch.bfloat16)
    assert get_backend(be) is be
    opt = small_opt(be)
    opt.step()
    assert opt._backend is be


@pytest.mark.parametrize("value,cls", [("torch", "TorchBackend"), ("triton", "TritonBackend"), ("auto", "AutoBackend")])
def test_environment_variable_overrides_auto(monkeypatch, value, cls):
    monkeypatch.setenv("GRADSAFE_BACKEND", value)
    assert type(get_backend(None)).__name__ == cls
    assert isinstance(get_backend("torch"), TorchBackend)  # an explicit name wins


def test_environment_variable_invalid(monkeypatch):
    monkeypatch.setenv("GRADSAFE_BACKEND", "fast")
    with pytest.raises(ValueError, match="GRADSAFE_BACKEND='fast'"):
        get_backend(None)


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("GRADSAFE_BACKEND", raising=False)
    opt = small_opt(None)
    assert isinstance(opt._backend, AutoBackend)
    opt.step()
    assert opt._backend.last == "torch"
    assert opt.report["a"]["energy_removed"] > 0


def test_import_gradsafe_does_not_import_triton_and_works_without_it():
    r = run_py(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import gradsafe
        from gradsafe import ProtectedOptimizer
        assert "gradsafe.kernels" not in sys.modules
        p = torch.nn.Parameter(torch.randn(5))
        opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0))
        opt.protect("a", [[torch.randn(5)]])
        p.grad = torch.randn(5)
        opt.step()
        print("backend", opt._backend.last)
        """,
        env_drop=("GRADSAFE_BACKEND",),
    )
    assert r.returncode == 0, r.stderr
    assert "backend torch" in r.stdout


def test_triton_without_triton_is_a_clear_error():
    r = run_py(
        """
        import sys
        sys.modules["triton"] = None
        from gradsafe.backends import get_backend
        try:
            get_backend("triton")
        except RuntimeError as e:
            print("ERR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "ERR backend='triton' is not available: triton cannot be imported" in r.stdout
    assert "backend='torch'" in r.stdout


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    r = run_py(
        """
        import torch
        from gradsafe import ProtectedOptimizer
        p = torch.nn.Parameter(torch.randn(5))
        opt = ProtectedOptimizer(torch.optim.SGD([p], lr=1.0), backend="triton")
        opt.protect("a", [[torch.randn(5)]])
        p.grad = torch.randn(5)
        try:
            opt.step()
        except RuntimeError as e:
            print("ERR", e)
        """,
        env_drop=("TRITON_INTERPRET", "GRADSAFE_BACKEND"),
    )
    assert r.returncode == 0, r.stderr
    assert "ERR backend='triton' with CPU tensors runs only under the Triton interpreter" in r.stdout
    assert "TRITON_INTERPRET=1" in r.stdout


def test_triton_on_cpu_under_the_interpreter_runs_and_matches_torch():
    a, b = small_opt("triton"), small_opt("torch")
    a.step()
    b.step()
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-5, atol=1e-6)
    assert a.report["a"] == pytest.approx(b.report["a"], rel=1e-4, abs=1e-6)
