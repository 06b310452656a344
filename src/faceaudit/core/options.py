"""Checks for the option dataclasses' ``__post_init__``: a value no run could use is an
OptionsError ("expected --flag to be ..., found ...") raised before any work, so the
script exits 2 at once instead of failing after minutes of computation."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from faceaudit.core.runner import OptionsError


def expect(ok: bool, flag: str, expected: str, found: Any) -> None:
    """Raise OptionsError unless ``ok``."""
    if not ok:
        raise OptionsError(f"expected {flag} to be {expected}, found {found!r}")


def expect_number(flag: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in [low, high] (an end is open when ``*_open``; None: unbounded)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = is_number and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
    expect(ok, flag, f"a number in {interval}", value)


def expect_whole(flag: str, value: Any, minimum: int) -> None:
    """A whole number >= ``minimum`` (bools are not numbers here)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    expect(ok, flag, f"a whole number >= {minimum}", value)


def expect_choice(flag: str, value: Any, choices: Collection[Any]) -> None:
    """One of ``choices``."""
    expect(value in choices, flag, f"one of {', '.join(map(str, choices))}", value)
