"""Argument conventions shared by the six stage scripts."""

from __future__ import annotations

import argparse
import sys

from faceaudit.stageio import EXIT_USAGE, InputError


def add_common_args(parser: argparse.ArgumentParser, *, jobs: bool = True) -> None:
    """--overwrite, --seed, --quiet and (optionally) --jobs, the same in every stage."""
    if jobs:
        parser.add_argument("--jobs", type=int, default=1, metavar="N",
                            help="items processed in parallel (default: 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo items whose outputs already exist")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_guarded(func, *args, **kwargs) -> int:
    """Call a stage; an InputError (bad input folder, missing model) becomes a message and exit 2."""
    try:
        return int(func(*args, **kwargs))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
