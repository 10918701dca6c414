"""Argument types and error reporting shared by the ``lowbit`` subcommands."""

from __future__ import annotations

import argparse
import sys


class InputError(Exception):
    """Bad user input: reported as one line on stderr with exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fail(command: str, error: Exception) -> int:
    """Print ``lowbit COMMAND: error: ...`` to stderr; the exit status for bad input."""
    print(f"lowbit {command}: error: {error}", file=sys.stderr)
    return 2
