"""What the ``lowbit`` commands print and plot: tables, bar charts, counts, file lists.

One place for the CLI's presentation, so every command's tables look alike and
no command claims a file it did not write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Panel", "plot_bars", "plural", "print_table", "written"]


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0 epochs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_table(
    title: str | None, header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[str] = ()
) -> None:
    """Prints a rich table; columns named in ``left`` align left, the others right.

    Piped output gets a 200-column console, so rows stay on one line instead of
    wrapping at rich's default of 80.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, no_wrap=True, justify="left" if h in left else "right")
    for r in rows:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


@dataclass(frozen=True, kw_only=True)
class Panel:
    """One bar chart of :func:`plot_bars`.

    Attributes:
        values: One bar height per name.
        ylabel: The value axis label (with units).
        errors: Error bar half-heights, or None for no error bars.
        floor: Where the value axis starts; None starts it at 0. A nonzero floor is
            stated on the axis, so a cut axis is never mistaken for a full one.
        ceiling: Where the value axis ends; None lets matplotlib choose.
    """

    values: Sequence[float]
    ylabel: str
    errors: Sequence[float] | None = None
    floor: float | None = None
    ceiling: float | None = None


def plot_bars(path: Path, title: str, names: Sequence[str], panels: Sequence[Panel]) -> None:
    """Writes side-by-side bar charts of ``panels`` over ``names`` to ``path`` (PNG)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, leaving pyplot's backend alone

    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        ax.bar(names, panel.values, yerr=panel.errors, capsize=4 if panel.errors is not None else 0)
        ylabel = panel.ylabel if not panel.floor else f"{panel.ylabel}\n(axis starts at {panel.floor:g}, not 0)"
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=panel.floor or 0, top=panel.ceiling)
        ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def written(paths: Sequence[Path], since: float) -> str:
    """``wrote A and B`` for the files in ``paths`` modified at or after ``since`` (``time.time()``).

    A file that is missing, or left over from an earlier run, is named as not written
    instead, so the message never claims output that is not there.
    """
    # Some filesystems store modification times in whole seconds.
    fresh = [p for p in paths if p.is_file() and p.stat().st_mtime >= int(since)]
    stale = [p for p in paths if p not in fresh]
    text = "wrote " + _join(fresh) if fresh else "wrote nothing"
    return text + (f"; not written: {_join(stale)}" if stale else "")


def _join(paths: Sequence[Path]) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
