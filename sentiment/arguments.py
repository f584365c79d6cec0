"""Command-line value types of `sentiment`'s commands and the benchmarks' own scripts: each refuses
what would run for nothing, for ever or somewhere unmeant, before anything starts."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path


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


def directory(text: str) -> Path:
    """A command-line directory, never empty: `--data-dir "$DIR"` with DIR unset would be `.`, the
    working directory."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected a directory, got {text!r}")
    return Path(text)


K6_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def k6_duration(text: str) -> str:
    """k6's hold stage: seconds, as the other commands' --duration (k6 itself reads a bare number as
    milliseconds), or a k6 duration; above 0 and one k6 takes, checked before the service starts."""
    try:
        held_s, hold = float(text), f"{float(text):g}s"
    except ValueError:
        terms = re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+", text) and re.findall(r"([\d.]+)(ms|s|m|h)", text)
        held_s, hold = sum(float(n) * K6_UNITS[unit] for n, unit in terms) if terms else math.nan, text
    if not 0 < held_s < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds or a k6 duration above 0 (20s, 1m30s), got {text!r}")
    return hold
