"""``gradsafe bench``: the surgery's cost, measured in one run with interleaved rounds.

- ``flat``: the global and tensor scopes (naive loop, torch / Triton backends, AdamW step,
  bytes floor), and the GPU ``--sweep``;
- ``factored``: ``--scope factored``, the two-sided projection of the factored scope;
- ``common``: what both share (interleaved timing, device choice, printing);
- ``live``: ``--live``, live conflict references against the hand-written A-GEM and GEM loops.

This module holds the command line: ``add_arguments`` and ``run`` (used by ``gradsafe
bench``) and ``main`` (``python -m gradsafe.bench``).
"""

from __future__ import annotations

import argparse
import os

from .._optional import UserError, run_command
from ..backends import BACKENDS
from .common import pick_device
from .factored import run_factored
from .flat import run_flat
from .live import PROBLEMS, run_live

__all__ = ["add_arguments", "run", "main"]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (else argparse's one-line usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _ints(text: str) -> tuple[int, ...]:
    """An argparse type: a comma-separated list of integers >= 1 (``1,4,16``)."""
    try:
        values = tuple(positive_int(x) for x in text.split(",") if x.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return values


def _problems(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated list of ``--live`` problems (``mlp512,gpt2``)."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in PROBLEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated problems of {','.join(PROBLEMS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradsafe bench``."""
    parser.add_argument("--numel", type=positive_int, default=None, help="parameters in all (default 10M on CPU, 32M on GPU)")
    parser.add_argument("--tensors", type=positive_int, default=50, help="number of parameter tensors (default 50)")
    parser.add_argument("--rank", type=positive_int, default=None,
                        help="basis rank k (default 8; --scope factored: 16 on CPU, 64 on GPU, 8 with --quick)")
    parser.add_argument("--scope", choices=("global", "tensor", "factored"), default="global",
                        help="global, tensor, or factored (the factored projection; --tensors / --numel are ignored)")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="--scope factored: weight matrices (default 8 on CPU, 16 on GPU, 4 with --quick)")
    parser.add_argument("--shape", type=positive_int, nargs=2, metavar=("M", "N"), default=None,
                        help="--scope factored: each matrix's shape (default 1024 1024 on CPU, 4096 4096 on GPU, "
                             "256 256 with --quick)")
    parser.add_argument("--sides", choices=("both", "left", "right"), default="both",
                        help="--scope factored: which bases the objective has (default both)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed rounds per variant (default 15; sweep 10)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="gradsafe backend to time (default torch)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="1M parameters, 5 rounds (sweep: a reduced grid)")
    parser.add_argument("--sweep", action="store_true", help="the GPU sweep table (k, basis dtype, scope, tensors)")
    parser.add_argument("--ks", type=_ints, default=(1, 4, 16, 64), help="sweep: ranks (default 1,4,16,64)")
    parser.add_argument("--tensor-counts", type=_ints, default=(1, 200, 500), help="sweep: tensor counts")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--cpu-kernels", action="store_true",
                        help="CPU: also time the torch backend with its compiled CPU loops (built first: a C++ compiler and ninja)")
    parser.add_argument("--live", action="store_true",
                        help="a live conflict closure (refresh_every=1) against the hand-written A-GEM and GEM "
                             "loops; --rounds: repeats (default 5, 2 with --quick)")
    parser.add_argument("--problems", type=_problems, default=None,
                        help=f"--live: comma-separated problems of {','.join(PROBLEMS)} (default all)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="--live: steps per timed repeat (default 20, 2 with --quick)")


def run(args: argparse.Namespace) -> int:
    """``gradsafe bench``: the live table for ``--live``, the factored one for ``--scope factored``, else the
    flat ones; returns the exit code.

    The device, the option combination and ``--out`` are checked first: a ``UserError`` (one
    line, exit code 2) before anything is timed.
    """
    pick_device(args.device)
    if args.scope != "factored" and not args.sweep and args.numel is not None and args.numel < args.tensors:
        raise UserError(f"--numel {args.numel} is smaller than --tensors {args.tensors}: each tensor needs a parameter")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a folder; give a file name")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"--out {args.out}: the folder {folder} does not exist or is not writable")
    if args.live:
        if args.sweep or args.scope == "factored":
            raise UserError("--live is a table of its own; give it without --sweep and --scope factored")
        return run_live(args)
    if args.scope == "factored":
        return run_factored(args)
    return run_flat(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m gradsafe.bench [options]``: the same as ``gradsafe bench [options]``."""
    parser = argparse.ArgumentParser(prog="gradsafe bench", description=__doc__)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "bench")
