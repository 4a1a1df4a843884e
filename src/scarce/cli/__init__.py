"""``scarce`` command line: a thin face over the public functions a notebook user calls.

Segmentation verbs (:mod:`scarce.cli.segment`): ingest, inspect, train, predict, evaluate,
export, demo, benchmark-readers; planning (:mod:`scarce.cli.plan`): plan, learning-curve.
Alignment verbs (:mod:`scarce.cli.align`): ingest-stack, align-train, align, align-evaluate.
For both: history. Errors that are the user's (:class:`scarce.errors.ScarceError`: bad input,
missing files, bad config, no such device, a full disk) print one line naming the problem and
exit 2 (3 when another DDP rank died); anything else is a bug in Scarce and keeps its
traceback. A training run stopped by SIGTERM, SIGINT or SIGUSR1 saves ``last.pt`` and exits
75 (:data:`scarce.lifecycle.EXIT_STOPPED`); an interrupted command that saved nothing exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from scarce.cli import align, plan, segment

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def cmd_history(args) -> int:
    """``scarce history``: one row per run (``--diff``: config differences; ``--lineage``)."""
    from scarce.engine.history import (
        collect_runs,
        format_diff,
        format_history,
        format_lineage,
        lineage,
    )

    if args.lineage:
        for run in args.runs:
            chain = lineage(run)
            print(json.dumps(chain, indent=2) if args.json else format_lineage(chain))
        return 0
    runs = collect_runs(args.runs)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
    else:
        print(format_history(runs))
    if args.diff:
        print(format_diff(runs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``scarce`` argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(prog="scarce", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    segment.add_verbs(sub)
    plan.add_verbs(sub)
    align.add_verbs(sub)
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="refuse images with more pixels than this, read from the file header before "
        "decoding (default 2**31, or $SCARCE_MAX_PIXELS)",
    )
    p = sub.add_parser("history", help="one row per training run")
    p.add_argument("runs", nargs="+", help="run folders or folders of runs")
    p.add_argument("--diff", action="store_true", help="show how the runs' configs differ")
    p.add_argument(
        "--lineage", action="store_true", help="follow --init-from back to the first run"
    )
    p.add_argument("--json", action="store_true")
    return parser


COMMANDS = {**segment.COMMANDS, **plan.COMMANDS, **align.COMMANDS, "history": cmd_history}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scarce`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from scarce.errors import ScarceError
    from scarce.headers import set_max_pixels
    from scarce.lifecycle import EXIT_INTERRUPTED

    try:
        if args.max_pixels is not None:
            set_max_pixels(args.max_pixels)
        return COMMANDS[args.verb](args)
    except ScarceError as exc:
        print(f"scarce {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"scarce {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
