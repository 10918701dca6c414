"""``lowbit compare``: train a model in several recipes and seeds and compare them with fp32.

Each run is a ``lowbit train`` run (:mod:`lowbit.cli.train`'s helpers, called through
the module so that one place defines them); the comparison prints a table and writes
comparison.json and comparison.png.

Imports of jax-using modules stay inside the command function: ``--devices N``
must set ``XLA_FLAGS`` before jax creates its CPU backend.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.cli import train
from lowbit.cli.args import HelpFormatter, InputError, absolute_path, check_output_dir, fail, seed_value
from lowbit.cli.output import Panel, plot_bars, plural, print_table, written

__all__ = ["add_compare_parser"]


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit compare``."""
    parser = subparsers.add_parser(
        "compare",
        help="train several recipes and compare them with fp32",
        formatter_class=HelpFormatter,
        description="Train a model in each recipe and seed; print accuracy (mean ± std over seeds), the gap to "
        "fp32, the step-time ratio, wall and compile time; write comparison.json and comparison.png.",
    )
    parser.add_argument(
        "--recipes", default="fp32,fp8,fp4", help="comma-separated recipes from: {recipes} (default: fp32,fp8,fp4)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", type=absolute_path, help="output directory (default: runs/compare-<dataset>)")
    train._add_common(parser)
    parser.set_defaults(func=_compare_command)
    return parser


def _compare_command(args: argparse.Namespace) -> int:
    from lowbit.trainer import TrainingError

    try:
        train._dataset_defaults(args)
        names = _split(args.recipes, str, "--recipes")
        seeds = _split(args.seeds, seed_value, "--seeds")
        train._use_devices(args)
        recipes = train._recipes(args, names)
        out = args.out or absolute_path(f"runs/compare-{args.dataset}")
        check_output_dir(out)
        runs = [(recipe, seed, out / recipe.name / f"seed{seed}") for recipe in recipes for seed in seeds]
        if not args.overwrite and (earlier := [str(p) for *_, p in runs if p.is_dir() and any(p.iterdir())]):
            # Checked for every run up front, not by each run as it starts, hours in.
            raise InputError(
                f"{', '.join(earlier)} hold(s) an earlier comparison; add --overwrite to replace it, "
                "or pass a fresh --out"
            )
        train._check_model(args)
        dataset = train._dataset(args)
        since = time.time()
        results: dict[str, list[dict[str, Any]]] = {}
        for i, (recipe, seed, run_out) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {recipe.name}, seed {seed}", flush=True)
            metrics = train._run(args, dataset, recipe, seed, run_out, resume=False)
            if metrics["stopped"]:
                print("stopped: the comparison is incomplete; rerun it with --overwrite")
                return train._STOPPED
            results.setdefault(recipe.name, []).append(metrics)
    except InputError as e:
        return fail("compare", e)
    except TrainingError as e:
        return fail("compare", e, status=1)
    score = _LM_SCORE if args.dataset == "text" else _IMAGE_SCORE
    rows = _summarise(results, score)
    report = dict(
        dataset=dataset.name,
        model=args.model,
        seeds=seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        results=rows,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    _print_comparison(rows, dataset.name, seeds, args.epochs, score)
    if args.dataset == "text":
        _plot_lm_comparison(rows, out / "comparison.png", dataset.name, seeds)
    else:
        _plot_comparison(rows, out / "comparison.png", dataset.name, seeds)
    print(written([out / "comparison.json", out / "comparison.png"], since))
    return 0


def _split(text: str, kind: Callable[[str], Any], flag: str) -> list:
    try:
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as e:  # one item out of range (a seed)
        raise InputError(f"{flag} {text!r}: {e}") from None
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not items or len(set(items)) != len(items):
        raise InputError(f"{flag} {text!r}: expected distinct, comma-separated values")
    return items


@dataclass(frozen=True, kw_only=True)
class _Score:
    """What ``lowbit compare`` ranks recipes by: a metrics key, and how it and its gap to fp32 are shown.

    Attributes:
      key: The trainer's metric (``test_accuracy``, ``bits_per_byte``).
      gap_key: The row's key for the mean's difference from fp32's, times ``scale``.
      scale: Shown values (and the gap) are the metric times this (100: percent, points).
      digits: Decimals shown.
      label: The table's column for the metric.
      gap_label: The table's column for the gap.
      note: Said in the table's title, before the wall-time note.
    """

    key: str
    gap_key: str
    scale: float
    digits: int
    label: str
    gap_label: str
    note: str = ""


_IMAGE_SCORE = _Score(
    key="test_accuracy",
    gap_key="gap_to_fp32_points",
    scale=100.0,
    digits=2,
    label="test accuracy (%)",
    gap_label="gap to fp32 (points)",
)
_LM_SCORE = _Score(
    key="bits_per_byte",
    gap_key="gap_to_fp32_bits_per_byte",
    scale=1.0,
    digits=3,
    label="held-out bits/byte",
    gap_label="gap to fp32 (bits/byte)",
    note="lower bits/byte is better; ",
)


def _summarise(runs: dict[str, list[dict[str, Any]]], score: _Score = _IMAGE_SCORE) -> list[dict[str, Any]]:
    rows = []
    key = score.key
    for name, metrics in runs.items():
        values = [m[key] for m in metrics]
        rows.append(
            {
                "recipe": name,
                key: values,
                f"{key}_mean": _fmean(values),
                # None, not 0, with one seed: a single run says nothing about the spread.
                f"{key}_std": _stdev(values),
            }
            | dict(
                step_time_ms=statistics.median(m["step_time_ms"] for m in metrics),
                train_time_s=statistics.fmean(m["train_time_s"] for m in metrics),
                wall_time_s=statistics.fmean(m["wall_time_s"] for m in metrics),
                compile_time_s=statistics.fmean(m["compile_time_s"] for m in metrics),
            )
        )
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    mean = f"{key}_mean"
    for row in rows:  # None when fp32 was not among the recipes (or a run had no score)
        if base is not None and None not in (row[mean], base[mean]):
            row[score.gap_key] = score.scale * (row[mean] - base[mean])
        else:
            row[score.gap_key] = None
        row["step_time_ratio_to_fp32"] = row["step_time_ms"] / base["step_time_ms"] if base else None
    return rows


def _fmean(values: list[float | None]) -> float | None:
    """The mean, or None when a run has no value (a diverged language model's held-out loss)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if len(known) == len(values) else None


def _stdev(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.stdev(known) if len(known) == len(values) >= 2 else None


def _print_comparison(
    rows: list[dict[str, Any]], dataset: str, seeds: list[int], epochs: int, score: _Score = _IMAGE_SCORE
) -> None:
    header = [
        "recipe",
        score.label,
        score.gap_label,
        "step time (ms)",
        "step vs fp32",
        "wall time (s)",
        "compile time (s)",
    ]
    table = []
    for r in rows:
        gap, ratio = r[score.gap_key], r["step_time_ratio_to_fp32"]
        mean, std = r[f"{score.key}_mean"], r[f"{score.key}_std"]
        shown = "n/a" if mean is None else f"{score.scale * mean:.{score.digits}f}"
        shown += "" if std is None else f" ± {score.scale * std:.{score.digits}f}"
        table.append(
            [
                r["recipe"],
                shown,
                "—" if gap is None else f"{gap:+.{score.digits}f}",
                f"{r['step_time_ms']:.1f}",
                "—" if ratio is None else f"{ratio:.2f}x",
                f"{r['wall_time_s']:.1f}",
                f"{r['compile_time_s']:.1f}",
            ]
        )
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread"
    print_table(
        f"{dataset}, {plural(epochs, 'epoch')}, {plural(len(seeds), 'seed')} "
        f"({', '.join(map(str, seeds))}; {spread}); {score.note}wall time: whole run, compile included",
        header,
        table,
        left=("recipe",),
    )


def _plot_lm_comparison(rows: list[dict[str, Any]], path: Path, dataset: str, seeds: list[int]) -> None:
    means = [math.nan if r["bits_per_byte_mean"] is None else r["bits_per_byte_mean"] for r in rows]
    stds = None if len(seeds) == 1 else [r["bits_per_byte_std"] or 0.0 for r in rows]
    bits = Panel(values=means, errors=stds, ylabel="held-out bits per byte (lower is better)")
    step = Panel(values=[r["step_time_ms"] for r in rows], ylabel="median step time (ms)")
    plot_bars(path, f"recipes on {dataset} ({plural(len(seeds), 'seed')})", [r["recipe"] for r in rows], [bits, step])


def _plot_comparison(rows: list[dict[str, Any]], path: Path, dataset: str, seeds: list[int]) -> None:
    means = [100 * r["test_accuracy_mean"] for r in rows]
    stds = None if len(seeds) == 1 else [100 * r["test_accuracy_std"] for r in rows]
    low = min(means) if stds is None else min(m - s for m, s in zip(means, stds, strict=True))
    # Starting at 0 would squeeze gaps of a point or two into invisibility: start 5 points
    # below the lowest bar, on a multiple of 10 (the axis label says where).
    floor = max(0.0, 10 * ((low - 5) // 10))
    accuracy = Panel(values=means, errors=stds, ylabel="test accuracy (%)", floor=floor or None, ceiling=100)
    step = Panel(values=[r["step_time_ms"] for r in rows], ylabel="median step time (ms)")
    plot_bars(
        path, f"recipes on {dataset} ({plural(len(seeds), 'seed')})", [r["recipe"] for r in rows], [accuracy, step]
    )
