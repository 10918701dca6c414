"""What a run tells its user: progress while it trains, ``metrics.json`` and ``curves.png`` after.

On a terminal (and with ``progress=True``) a rich bar shows the running loss,
accuracy (per token for a language model), throughput, elapsed time and ETA;
otherwise (``progress=False``, a pipe, a log file) nothing is printed per step.
Either way one line per epoch is printed and flushed, so a log shows progress as
it happens.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

__all__ = ["Progress", "duration", "to_json", "write_report"]


def duration(seconds: float) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown)."""
    if not math.isfinite(seconds):
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """The progress display of one run; a context manager.

    Args:
      enabled: Show the per-step bar (only when stdout is a terminal).
      total_steps: Steps this session will run (the bar's length).
    """

    def __init__(self, enabled: bool, total_steps: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        self._console = Console()
        self._bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self._console,
            disable=not (enabled and self._console.is_terminal),
        )
        self._total = total_steps
        self._task = None

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        self._task = self._bar.add_task("compiling", total=self._total, stats="")
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def step(self, description: str, stats: str) -> None:
        """One step done: advances the bar."""
        self._bar.update(self._task, advance=1, description=description, stats=stats)

    def line(self, text: str) -> None:
        """Prints ``text`` and flushes it: above the bar on a terminal, a plain line otherwise."""
        if self._bar.live.is_started:
            self._bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)


def to_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def write_report(out_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Writes ``curves.png`` (with matplotlib installed and a history to plot) and ``metrics.json``.

    Returns:
      ``metrics`` with ``curves`` set to ``"curves.png"`` if it was written, else None.
    """
    metrics = dict(metrics, curves="curves.png" if _plot(out_dir / "curves.png", metrics) else None)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    return metrics


def _plot(path: Path, metrics: dict[str, Any]) -> bool:
    hist = metrics["history"]
    if not hist:
        return False
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn("matplotlib (a dependency of lowbit) does not import: no curves.png", stacklevel=4)
        return False
    epochs = [h["epoch"] for h in hist]
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)

    def series(key: str) -> list[float]:
        return [math.nan if h[key] is None else h[key] for h in hist]

    loss_ax.plot(epochs, series("loss"), marker="o", **({"label": "train"} if "test_loss" in hist[0] else {}))
    loss_ax.set(xlabel="epoch", ylabel="train loss", yscale="log")
    if "bits_per_byte" in hist[0]:  # a language model: held-out loss beside the train loss, then bits per byte
        loss_ax.plot(epochs, series("test_loss"), marker="o", label="held-out")
        loss_ax.set(ylabel="cross-entropy (nats/token)")
        loss_ax.legend()
        acc_ax.plot(epochs, series("bits_per_byte"), marker="o")
        acc_ax.set(xlabel="epoch", ylabel="held-out bits per byte")
    else:
        acc_ax.plot(epochs, [h["train_acc"] for h in hist], marker="o", label="train")
        acc_ax.plot(epochs, [h["test_accuracy"] for h in hist], marker="o", label="test")
        acc_ax.set(xlabel="epoch", ylabel="accuracy")
        acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{metrics['recipe']} on {metrics['dataset']} (seed {metrics['seed']})")
    fig.savefig(path, dpi=100)
    return True
