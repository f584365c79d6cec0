"""Command-line value types shared by `sentiment`'s commands and the benchmarks' own scripts: each
refuses what would run for nothing or for ever, before anything starts."""

from __future__ import annotations

import argparse
import math


def count(text: str) -> int:
    """A count (processes, sentences, rounds): a whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """A duration: seconds above 0, finite (bench took `--duration 0` for its default)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value
