"""``lowbit train`` and ``lowbit compare``: train the ViT in one or several recipes.

Each ``add_*_parser`` registers one subcommand and sets ``func``, which takes the
parsed arguments and returns the exit status (2 for bad input such as a missing
dataset, an unknown recipe or an incompatible checkpoint).

Imports of jax-using modules stay inside the command functions: ``--devices N``
must set ``XLA_FLAGS`` before jax creates its CPU backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from lowbit.cli.args import InputError, fail, nonnegative_float, positive_int
from lowbit.data import DATASETS

__all__ = ["add_compare_parser", "add_train_parser"]

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit train``."""
    parser = subparsers.add_parser(
        "train", help="train the ViT in one recipe",
        description="Train the ViT on a dataset in one recipe; writes checkpoints, metrics.json and curves.png.",
    )
    parser.add_argument("--recipe", default="fp32", help="training recipe (default: fp32)")
    parser.add_argument("--seed", type=int, default=0, help="model init and data order seed (default: 0)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/<recipe>-<dataset>-seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_common(parser)
    parser.set_defaults(func=_train_command)
    return parser


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit compare``."""
    parser = subparsers.add_parser(
        "compare", help="train several recipes and compare them with fp32",
        description="Train the ViT in each recipe and seed; print accuracy (mean ± std), the gap to fp32 "
                    "and the step-time ratio; write comparison.json and comparison.png.",
    )
    parser.add_argument("--recipes", default="fp32,fp8,fp4", help="comma-separated recipes (default: fp32,fp8,fp4)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/compare-<dataset>)")
    _add_common(parser)
    parser.set_defaults(func=_compare_command)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASETS, help="dataset (default: digits, bundled)")
    data.add_argument("--data-dir", help="directory with the dataset files (fashion-mnist, cifar10)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=30, help="passes over the training set (default: 30)")
    opt.add_argument("--batch-size", type=positive_int, default=64, help="global batch size (default: 64)")
    opt.add_argument("--lr", type=nonnegative_float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    opt.add_argument("--weight-decay", type=nonnegative_float, default=0.05, help="AdamW weight decay (default: 0.05)")
    opt.add_argument("--warmup", type=nonnegative_float, default=2.0, help="linear warmup in epochs (default: 2)")
    opt.add_argument("--devices", type=positive_int, default=1,
                     help="data-parallel devices; on CPU, simulated with XLA_FLAGS (default: 1)")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--matmul", default="auto", choices=("auto", "real", "fake"),
                       help="quantized matmuls on integer/float8 operands (real), on dequantized floats (fake), "
                            "or auto: real for integer formats, and for float8 off-CPU (default: auto)")
    model = parser.add_argument_group("model (ViT)")
    model.add_argument("--patch-size", type=int, help="patch side (default: the smallest giving <= 64 patches)")
    model.add_argument("--dim", type=int, default=64, help="token width (default: 64)")
    model.add_argument("--depth", type=int, default=2, help="transformer blocks (default: 2)")
    model.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    model.add_argument("--mlp-dim", type=int, default=128, help="MLP hidden width (default: 128)")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout rate (default: 0)")


def _train_command(args: argparse.Namespace) -> int:
    try:
        _use_devices(args)
        dataset, (recipe,) = _load_inputs(args, [args.recipe])
        out = args.out or Path("runs") / f"{recipe.name}-{dataset.name}-seed{args.seed}"
        metrics = _run(args, dataset, recipe, args.seed, out, resume=args.resume)
    except InputError as e:
        return fail("train", e)
    print(f"{metrics['recipe']} on {metrics['dataset']}, {metrics['epochs']} epochs, seed {metrics['seed']}: "
          f"test accuracy {100 * metrics['test_accuracy']:.2f}%, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_time_s']:.1f} s ({metrics['step_time_ms']:.1f} ms/step), "
          f"skipped steps {metrics['skipped_steps']}")
    print(f"wrote {out}/metrics.json and {out}/curves.png")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    try:
        names = _split(args.recipes, str, "--recipes")
        seeds = _split(args.seeds, int, "--seeds")
        _use_devices(args)
        dataset, recipes = _load_inputs(args, names)
        out = args.out or Path("runs") / f"compare-{dataset.name}"
        runs: dict[str, list[dict[str, Any]]] = {}
        for i, recipe in enumerate(recipes):
            for j, seed in enumerate(seeds):
                print(f"[{i * len(seeds) + j + 1}/{len(recipes) * len(seeds)}] {recipe.name}, seed {seed}", flush=True)
                metrics = _run(args, dataset, recipe, seed, out / recipe.name / f"seed{seed}", resume=False)
                runs.setdefault(recipe.name, []).append(metrics)
    except InputError as e:
        return fail("compare", e)
    rows = _summarise(runs)
    report = dict(dataset=dataset.name, seeds=seeds, epochs=args.epochs, batch_size=args.batch_size,
                  learning_rate=args.lr, results=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    _print_table(rows, dataset.name, seeds)
    _plot(rows, out / "comparison.png", dataset.name)
    print(f"wrote {out}/comparison.json and {out}/comparison.png")
    return 0


def _split(text: str, kind: type, flag: str) -> list:
    try:
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not items or len(set(items)) != len(items):
        raise InputError(f"{flag} {text!r}: expected distinct, comma-separated values")
    return items


def _use_devices(args: argparse.Namespace) -> None:
    """Asks XLA for ``--devices`` host devices and checks that jax got them.

    The flag only takes effect if jax's backend has not started yet; the check
    catches the case where something in this process already started it.
    """
    n = args.devices
    if args.batch_size % n:
        raise InputError(f"--batch-size {args.batch_size} is not divisible by --devices {n}")
    if n > 1:
        flags = re.sub(rf"{_DEVICE_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()
    import jax

    if len(jax.devices()) < n:
        raise InputError(f"--devices {n}: jax sees only {len(jax.devices())} devices (its backend started before "
                          f"XLA_FLAGS could be set; run `XLA_FLAGS={_DEVICE_FLAG}={n} lowbit ...`)")


def _load_inputs(args: argparse.Namespace, recipe_names: list[str]):
    from lowbit import data
    from lowbit import recipes

    try:
        chosen = [recipes.get(name).with_matmul(args.matmul) for name in recipe_names]
        return data.load(args.dataset, args.data_dir), chosen
    except (FileNotFoundError, ValueError) as e:
        raise InputError(e) from None


def _run(args: argparse.Namespace, dataset, recipe, seed: int, out: Path, *, resume: bool) -> dict[str, Any]:
    from flax import nnx

    from lowbit.nn.vit import ViT
    from lowbit.trainer.checkpoint import CheckpointError
    from lowbit.trainer.loop import train

    if args.batch_size > len(dataset.x_train):
        raise InputError(f"--batch-size {args.batch_size} exceeds the {len(dataset.x_train)} training examples")
    try:
        model = ViT(image_shape=dataset.image_shape, num_classes=dataset.num_classes, patch_size=args.patch_size,
                    dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim, recipe=recipe,
                    rngs=nnx.Rngs(seed), dropout=args.dropout)
    except ValueError as e:  # sizes that do not fit together or the images
        raise InputError(e) from None
    try:
        return train(model, dataset, recipe=recipe, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                     learning_rate=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, out_dir=out,
                     resume=resume, devices=args.devices, progress=not args.no_progress)
    except CheckpointError as e:
        raise InputError(f"{e} (use a fresh --out, or drop --resume to start over)") from None


def _summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for name, metrics in runs.items():
        acc_mean, acc_std = mean_std([m["test_accuracy"] for m in metrics])
        rows.append(dict(recipe=name, test_accuracy=[m["test_accuracy"] for m in metrics],
                         test_accuracy_mean=acc_mean, test_accuracy_std=acc_std,
                         step_time_ms=statistics.median(m["step_time_ms"] for m in metrics),
                         train_time_s=statistics.fmean(m["train_time_s"] for m in metrics)))
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    for row in rows:  # None when fp32 was not among the recipes
        row["gap_to_fp32_points"] = 100 * (row["test_accuracy_mean"] - base["test_accuracy_mean"]) if base else None
        row["step_time_ratio_to_fp32"] = row["step_time_ms"] / base["step_time_ms"] if base else None
    return rows


def _print_table(rows: list[dict[str, Any]], dataset: str, seeds: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{dataset}, seeds {', '.join(map(str, seeds))}")
    for column in ("recipe", "test accuracy (%)", "gap to fp32 (points)", "step time (ms)", "vs fp32"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for r in rows:
        gap, ratio = r["gap_to_fp32_points"], r["step_time_ratio_to_fp32"]
        table.add_row(r["recipe"], f"{100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f}",
                      "—" if gap is None else f"{gap:+.2f}", f"{r['step_time_ms']:.1f}",
                      "—" if ratio is None else f"{ratio:.2f}x")
    Console().print(table)


def _plot(rows: list[dict[str, Any]], path: Path, dataset: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed (pip install lowbit[plot]): no comparison.png", file=sys.stderr)
        return
    names = [r["recipe"] for r in rows]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    acc_ax, time_ax = fig.subplots(1, 2)
    acc_ax.bar(names, [100 * r["test_accuracy_mean"] for r in rows],
               yerr=[100 * r["test_accuracy_std"] for r in rows], capsize=4)
    low = min(100 * (r["test_accuracy_mean"] - r["test_accuracy_std"]) for r in rows)
    acc_ax.set(ylabel="test accuracy (%)", ylim=(max(0.0, low - 5), 100))
    time_ax.bar(names, [r["step_time_ms"] for r in rows])
    time_ax.set(ylabel="median step time (ms)")
    fig.suptitle(f"recipes on {dataset}")
    fig.savefig(path, dpi=100)
