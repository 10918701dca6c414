"""Argument types, checks and error reporting shared by the ``lowbit`` subcommands.

Paths are resolved once, here at the boundary (:func:`absolute_path` as the
argparse ``type``): everything below the CLI, orbax included, sees absolute paths,
so a relative ``--out runs/x`` means ``$PWD/runs/x`` wherever it is used.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = [
    "HelpFormatter",
    "InputError",
    "absolute_path",
    "check_output_dir",
    "fail",
    "nonnegative_float",
    "nonnegative_int",
    "positive_int",
]


class InputError(Exception):
    """Bad user input: reported as one line on stderr with exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


MAX_SEED = 2**63 - 1  # lowbit.trainer.MAX_SEED (not imported: that would start jax before --devices)
SEED_RANGE = "an integer in [0, 2**63 - 1]"


def seed_value(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63 - 1] (jax keys and numpy generators take 64 bits)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        raise argparse.ArgumentTypeError(f"expected {SEED_RANGE}, got {shown!r}")
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


def absolute_path(text: str) -> Path:
    """argparse type: a path made absolute against the current directory (``~`` expanded).

    ``os.path.abspath`` rather than ``Path.resolve``: symlinks keep the names the
    user gave, which is what error messages should show.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(os.path.abspath(os.path.expanduser(text)))


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """Fails unless ``path`` is a directory that exists or can be created, and is writable.

    Raises:
        InputError: ``path`` or a parent is a file, or the nearest existing
            ancestor is not writable (checked before any training starts).
    """
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise InputError(f"{flag} {path} {what}; expected a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its nearest existing parent {probe} is not writable)"
        raise InputError(f"{flag} {path} is not writable{where}")


class HelpFormatter(argparse.HelpFormatter):
    """Fills ``{recipes}`` in help texts with the registered recipe names.

    Only when help is printed: importing the recipe registry loads jax, which
    ordinary parsing should not pay for.
    """

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if "{recipes}" in text:
            from lowbit import recipes

            text = text.replace("{recipes}", ", ".join(recipes.names()))
        return text


def fail(command: str, error: Exception, status: int = 2) -> int:
    """Prints ``lowbit COMMAND: error: ...`` to stderr; returns ``status`` (2: bad input, 1: a failed run)."""
    print(f"lowbit {command}: error: {error}", file=sys.stderr)
    return status
