"""examples/finetune_causal_lm.py runs with its defaults (plain python and torchrun, 2 CPU
processes) and prints what it promises; examples/memory_table.py measures what the formula says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune_causal_lm.py"
sys.path.insert(0, str(ROOT / "examples"))

import memory_table as mt  # noqa: E402

import gradsafe  # noqa: E402
from gradsafe import ProtectedOptimizer  # noqa: E402


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _check_output(out: str, report: dict, world: int) -> None:
    assert "gradsafe memory table" in out
    assert "monitor report (last step):" in out
    # the objective row: measured total equals the formula column, ratios printed
    row = next(line for line in out.splitlines() if line.startswith("safety "))
    assert row.count("MiB") + row.count("KiB") >= 5
    assert "optimizer state" in out and "(AdamW)" in out
    assert "transformer.h.0.attn.c_attn.weight" in out  # per-tensor rows
    assert "coefficients per step:" in out
    steps = re.findall(r"^step +(\d+) +loss ([0-9.]+)", out, flags=re.M)
    assert [int(s) for s, _ in steps] == list(range(1, 9))
    assert set(report["report"]) == {"safety"}
    assert 0.0 <= report["report"]["safety"]["energy_removed"] <= 1.0 + 1e-6
    assert report["report"]["safety"]["energy_removed"] > 0  # the surgery acted
    assert report["world_size"] == world
    assert report["replicas_identical"] is True
    # the task was learned while the safety loss stayed put (defaults: tensor scope, space update)
    assert report["after"]["task"] < report["before"]["task"] - 0.5
    assert report["after"]["safety"] < report["before"]["safety"] + 0.1


def test_example_plain_python(tmp_path):
    out_json = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--report-json", str(out_json)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(proc.stdout, json.loads(out_json.read_text()), world=1)
    assert "world size 1" in proc.stdout


def _torchrun(tmp_path, *args: str) -> tuple[str, dict]:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out_json = tmp_path / "report.json"
    # a generous limit: on a fresh install the first import of transformers compiles its bytecode
    proc = subprocess.run(
        cmd + ["--standalone", "--nproc_per_node=2", str(EXAMPLE), "--report-json", str(out_json), *args],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out_json.read_text())


def test_example_torchrun_ddp(tmp_path):
    # both ranks must also exit: before the barrier in shutdown(), one rank could hang in the
    # gloo group's destructor at interpreter exit (the subprocess limit catches that)
    out, report = _torchrun(tmp_path)
    assert "world size 2" in out
    assert "replicas bit-identical after 8 steps: True" in out
    assert out.count("gradsafe memory table") == 1  # printed by rank 0 only
    assert "gradsafe all-reduces per step: 0 (DDP: the surgery needs none)" in out
    _check_output(out, report, world=2)


def test_example_torchrun_fsdp_factored(tmp_path):
    out, report = _torchrun(tmp_path, "--fsdp", "--scope", "factored", "--no-per-tensor")
    assert "world size 2" in out
    assert report["all_reduces_per_step"] == 1  # the coefficients, with the factored P h riding on it
    assert "factored" in out
    assert report["after"]["safety"] < report["before"]["safety"] + 0.05
    # this rank's share of the memory: about half of the single-process 225,920 bytes
    assert report["memory_bytes"] < 0.75 * 225_920


def test_example_factored_activation_bases(tmp_path):
    out_json = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--scope", "factored", "--activation-bases", "--no-per-tensor",
         "--report-json", str(out_json)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert "gradsafe memory_report" in proc.stdout and "factored" in proc.stdout
    assert "transformer.h.0.attn.c_attn.weight" in proc.stdout
    params = 124800 * 4  # the tiny GPT-2's fp32 bytes
    # factored memory is a small fraction of the parameters (tensor scope at rank 8 is 10x them)
    assert report["memory_bytes"] < 0.25 * params
    assert report["after"]["safety"] < report["before"]["safety"] + 0.05
    assert report["report"]["safety"]["energy_removed"] > 0


# ---------------------------------------------------------------------------- memory_table
def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def _samples(model: torch.nn.Module, n: int):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    return gradsafe.collect_gradients(model, lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batches)


@pytest.mark.parametrize("width", [16, 300])
@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="project", scope="global", rank=4),
        dict(mode="project", scope="tensor", rank=4),
        dict(mode="conflict", scope="global", rank=3, references="samples"),
        dict(mode="conflict", scope="tensor", rank=2),
    ],
)
def test_measured_bytes_match_formula(width, kw):
    model = _model(width)
    params = list(model.parameters())
    opt = ProtectedOptimizer(torch.optim.AdamW(params), backend="torch")
    opt.protect("a", _samples(model, 6), **kw)
    # a second objective covering only the first layer
    part = [[g if i < 2 else None for i, g in enumerate(s)] for s in _samples(model, 3)]
    opt.protect("b", part, mode="project", rank=2)
    x = torch.randn(4, 10)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()

    objs = {o.name: o for o in mt.objective_bytes(opt)}
    n_all = sum(p.numel() for p in params)
    a, b = objs["a"], objs["b"]
    assert a.entries == n_all and b.entries == params[0].numel() + params[1].numel()
    assert a.basis_rows == (kw["rank"] if kw["mode"] == "project" else a.basis_rows)
    assert a.sample_rows == (kw["rank"] if kw.get("references") == "samples" else 0)
    for o in (a, b):
        # the measured storage (rows + Fisher) is exactly the formula; energies are the rest
        assert o.basis + o.references + o.fisher == mt.formula_bytes(o.entries, o.basis_rows, o.sample_rows)
        # "other": the basis energies (none for a conflict objective, which keeps no basis)
        assert (0 < o.other if o.basis_rows else o.other == 0) and o.other <= 4 * o.tensors * o.basis_rows
    # per tensor: the same bytes, split by parameter
    per = mt.per_tensor_bytes(opt)
    assert sum(per.values()) == sum(o.basis + o.references + o.fisher for o in objs.values())
    assert per[0] > per[2]  # parameter 0 is covered by both objectives, parameter 2 by one
    # AdamW: exp_avg + exp_avg_sq (fp32) and a scalar step per parameter
    assert mt.optimizer_state_bytes(opt.base_optimizer) == 8 * n_all + 4 * len(params)
    # the coefficient count is the plan's (read from the private plan: a test-only check)
    assert mt.coefficient_floats(opt) == opt._plan.coef_numel
    table = mt.memory_table(opt, [n for n, _ in model.named_parameters()])
    assert "0.weight" in table and "optimizer state" in table and "gradsafe / parameters" in table


def test_human():
    assert mt.human(512) == "512 B"
    assert mt.human(3 * 1024**2) == "3.00 MiB"
    assert mt.human(1.5 * 1024**4) == "1.50 TiB"


def test_scaling_table_measures_the_formula():
    import scaling_table as st

    r = st.measure(64, 2, "tensor")
    assert r["measured"] == r["formula"] == (2 + 1 + 1) * 4 * r["N"]
    assert r["coefs"] == r["plan_coefs"] == r["T"] * (2 + 1) + r["T"]
    assert r["adamw"] == 8 * r["N"] + 4 * r["T"]
    # the Llama-style layouts give the published sizes
    sizes = {name: n for name, n, _ in st.llms()}
    assert abs(sizes["1B"] - 1.236e9) / 1.236e9 < 0.01
    assert abs(sizes["7B"] - 6.738e9) / 6.738e9 < 0.01
    assert abs(sizes["70B"] - 68.98e9) / 68.98e9 < 0.01
    table = st.extrapolated_table()
    assert table.count("\n") == 2 + 3 * len(st.RANKS) - 1
