"""Argument conventions and the exit-code contract shared by the six stage scripts."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from faceaudit.core.files import InputError
from faceaudit.core.runner import EXIT_CRASH, EXIT_USAGE, OptionsError, RunSettings, StageResult, describe_os_error


def add_common_args(parser: argparse.ArgumentParser, *, jobs: bool = True) -> None:
    """--overwrite, --seed, --quiet and (optionally) --jobs, the same in every stage."""
    if jobs:
        parser.add_argument("--jobs", type=int, default=1, metavar="N",
                            help="items processed in parallel (default: 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every item, even those whose inputs and options are unchanged")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The RunSettings of the common arguments; the whole namespace goes into run.json."""
    return RunSettings(jobs=getattr(args, "jobs", 1), overwrite=args.overwrite, seed=args.seed,
                       progress=not args.quiet, args=dict(vars(args)))


def run_guarded(func: Callable[..., Any], *args, **kwargs) -> int:
    """Call a stage and turn what happened into an exit code and at most a few lines.

    A StageResult's summary is printed and its exit code returned (0 ok, 1 items failed).
    Unusable arguments, inputs or output locations print one line and give 2. Anything
    else is a bug: its traceback is printed and the code is 3, so a caller (the demo) can
    tell a crash from failed items.
    """
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        result = func(*args, **kwargs)
    except (InputError, OptionsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:          # read-only or full output location, a vanished folder
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (exit 3); the traceback above says where",
              file=sys.stderr)
        return EXIT_CRASH
    if isinstance(result, StageResult):
        if result.summary:
            print(result.summary)
        return int(result.exit_code)
    return int(result)
