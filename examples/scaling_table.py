"""Measure gradsafe's memory on small GPT-2 models and extrapolate to 1B / 7B / 70B.

    python examples/scaling_table.py            # prints the markdown tables of docs/scaling.md

Measured: the real bytes of every objective's tensors (``memory_table.objective_bytes``),
the formula ``(k + 1 + m) * 4N + 4N``, AdamW's state after one step, and the number of
coefficients the step moves to the host, for tiny random GPT-2 models (nothing downloaded).
Extrapolated: the same formulas at the sizes and ranks that matter for LLMs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_table as mt  # noqa: E402

from gradsafe import ProtectedOptimizer  # noqa: E402

GIB = 1024**3

RANKS = [1, 4, 16, 64]


def tiny_gpt2(n_embd: int, n_layer: int = 2) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=258, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(cfg)


def measure(n_embd: int, k: int, scope: str, references: str = "mean") -> dict:
    """One objective of rank k over every parameter; k + 2 random gradient samples."""
    model = tiny_gpt2(n_embd)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    samples = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(k + 2)]
    opt = ProtectedOptimizer(torch.optim.AdamW(params), backend="torch")
    opt.protect("safety", samples, rank=k, scope=scope, references=references)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    (o,) = mt.objective_bytes(opt)
    return dict(
        N=o.entries, T=o.tensors, k=o.basis_rows, m=o.sample_rows,
        measured=o.basis + o.references + o.fisher, energies=o.other,
        formula=mt.formula_bytes(o.entries, o.basis_rows, o.sample_rows),
        adamw=mt.optimizer_state_bytes(opt.base_optimizer),
        params=mt.tensor_bytes(params),
        coefs=mt.coefficient_floats(opt), plan_coefs=opt._plan.coef_numel,
    )


def measured_table() -> str:
    rows = [
        "| model (n_embd) | N | T | scope | k | m | measured rows + Fisher | formula | energies | / AdamW state | / fp32 params | coefficients (formula / plan) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n_embd in (64, 128, 256):
        for scope in ("global", "tensor"):
            for k in (1, 4, 16):
                r = measure(n_embd, k, scope)
                assert r["measured"] == r["formula"], r
                assert r["coefs"] == r["plan_coefs"], r
                rows.append(
                    f"| GPT-2 2L ({n_embd}) | {r['N']:,} | {r['T']} | {scope} | {r['k']} | {r['m']} | "
                    f"{r['measured']:,} B | {r['formula']:,} B | {r['energies']} B | "
                    f"{r['measured'] / r['adamw']:.2f}x | {r['measured'] / r['params']:.2f}x | {r['coefs']} / {r['plan_coefs']} |"
                )
    r = measure(128, 4, "global", references="samples")
    assert r["measured"] == r["formula"], r
    rows.append(
        f"| GPT-2 2L (128) | {r['N']:,} | {r['T']} | global, references=\"samples\" | {r['k']} | {r['m']} | "
        f"{r['measured']:,} B | {r['formula']:,} B | {r['energies']} B | "
        f"{r['measured'] / r['adamw']:.2f}x | {r['measured'] / r['params']:.2f}x | {r['coefs']} / {r['plan_coefs']} |"
    )
    return "\n".join(rows)


def extrapolated_table() -> str:
    rows = [
        "| model | params | k | objective memory (mean ref) | with references=\"samples\" (m = k) | / AdamW fp32 state (8 B/param) | / bf16 params (2 B/param) | coefficients per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, n, t in llms():
        for k in RANKS:
            b = mt.formula_bytes(n, k)
            bs = mt.formula_bytes(n, k, k)
            coefs = t * (k + 1) + t
            rows.append(
                f"| {name} | {n / 1e9:.2f} B, T={t} | {k} | {b / GIB:,.1f} GiB | {bs / GIB:,.1f} GiB | {b / (8 * n):.1f}x | {b / (2 * n):.1f}x | "
                f"{coefs:,} floats ({coefs * 4 / 1024:.1f} KiB) |"
            )
    return "\n".join(rows)


# Llama-style shapes (hidden d, MLP width f, layers L, key/value width kv, vocabulary V, tied head)
SHAPES = {
    "1B": dict(d=2048, f=8192, L=16, kv=512, V=128256, tied=True),
    "7B": dict(d=4096, f=11008, L=32, kv=4096, V=32000, tied=False),
    "70B": dict(d=8192, f=28672, L=80, kv=1024, V=32000, tied=False),
}


def matrices(d: int, f: int, L: int, kv: int, V: int, tied: bool) -> list[tuple[int, int]]:
    layer = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    return layer * L + [(V, d)] * (1 if tied else 2)


def llms() -> list[tuple[str, int, int]]:
    """(name, parameters, tensors the optimizer sees): 9 tensors per layer (q, k, v, o, gate,
    up, down, 2 norms), embeddings, final norm, and an untied head."""
    out = []
    for name, sh in SHAPES.items():
        n = sum(a * b for a, b in matrices(**sh)) + (2 * sh["L"] + 1) * sh["d"]
        t = 9 * sh["L"] + 2 + (0 if sh["tied"] else 1)
        out.append((name, n, t))
    return out


def factored_table() -> str:
    """The planned factored scope: r (m + n) floats per matrix instead of k m n."""
    rows = [
        "| model | matrix entries | r | factored bases r(m+n) | / AdamW fp32 state | flat bases at k = r | + one N-vector (Fisher or mean ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, shape in SHAPES.items():
        mats = matrices(**shape)
        n = sum(a * b for a, b in mats)
        side = sum(a + b for a, b in mats)
        for r in (4, 16, 64):
            fb = 4 * r * side
            rows.append(
                f"| {name} | {n / 1e9:.2f} B | {r} | {fb / GIB:.2f} GiB | {fb / (8 * n):.4f}x | "
                f"{4 * r * n / GIB:,.0f} GiB | +{4 * n / GIB:.1f} GiB |"
            )
    return "\n".join(rows)


def main() -> None:
    torch.set_num_threads(1)
    print("## Measured (tiny random GPT-2, CPU, fp32)\n")
    print(measured_table())
    print("\n## Extrapolated with the formula\n")
    print(extrapolated_table())
    print("\n## The planned factored scope, by formula\n")
    print(factored_table())


if __name__ == "__main__":
    main()
