"""``lowbit train`` and ``lowbit compare``: train a model in one or several recipes.

Each ``add_*_parser`` registers one subcommand and sets ``func``, which takes the
parsed arguments and returns the exit status (2 for bad input such as a missing
dataset, an unknown recipe, an unwritable ``--out`` or an incompatible checkpoint).
Every input is checked before the first step compiles.

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.cli.args import (
    HelpFormatter,
    InputError,
    absolute_path,
    check_output_dir,
    fail,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    seed_value,
)
from lowbit.cli.output import Panel, plot_bars, plural, print_table, written
from lowbit.data import DATASETS

__all__ = ["add_compare_parser", "add_train_parser"]

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_STOPPED = 130  # exit status of a run a signal stopped early (the shell's for Ctrl-C)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a model in one recipe",
        formatter_class=HelpFormatter,
        description="Train a model on a dataset in one recipe; writes checkpoints, metrics.json and curves.png.",
    )
    parser.add_argument("--recipe", default="fp32", help="training recipe: {recipes} (default: fp32)")
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="model init and data order seed, 0 .. 2**63-1 (default: 0)"
    )
    parser.add_argument(
        "--out", type=absolute_path, help="output directory (default: runs/<recipe>-<dataset>-seed<seed>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in --out (says which epoch it restored)",
    )
    _add_common(parser)
    parser.set_defaults(func=_train_command)
    return parser


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
    _add_common(parser)
    parser.set_defaults(func=_compare_command)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASETS, help="dataset (default: digits, bundled)")
    data.add_argument(
        "--data-dir", type=absolute_path, help="directory with the dataset files (fashion-mnist, cifar10)"
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=30, help="passes over the training set (default: 30)")
    opt.add_argument("--batch-size", type=positive_int, default=64, help="global batch size (default: 64)")
    opt.add_argument("--lr", type=nonnegative_float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    opt.add_argument("--weight-decay", type=nonnegative_float, default=0.05, help="AdamW weight decay (default: 0.05)")
    opt.add_argument("--warmup", type=nonnegative_float, default=2.0, help="linear warmup in epochs (default: 2)")
    opt.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="data-parallel devices; on CPU, simulated with XLA_FLAGS (default: 1)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds an earlier run's checkpoints or metrics, deleting "
        "them (without it, that is an error)",
    )
    run.add_argument("--keep", type=positive_int, default=2, help="newest checkpoints to keep (default: 2)")
    run.add_argument(
        "--max-skipped",
        type=nonnegative_int,
        help="fail the run once more than N steps were skipped for a non-finite loss or gradients "
        "(default: the trainer's)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one line per epoch (as when output is not a terminal)",
    )
    quant = parser.add_argument_group("quantization")
    quant.add_argument(
        "--matmul",
        default="auto",
        choices=("auto", "real", "fake"),
        help="quantized matmuls on integer/float8 operands (real), on dequantized floats (fake), "
        "or auto: real for integer formats, and for float8 off-CPU (default: auto)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="vit",
        metavar="{vit,mlp,cnn,PKG.MODULE:FACTORY}",
        help="a built-in model, or your factory, called as FACTORY(image_shape=(H, W, C), "
        "num_classes=K, rngs=nnx.Rngs(seed)) and returning an NNX model; PKG.MODULE is "
        "imported from the working directory or PYTHONPATH (default: vit)",
    )
    vit = parser.add_argument_group("ViT sizes (--model vit only)")
    vit.add_argument("--patch-size", type=positive_int, help="patch side (default: the smallest giving <= 64 patches)")
    vit.add_argument("--dim", type=positive_int, help="token width (default: 64)")
    vit.add_argument("--depth", type=positive_int, help="transformer blocks (default: 2)")
    vit.add_argument("--heads", type=positive_int, help="attention heads (default: 4)")
    vit.add_argument("--mlp-dim", type=positive_int, help="MLP hidden width (default: 128)")
    vit.add_argument("--dropout", type=nonnegative_float, help="dropout rate, < 1 (default: 0)")


def _train_command(args: argparse.Namespace) -> int:
    from lowbit.trainer import TrainingError

    try:
        _use_devices(args)
        (recipe,) = _recipes(args, [args.recipe])
        out = args.out or absolute_path(f"runs/{recipe.name}-{args.dataset}-seed{args.seed}")
        check_output_dir(out)
        _check_model(args)
        dataset = _dataset(args)
        since = time.time()
        metrics = _run(args, dataset, recipe, args.seed, out, resume=args.resume)
    except InputError as e:
        return fail("train", e)
    except TrainingError as e:
        return fail("train", e, status=1)
    if not metrics["stopped"]:
        print(_summary(metrics))
    print(written([out / "metrics.json", out / "curves.png"], since))
    # A stopped run is unfinished: a script's next command (`&& lowbit ptq ...`) must not run.
    return _STOPPED if metrics["stopped"] else 0


def _summary(metrics: dict[str, Any]) -> str:
    """The one-line result of ``lowbit train``; a value the run could not measure shows as ``n/a``.

    ``final_loss`` is None (null in metrics.json) when every step of the last
    epoch was skipped for a non-finite loss; ``step_time_ms`` when no step after
    the compiling one was timed.
    """
    loss = metrics["final_loss"]
    if loss is None:
        last = (metrics.get("history") or [{}])[-1]
        loss_text = "final loss n/a (every step of the last epoch was skipped"
        loss_text += f": {last['skipped']} steps)" if "skipped" in last else ")"
    else:
        loss_text = f"final loss {loss:.4f}"
    step = metrics["step_time_ms"]
    step_text = "n/a ms/step" if step is None else f"{step:.1f} ms/step"
    accuracy = metrics["test_accuracy"]
    accuracy_text = "n/a" if accuracy is None else f"{100 * accuracy:.2f}%"
    return (
        f"{metrics['recipe']} on {metrics['dataset']}, {plural(metrics['epochs'], 'epoch')}, "
        f"seed {metrics['seed']}: test accuracy {accuracy_text}, {loss_text}, {metrics['train_time_s']:.1f} s "
        f"({step_text}), {plural(metrics['skipped_steps'], 'skipped step')}"
    )


def _compare_command(args: argparse.Namespace) -> int:
    from lowbit.trainer import TrainingError

    try:
        names = _split(args.recipes, str, "--recipes")
        seeds = _split(args.seeds, seed_value, "--seeds")
        _use_devices(args)
        recipes = _recipes(args, names)
        out = args.out or absolute_path(f"runs/compare-{args.dataset}")
        check_output_dir(out)
        runs = [(recipe, seed, out / recipe.name / f"seed{seed}") for recipe in recipes for seed in seeds]
        if not args.overwrite and (earlier := [str(p) for *_, p in runs if p.is_dir() and any(p.iterdir())]):
            # Checked for every run up front, not by each run as it starts, hours in.
            raise InputError(
                f"{', '.join(earlier)} hold(s) an earlier comparison; add --overwrite to replace it, "
                "or pass a fresh --out"
            )
        _check_model(args)
        dataset = _dataset(args)
        since = time.time()
        results: dict[str, list[dict[str, Any]]] = {}
        for i, (recipe, seed, run_out) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {recipe.name}, seed {seed}", flush=True)
            metrics = _run(args, dataset, recipe, seed, run_out, resume=False)
            if metrics["stopped"]:
                print("stopped: the comparison is incomplete; rerun it with --overwrite")
                return _STOPPED
            results.setdefault(recipe.name, []).append(metrics)
    except InputError as e:
        return fail("compare", e)
    except TrainingError as e:
        return fail("compare", e, status=1)
    rows = _summarise(results)
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
    _print_comparison(rows, dataset.name, seeds, args.epochs)
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
        raise InputError(
            f"--devices {n}: jax sees only {len(jax.devices())} devices (its backend started before "
            f"XLA_FLAGS could be set; run `XLA_FLAGS={_DEVICE_FLAG}={n} lowbit ...`)"
        )


def _recipes(args: argparse.Namespace, names: list[str]) -> list:
    from lowbit import recipes

    try:
        return [recipes.get(name).with_matmul(args.matmul) for name in names]
    except ValueError as e:
        raise InputError(e) from None


def _dataset(args: argparse.Namespace):
    from lowbit import data

    try:
        dataset = data.load(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(e) from None
    if args.batch_size > len(dataset.x_train):
        raise InputError(f"--batch-size {args.batch_size} exceeds the {len(dataset.x_train)} training examples")
    return dataset


@contextmanager
def _compile_time() -> Iterator[list[float]]:
    """Collects the seconds jax spends lowering and compiling while the block runs (one-element list)."""
    from jax import monitoring

    events = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
    total = [0.0]

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event in events:
            total[0] += seconds

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield total
    finally:
        monitoring.unregister_event_duration_listener(listen)


_VIT_SIZES = ("patch_size", "dim", "depth", "heads", "mlp_dim", "dropout")


def _check_model(args: argparse.Namespace) -> None:
    """Fails on a ``--model`` that does not resolve, or ViT sizes given for another model (before any data loads)."""
    from lowbit.nn.models import factory

    if ":" in args.model and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules import
    try:
        factory(args.model)
    except (TypeError, ValueError) as e:
        raise InputError(f"--model: {e}") from None
    given = [f"--{name.replace('_', '-')}" for name in _VIT_SIZES if getattr(args, name) is not None]
    if args.model != "vit" and given:
        raise InputError(f"{', '.join(given)} set(s) the size of --model vit, not of --model {args.model}")


def _model(args: argparse.Namespace, dataset, recipe, seed: int):
    """The ``--model`` for the dataset, quantized by ``recipe``; InputError for one that does not fit."""
    from flax import nnx

    from lowbit.nn import quantize
    from lowbit.nn.models import build
    from lowbit.nn.vit import ViT

    shape = dict(image_shape=dataset.image_shape, num_classes=dataset.num_classes)
    try:
        if args.model == "vit":  # the one built-in model whose sizes are flags
            sizes = {name: getattr(args, name) for name in _VIT_SIZES if getattr(args, name) is not None}
            model = ViT(**shape, **sizes, rngs=nnx.Rngs(seed))
        else:
            model = build(args.model, **shape, seed=seed)
    except (TypeError, ValueError) as e:  # sizes that do not fit the images, a factory with another signature
        raise InputError(f"--model {args.model}: {e}") from None
    return quantize(model, recipe, seed=seed)


def _run(args: argparse.Namespace, dataset, recipe, seed: int, out: Path, *, resume: bool) -> dict[str, Any]:
    """Trains one model; the trainer's metrics plus the run's ``wall_time_s`` and ``compile_time_s``.

    Raises:
        InputError: The model does not fit the data, ``out`` holds an earlier run
            (without ``--resume``/``--overwrite``) or an incompatible checkpoint:
            anything the trainer rejects before it compiles.
        TrainingError: Another process uses ``out``, or too many steps were skipped.
    """
    from lowbit.trainer import train

    start = time.perf_counter()
    model = _model(args, dataset, recipe, seed)
    try:
        with _compile_time() as compiling:
            metrics = train(
                model,
                dataset,
                recipe=recipe,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=seed,
                learning_rate=args.lr,
                weight_decay=args.weight_decay,
                warmup=args.warmup,
                out_dir=out,
                resume=resume,
                overwrite=args.overwrite,
                keep=args.keep,
                max_skipped=args.max_skipped,
                devices=args.devices,
                progress=not args.no_progress,
            )
    except (TypeError, ValueError) as e:  # checkpoint errors included; all raised before the first step
        raise InputError(e) from None
    return dict(metrics, wall_time_s=time.perf_counter() - start, compile_time_s=compiling[0])


def _summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, metrics in runs.items():
        accuracy = [m["test_accuracy"] for m in metrics]
        rows.append(
            dict(
                recipe=name,
                test_accuracy=accuracy,
                test_accuracy_mean=statistics.fmean(accuracy),
                # None, not 0, with one seed: a single run says nothing about the spread.
                test_accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                step_time_ms=statistics.median(m["step_time_ms"] for m in metrics),
                train_time_s=statistics.fmean(m["train_time_s"] for m in metrics),
                wall_time_s=statistics.fmean(m["wall_time_s"] for m in metrics),
                compile_time_s=statistics.fmean(m["compile_time_s"] for m in metrics),
            )
        )
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    for row in rows:  # None when fp32 was not among the recipes
        row["gap_to_fp32_points"] = 100 * (row["test_accuracy_mean"] - base["test_accuracy_mean"]) if base else None
        row["step_time_ratio_to_fp32"] = row["step_time_ms"] / base["step_time_ms"] if base else None
    return rows


def _print_comparison(rows: list[dict[str, Any]], dataset: str, seeds: list[int], epochs: int) -> None:
    header = [
        "recipe",
        "test accuracy (%)",
        "gap to fp32 (points)",
        "step time (ms)",
        "step vs fp32",
        "wall time (s)",
        "compile time (s)",
    ]
    table = []
    for r in rows:
        gap, ratio, std = r["gap_to_fp32_points"], r["step_time_ratio_to_fp32"], r["test_accuracy_std"]
        accuracy = f"{100 * r['test_accuracy_mean']:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
        table.append(
            [
                r["recipe"],
                accuracy,
                "—" if gap is None else f"{gap:+.2f}",
                f"{r['step_time_ms']:.1f}",
                "—" if ratio is None else f"{ratio:.2f}x",
                f"{r['wall_time_s']:.1f}",
                f"{r['compile_time_s']:.1f}",
            ]
        )
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread"
    print_table(
        f"{dataset}, {plural(epochs, 'epoch')}, {plural(len(seeds), 'seed')} "
        f"({', '.join(map(str, seeds))}; {spread}); wall time: whole run, compile included",
        header,
        table,
        left=("recipe",),
    )


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
