"""``lowbit train``: train a model in one recipe (``lowbit compare`` builds on it).

An image dataset trains a classifier (``--model vit|mlp|cnn|PKG.MODULE:FACTORY``);
``--dataset text`` trains a byte language model (``--model lm``) and reports held-out
loss, perplexity and bits per byte, and ``lowbit train`` ends with a greedy sample.

``add_train_parser`` registers the subcommand and sets ``func``, which takes the
parsed arguments and returns the exit status (2 for bad input such as a missing
dataset, an unknown recipe, an unwritable ``--out`` or an incompatible checkpoint).
Every input is checked before the first step compiles.

Imports of jax-using modules stay inside the command function: ``--devices N``
must set ``XLA_FLAGS`` before jax creates its CPU backend.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Iterator
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
from lowbit.cli.output import plural, written
from lowbit.data import DATASETS

__all__ = ["add_train_parser"]

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_STOPPED = 130  # exit status of a run a signal stopped early (the shell's for Ctrl-C)
# Defaults that depend on the dataset: 30 epochs of the 1437 digits take a minute, two of the
# text corpus (~7000 windows of 64 bytes) about as long; a short run needs a short warmup.
_IMAGE_DEFAULTS = dict(epochs=30, warmup=2.0, model="vit")
_TEXT_DEFAULTS = dict(epochs=2, warmup=0.25, model="lm")
_SAMPLE_BYTES = 80  # the greedy sample lowbit train prints after a language model's run


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


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="dataset (default: digits, bundled); text: bytes of local UTF-8 files for --model lm",
    )
    data.add_argument(
        "--data-dir",
        type=absolute_path,
        help="directory with the dataset files (fashion-mnist, cifar10; text: its UTF-8 files, "
        "default: the Python standard library's sources)",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--epochs",
        type=positive_int,
        help=f"passes over the training set (default: {_IMAGE_DEFAULTS['epochs']}; text: {_TEXT_DEFAULTS['epochs']})",
    )
    opt.add_argument("--batch-size", type=positive_int, default=64, help="global batch size (default: 64)")
    opt.add_argument("--lr", type=nonnegative_float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    opt.add_argument("--weight-decay", type=nonnegative_float, default=0.05, help="AdamW weight decay (default: 0.05)")
    opt.add_argument(
        "--warmup",
        type=nonnegative_float,
        help=f"linear warmup in epochs (default: {_IMAGE_DEFAULTS['warmup']:g}; text: {_TEXT_DEFAULTS['warmup']:g})",
    )
    opt.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="data-parallel devices; on CPU, simulated with XLA_FLAGS (default: 1)",
    )
    opt.add_argument(
        "--mesh",
        metavar="AXIS=N,...",
        help="device mesh instead of --devices, from the axes data, fsdp, tensor (e.g. data=2,fsdp=2,tensor=2): "
        "batches split over data and fsdp, weights over fsdp and, as the model annotates them, tensor",
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
        metavar="{vit,mlp,cnn,lm,PKG.MODULE:FACTORY}",
        help="a built-in model, or your factory, called as FACTORY(image_shape=(H, W, C), "
        "num_classes=K, rngs=nnx.Rngs(seed)) (for --dataset text: FACTORY(vocab_size=256, context=T, "
        "rngs=...)) and returning an NNX model; PKG.MODULE is imported from the working directory or "
        "PYTHONPATH (default: vit; for --dataset text: lm)",
    )
    vit = parser.add_argument_group("transformer sizes (--model vit or lm)")
    vit.add_argument(
        "--patch-size", type=positive_int, help="vit: patch side (default: the smallest giving <= 64 patches)"
    )
    vit.add_argument("--dim", type=positive_int, help="token width (default: vit 64, lm 128)")
    vit.add_argument("--depth", type=positive_int, help="transformer blocks (default: 2)")
    vit.add_argument("--heads", type=positive_int, help="attention heads (default: 4)")
    vit.add_argument("--mlp-dim", type=positive_int, help="MLP hidden width (default: vit 128, lm 4 x dim)")
    vit.add_argument("--dropout", type=nonnegative_float, help="dropout rate, < 1 (default: 0)")
    vit.add_argument(
        "--context", type=positive_int, help="lm: bytes per example, the model's sequence length (default: 64)"
    )
    # No choices=: the allowed names live in lowbit.nn.lm, which imports jax (see the module docstring).
    vit.add_argument("--positions", metavar="{learned,rotary}", help="lm: position encoding (default: learned)")


def _train_command(args: argparse.Namespace) -> int:
    from lowbit.trainer import TrainingError

    try:
        _dataset_defaults(args)
        _use_devices(args)
        (recipe,) = _recipes(args, [args.recipe])
        out = args.out or absolute_path(f"runs/{recipe.name}-{args.dataset}-seed{args.seed}")
        check_output_dir(out)
        _check_model(args)
        dataset = _dataset(args)
        since = time.time()
        metrics = _run(args, dataset, recipe, args.seed, out, resume=args.resume, sample=True)
    except InputError as e:
        return fail("train", e)
    except TrainingError as e:
        return fail("train", e, status=1)
    if not metrics["stopped"]:
        print(_summary(metrics))
    if metrics.get("sample") is not None:
        print(metrics["sample"])
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
    if "bits_per_byte" in metrics:  # a language model
        test_loss, perplexity, bits = (metrics[k] for k in ("test_loss", "perplexity", "bits_per_byte"))
        score_text = (
            "held-out loss n/a"
            if test_loss is None or bits is None
            else f"held-out loss {test_loss:.4f}, perplexity {perplexity:.2f}, {bits:.3f} bits/byte"
        )
    else:
        accuracy = metrics["test_accuracy"]
        score_text = "test accuracy " + ("n/a" if accuracy is None else f"{100 * accuracy:.2f}%")
    return (
        f"{metrics['recipe']} on {metrics['dataset']}, {plural(metrics['epochs'], 'epoch')}, "
        f"seed {metrics['seed']}: {score_text}, {loss_text}, {metrics['train_time_s']:.1f} s "
        f"({step_text}), {plural(metrics['skipped_steps'], 'skipped step')}"
    )


def _use_devices(args: argparse.Namespace) -> None:
    """Asks XLA for ``--devices`` host devices and checks that jax got them.

    The flag only takes effect if jax's backend has not started yet; the check
    catches the case where something in this process already started it.
    """
    n = args.devices
    if args.batch_size % n:
        raise InputError(f"--batch-size {args.batch_size} is not divisible by --devices {n}")
    if args.mesh is not None:
        from lowbit.trainer.sharding import BATCH_AXES, parse_mesh  # creates no arrays: XLA_FLAGS still apply

        if n != 1:
            raise InputError(f"give --devices ({n}) or --mesh ({args.mesh}), not both")
        try:
            sizes = parse_mesh(args.mesh)
        except ValueError as e:
            raise InputError(f"--mesh {args.mesh}: {e}") from None
        shards = math.prod(sizes[a] for a in BATCH_AXES)
        if args.batch_size % shards:
            raise InputError(f"--batch-size {args.batch_size} is not divisible by the mesh's data × fsdp = {shards}")
        n = math.prod(sizes.values())
    previous = os.environ.get("XLA_FLAGS")
    if n > 1:
        flags = re.sub(rf"{_DEVICE_FLAG}=\S*", "", previous or "")
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()
    import jax

    if len(jax.devices()) < n:
        # The flag came too late: put the environment back, so a process that goes on
        # (a test runner) does not hand a device count it never got to its subprocesses.
        if previous is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = previous
        raise InputError(
            f"{n} devices (--devices/--mesh): jax sees only {len(jax.devices())} devices (its backend started before "
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
        dataset = data.load(args.dataset, args.data_dir, **({"context": args.context} if args.context else {}))
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
_LM_SIZES = ("dim", "depth", "heads", "mlp_dim", "dropout", "positions")  # --context sizes the data too


def _dataset_defaults(args: argparse.Namespace) -> None:
    """Fills the flags whose default depends on ``--dataset`` (left None by the parser)."""
    defaults = _TEXT_DEFAULTS if args.dataset == "text" else _IMAGE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_model(args: argparse.Namespace) -> None:
    """Fails on a ``--model`` that does not resolve or does not fit ``--dataset``, or sizes given for
    another model (before any data loads)."""
    from lowbit.nn.models import MODELS, TEXT_MODELS, factory

    if ":" in args.model and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules import
    try:
        factory(args.model)
    except (TypeError, ValueError) as e:
        raise InputError(f"--model: {e}") from None
    text = args.dataset == "text"
    if args.model in MODELS and (args.model in TEXT_MODELS) != text:
        wanted = (
            f"--dataset text needs a language model: --model {', '.join(sorted(TEXT_MODELS))} or PKG.MODULE:FACTORY"
            if text
            else f"--model {args.model} trains on --dataset text, not on {args.dataset}"
        )
        raise InputError(f"--model {args.model} does not fit --dataset {args.dataset}: {wanted}")
    if args.context is not None and not text:
        raise InputError(f"--context sets the window of --dataset text, not of --dataset {args.dataset}")
    own = {"vit": _VIT_SIZES, "lm": _LM_SIZES}.get(args.model, ())
    sizes = dict.fromkeys(_VIT_SIZES + _LM_SIZES)
    if given := [
        f"--{name.replace('_', '-')}" for name in sizes if name not in own and getattr(args, name) is not None
    ]:
        owner = "vit" if all(name.lstrip("-").replace("-", "_") in _VIT_SIZES for name in given) else "lm"
        raise InputError(f"{', '.join(given)} set(s) the size of --model {owner}, not of --model {args.model}")


def _model(args: argparse.Namespace, dataset, recipe, seed: int):
    """The ``--model`` for the dataset, quantized by ``recipe``; InputError for one that does not fit."""
    from flax import nnx

    from lowbit.nn import quantize
    from lowbit.nn.lm import LM
    from lowbit.nn.models import build
    from lowbit.nn.vit import ViT

    if args.dataset == "text":
        shape = dict(vocab_size=dataset.num_classes, context=dataset.context)
    else:
        shape = dict(image_shape=dataset.image_shape, num_classes=dataset.num_classes)
    # The built-in models whose sizes are flags.
    sized = {"vit": (ViT, _VIT_SIZES), "lm": (LM, _LM_SIZES)}
    try:
        if args.model in sized:
            cls, names = sized[args.model]
            sizes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
            model = cls(**shape, **sizes, rngs=nnx.Rngs(seed))
        else:
            model = build(args.model, **shape, seed=seed)
    except (TypeError, ValueError) as e:  # sizes that do not fit the images, a factory with another signature
        raise InputError(f"--model {args.model}: {e}") from None
    return quantize(model, recipe, seed=seed)


def _run(
    args: argparse.Namespace, dataset, recipe, seed: int, out: Path, *, resume: bool, sample: bool = False
) -> dict[str, Any]:
    """Trains one model; the trainer's metrics plus the run's ``wall_time_s`` and ``compile_time_s``.

    With ``sample``, a language model's finished run also gets ``sample``: the line
    showing its greedy continuation of the held-out text's first bytes (else None).

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
                mesh=args.mesh,
                progress=not args.no_progress,
            )
    except (TypeError, ValueError) as e:  # checkpoint errors included; all raised before the first step
        raise InputError(e) from None
    wall = time.perf_counter() - start
    shown = _sample(model, dataset) if sample and args.dataset == "text" and not metrics["stopped"] else None
    return dict(metrics, wall_time_s=wall, compile_time_s=compiling[0], sample=shown)


def _sample(model, dataset) -> str:
    """One line: the model's greedy continuation of the held-out split's first bytes, non-printables escaped.

    The prompt comes from the corpus itself (whatever language it is in) and is the
    same for every run on it.
    """
    from lowbit.nn.lm import greedy

    prompt = bytes(dataset.x_test[0, : min(32, dataset.context)].astype("uint8"))
    continuation = greedy(model, prompt, _SAMPLE_BYTES, context=dataset.context)
    return f"greedy sample ({_SAMPLE_BYTES} bytes): {_escape(prompt)} -> {_escape(continuation)}"


def _escape(data: bytes) -> str:
    """``data`` quoted on one line: printable ASCII as is, ``\\n``/``\\t`` and ``\\xNN`` otherwise."""
    named = {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x5C: "\\\\", 0x22: '\\"'}
    return '"' + "".join(named.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in data) + '"'
