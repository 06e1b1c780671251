"""How fast this CPU moves the flat surgery's bytes, by torch ops and by gradsafe's compiled loops.

``gradsafe bench`` compares the flat torch backend with a bytes floor: the surgery's
``(2k + 1) * 4 + 12`` bytes per parameter at the bandwidth fused AdamW reaches in the same
run. This script asks whether any CPU code could reach that floor here. It times, in
interleaved rounds on the bench's problem (10M parameters in 50 tensors, k = 8 basis rows
per tensor, fp32):

- fused AdamW's step (28 B/param counted: four reads, three writes);
- a read of the basis alone (``torch.sum``, 32 B/param);
- the surgery's two passes as the torch backend runs them: ``torch.mv`` for the
  coefficients (36 B/param) and ``addmv_`` for the apply (40 B/param);
- the same two passes through gradsafe's compiled CPU loops (``kernels/cpu_surgery.cpp``,
  what ``TorchBackend(cpu_kernels=True)`` runs); skipped with the build's reason when no
  compiler is at hand (``--no-cpp`` skips them too).

Both kinds of pass run as the backend runs them: one call per tensor on one core, the
tensors shared between ``--threads`` Python threads (``torch.sum`` and AdamW use torch's own
threads).

It prints each case's median time and GB/s, and the two passes' time over the floor's (the
floor counts one more basis read, for the norms, than the two passes make). Run with
``python benchmarks/cpu_read_bandwidth.py``; it is not part of the tests.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from gradsafe.bench.common import measure

K = 8  # the bench's basis rows per tensor


def load_cpp():
    """gradsafe's compiled CPU loops, or None (with the reason printed) when they cannot be built."""
    from gradsafe.backends.cpu_kernels import load_cpu_kernels

    try:
        return load_cpu_kernels()
    except RuntimeError as exc:  # the torch rows still answer the question
        print(exc)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cpp", action="store_true", help="leave out the compiled loops")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.params // args.tensors
    numel = n * args.tensors
    cpp = None if args.no_cpp else load_cpp()

    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(K, n, generator=gen) for _ in range(args.tensors)]
    grads = [torch.randn(n, generator=gen) for _ in range(args.tensors)]
    coefs = torch.zeros(args.tensors, K)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(n, generator=gen)
    adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
    adamw.step()  # its state exists before timing

    pool = ThreadPoolExecutor(args.threads)
    shares = [range(t, args.tensors, args.threads) for t in range(args.threads)]

    def on_threads(work: Callable[[int], None]) -> None:  # each thread its share of the tensors
        list(pool.map(lambda share: [work(i) for i in share], shares))

    def mv_coefficients() -> None:
        on_threads(lambda i: torch.mv(bases[i], grads[i], out=coefs[i]))

    def addmv_apply() -> None:  # tiny coefficients: the gradients stay finite over the rounds
        on_threads(lambda i: grads[i].addmv_(bases[i].t(), coefs[i], alpha=-1e-12))

    def read_basis() -> None:
        for B in bases:
            B.sum()

    cases: dict[str, tuple[Callable[[], None], int]] = {
        "fused AdamW step": (adamw.step, 28),
        "basis read (torch.sum)": (read_basis, 4 * K),
        "coefficients (torch.mv)": (mv_coefficients, 4 * K + 4),
        "apply (addmv_)": (addmv_apply, 4 * K + 8),
    }
    if cpp is not None:
        coefs_cpp = torch.empty(args.tensors, K)
        for i in range(3):
            cpp.coefficients(bases[i], grads[i], coefs_cpp[i])
            scale = torch.mv(bases[i].abs(), grads[i].abs()).max()
            worst = float((coefs_cpp[i] - torch.mv(bases[i], grads[i])).abs().max() / scale)
            if worst > 1e-5:
                raise RuntimeError(f"the compiled coefficients differ from torch.mv by {worst:.2e} (relative)")
        small = torch.full((args.tensors, K), 1e-12)

        def cpp_coefficients() -> None:
            on_threads(lambda i: cpp.coefficients(bases[i], grads[i], coefs_cpp[i]))

        def cpp_apply() -> None:
            on_threads(lambda i: cpp.accumulate(bases[i].T, small[i], grads[i]))

        cases["coefficients (compiled)"] = (cpp_coefficients, 4 * K + 4)
        cases["apply (compiled)"] = (cpp_apply, 4 * K + 8)

    times = measure({name: (lambda r, run=run: run()) for name, (run, _) in cases.items()}, args.rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{numel:,} parameters in {args.tensors} tensors, k={K}, fp32, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"{'case':28s} {'B/param':>8s} {'median ms':>10s} {'GB/s':>7s}")
    for name, (_, nbytes) in cases.items():
        print(f"{name:28s} {nbytes:8d} {med[name] * 1e3:10.2f} {nbytes * numel / med[name] / 1e9:7.1f}")
    floor_bytes = (2 * K + 1) * 4 + 12
    floor = floor_bytes * numel / (28 * numel / med["fused AdamW step"])
    print(f"floor: {floor_bytes} B/param at fused AdamW's bandwidth = {floor * 1e3:.2f} ms")
    for label, pair in (("torch ops", ("coefficients (torch.mv)", "apply (addmv_)")),
                        ("the compiled loops", ("coefficients (compiled)", "apply (compiled)"))):
        if all(p in med for p in pair):
            both = med[pair[0]] + med[pair[1]]
            print(f"the two passes by {label}: {both * 1e3:.2f} ms = {both / floor:.2f}x the floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
