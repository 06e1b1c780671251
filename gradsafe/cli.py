"""The ``gradsafe`` command line: ``gradsafe demo``, ``gradsafe bench``, ``gradsafe plot``.

A command whose optional dependency is missing prints one line naming the extra to install
(``gradsafe demo needs scikit-learn: pip install "gradsafe[demo]"``) and exits with code 2;
every other user error (a bad file, folder, device or value) is one line ``gradsafe
<command>: <message>`` on stderr and exit code 2 as well. ``gradsafe --version`` prints the
version.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from ._optional import run_command


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the command; returns its exit code."""
    parser = argparse.ArgumentParser(prog="gradsafe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradsafe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the study: forgetting and safety erosion, plain AdamW vs gradsafe's methods")
    from .experiments import demo as demo_mod

    demo_mod.add_arguments(demo)
    demo.set_defaults(run=demo_mod.run)

    bench = sub.add_parser("bench", help="print a table of surgery step times, as ratios measured in one run")
    from . import bench as bench_mod

    bench_mod.add_arguments(bench)
    bench.set_defaults(run=bench_mod.run)

    plot = sub.add_parser("plot", help="draw the monitor's curves from a JSONL run into a PNG")
    from . import plot as plot_mod

    plot_mod.add_arguments(plot)
    plot.set_defaults(run=plot_mod.run)

    args = parser.parse_args(argv)
    return run_command(args.run, args, args.command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
