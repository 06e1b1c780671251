"""``gradsafe demo``: the study of forgetting and safety erosion as one mechanism, by the protocol
of docs/study.md.

Two scenario plug-ins (``continual``: digits, 10 permuted tasks and class-incremental split
digits; ``safety``: a tiny transformer, a label-flip toy with identity-shift and benign-only
conditions), 17 methods (``methods.METHODS``: plain, replay, LwF, KL, EWC, online EWC,
L2-SP, Fisher damping, OGD, GPM, SGP, A-GEM, GEM, SafeGrad, two combinations, joint).

- default: the report stage on the report seeds for the default subset of methods
  (``methods.DEFAULT_METHODS``: plain, replay, KL loss, EWC, A-GEM, SafeGrad, joint; ``--methods``
  picks others), with the hyperparameters stored in ``tuned.json`` (methods without a stored
  selection run untuned, and the report says so); every run is the same job as in ``--full``;
- ``--tune``: rerun the tuning on the development seeds first (its selection is written to
  ``--out``/tuned.json); ``--full``: ``--tune`` and every method on every condition;
- ``--quick``: a smoke run (one seed, five methods, small sizes) whose numbers mean nothing.

It needs the ``[demo]`` extra (scikit-learn's digits, matplotlib, tqdm for the progress bar):
``run`` checks for it first and raises ``MissingDependency``, which the command line prints
as one line.
"""

from __future__ import annotations

import argparse
import os
import time

from .._optional import UserError, require_installed
from .jobs import FACTORIES, make_config
from .methods import DEFAULT_METHODS, METHODS

__all__ = ["add_arguments", "run", "parse_seeds", "positive_int", "check_dependencies", "check_output_dir"]

# the [demo] extra's modules the study needs: the digits file ships with scikit-learn; the plots
DEMO_MODULES = ("sklearn", "matplotlib")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,4,7"`` -> those seeds."""
    text = text.strip()
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s.strip())
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = tuple(range(n))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,4,7), got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: no seed given")
    return seeds


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (else argparse's one-line usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def check_output_dir(out: str) -> None:
    """Create ``out`` if needed and check that a file can be written in it; else ``UserError``.

    Run before any work, so that a bad ``--out`` fails in a second, not after the study.
    """
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--out {out}: exists and is not a folder") from None
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in the folder ({exc.strerror or exc})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradsafe demo``."""
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 5 methods, small sizes (under a minute)")
    parser.add_argument("--tune", action="store_true", help="rerun the tuning on the development seeds first")
    parser.add_argument("--full", action="store_true", help="the whole protocol: tuning, then every method on every condition")
    parser.add_argument("--scenario", choices=("all",) + tuple(FACTORIES), default="all",
                        help="which scenario to run (default: all: continual and lm-safety; with --full the "
                             "label-flip toy 'safety' as well)")
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="N|LIST",
                        help="report seeds: a count (0..N-1) or a comma-separated list (default: 5, quick: 1)")
    parser.add_argument("--out", metavar="DIR", default="results",
                        help="folder for results.md, results.json and the PNGs (default: results)")
    parser.add_argument("--methods", default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(METHODS)} (plain is always run; "
                             f"default: {','.join(DEFAULT_METHODS)}, with --tune/--full: all)")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one torch thread each (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_dependencies(progress: bool = True) -> None:
    """Raise ``MissingDependency`` naming ``gradsafe demo`` and ``[demo]`` unless the extra is installed."""
    for module in DEMO_MODULES + (("tqdm",) if progress else ()):
        require_installed(module, "demo", "gradsafe demo")


def run(args: argparse.Namespace) -> int:
    """``gradsafe demo``: run the study, print the tables, write the results; returns 0.

    Raises ``MissingDependency`` when the ``[demo]`` extra is not installed, ``UserError`` for
    bad options or an ``--out`` folder that cannot be created or written (all before any work).
    """
    t0 = time.perf_counter()
    progress = not getattr(args, "no_progress", False)
    check_dependencies(progress)
    # imported here, once the check passed: the study's plots import matplotlib
    from .study import run_study

    scenario = getattr(args, "scenario", "all")
    methods = getattr(args, "methods", None)
    try:
        cfg = make_config(
            quick=bool(getattr(args, "quick", False)),
            scenarios=None if scenario == "all" else (scenario,),
            seeds=getattr(args, "seeds", None),
            methods=None if not methods else [m.strip() for m in methods.split(",") if m.strip()],
            workers=getattr(args, "workers", 2),
            tune=bool(getattr(args, "tune", False)),
            full=bool(getattr(args, "full", False)),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_output_dir(args.out)
    agg = run_study(cfg, out_dir=args.out, progress=progress)
    if agg["paths"]:
        print("written: " + ", ".join(agg["paths"].values()))
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 0
