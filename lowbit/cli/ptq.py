"""``lowbit ptq`` and ``lowbit finetune``: post-training quantization of a trained model.

Each ``add_*_parser`` registers one subcommand and sets ``func``, which takes the
parsed arguments and returns the exit status (2 for bad input: a missing or
mismatched checkpoint, an unknown format, a missing dataset).

The choices come from ``lowbit.ptq.config`` (one list each, shared with the
library; that module loads without Flax).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.cli.args import (
    InputError,
    absolute_path,
    check_output_dir,
    fail,
    nonnegative_float,
    positive_int,
    seed_value,
)
from lowbit.cli.output import plural
from lowbit.ptq.config import CALIBRATIONS, GELU, LAYERNORM, METHODS, SOFTMAX, WEIGHT_CALIBRATIONS

__all__ = ["add_finetune_parser", "add_ptq_parser"]


def _granularity(text: str) -> tuple[str, int | None]:
    if text in ("tensor", "channel"):
        return text, None
    kind, _, size = text.partition(":")
    if kind == "group" and size.isdigit() and int(size) >= 1:
        return "group", int(size)
    raise argparse.ArgumentTypeError(f"expected tensor, channel or group:N (N >= 1), got {text!r}")


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=absolute_path,
        required=True,
        help="the --out directory of `lowbit train` (or one of its checkpoints)",
    )
    parser.add_argument(
        "--data-dir", type=absolute_path, help="directory with the dataset files (default: the dataset's usual place)"
    )
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="calibration sample / data order seed, 0 .. 2**63-1 (default: 0)"
    )


def add_ptq_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit ptq``."""
    parser = subparsers.add_parser(
        "ptq",
        help="post-training quantization of a trained model",
        description="Calibrate static activation scales on training images, quantize every matmul and "
        "convolution of a trained model (vit, mlp, cnn or your own) and score it; writes metrics.json "
        "(accuracy, per-op SQNR) and layer_sqnr.png. "
        "--sweep scores a grid of settings instead and writes ptq_sweep.md/.json.",
    )
    _add_source(parser)
    q = parser.add_argument_group("quantization")
    q.add_argument(
        "--weights", default="int8", help="weight format: intN, float8_e4m3fn, float4_e2m1fn, ... (default: int8)"
    )
    q.add_argument("--activations", default="int8", help="activation format (default: int8)")
    q.add_argument(
        "--calibration", choices=CALIBRATIONS, default="absmax", help="activation clip source (default: absmax)"
    )
    q.add_argument(
        "--weight-calibration",
        choices=WEIGHT_CALIBRATIONS,
        help="weight clip source (default: as --calibration; kl -> mse)",
    )
    q.add_argument(
        "--granularity",
        type=_granularity,
        default=("channel", None),
        help="weight scales: tensor, channel or group:N (default: channel)",
    )
    q.add_argument("--percentile", type=float, default=99.99, help="for --calibration percentile (default: 99.99)")
    q.add_argument("--dynamic", action="store_true", help="activation scales from every batch, not calibration")
    q.add_argument(
        "--noisy-bias",
        action="store_true",
        help="NoisyQuant: fixed noise before each linear op's input quantizer, removed in its bias",
    )
    vit = parser.add_argument_group("ViT-specific activations (on the built-in ViT's attention, MLP and LayerNorm ops)")
    vit.add_argument(
        "--softmax",
        choices=SOFTMAX,
        default="uniform",
        help="attention probabilities: uniform, log2 (FQ-ViT), twin (PTQ4ViT) (default: uniform)",
    )
    vit.add_argument(
        "--gelu",
        choices=GELU,
        default="uniform",
        help="MLP hidden activations: uniform or twin (PTQ4ViT) (default: uniform)",
    )
    vit.add_argument(
        "--layernorm",
        choices=LAYERNORM,
        default="tensor",
        help="LayerNorm outputs: tensor, channel (RepQ-ViT folding) or ptf (FQ-ViT) (default: tensor)",
    )
    cal = parser.add_argument_group("calibration data")
    cal.add_argument("--samples", type=positive_int, default=512, help="calibration images (default: 512)")
    cal.add_argument("--batch-size", type=positive_int, default=64, help="calibration batch size (default: 64)")
    cal.add_argument(
        "--calibration-data",
        choices=("real", "synthetic"),
        default="real",
        help="training images, or images synthesised from the model (PSAQ-ViT) (default: real)",
    )
    cal.add_argument(
        "--synthetic-steps",
        type=positive_int,
        default=200,
        help="optimisation steps per synthetic batch (default: 200)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="score W8A8, W6A6, W4A8, W4A4 (integer and float formats) x every calibration method",
    )
    parser.add_argument("--out", type=absolute_path, help="output directory (default: runs/ptq-<setting>)")
    parser.set_defaults(func=_ptq_command)
    return parser


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a trained model to survive PTQ",
        description="Fine-tune a trained float model so that post-training quantization to --target-format hurts "
        "less: adaptive quantization noise, an outlier penalty, both, or neither (plain, a control). "
        "Writes a checkpoint that `lowbit ptq --checkpoint` reads, and metrics.json.",
    )
    _add_source(parser)
    parser.add_argument("--method", choices=METHODS, required=True, help="what to fine-tune with")
    parser.add_argument("--target-format", default="int4", help="the PTQ format the noise imitates (default: int4)")
    parser.add_argument(
        "--no-activation-noise", action="store_true", help="noise on the weights only (default: weights and op inputs)"
    )
    parser.add_argument(
        "--outlier-weight", type=nonnegative_float, default=1.0, help="weight of the outlier penalty (default: 1)"
    )
    parser.add_argument(
        "--outlier-threshold",
        type=nonnegative_float,
        default=3.0,
        help="values beyond this many RMS count as outliers (default: 3)",
    )
    parser.add_argument("--epochs", type=positive_int, default=2, help="passes over the training set (default: 2)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=nonnegative_float, default=3e-4, help="peak AdamW learning rate (default: 3e-4)")
    parser.add_argument("--out", type=absolute_path, help="output directory (default: runs/finetune-<method>-<format>)")
    parser.set_defaults(func=_finetune_command)
    return parser


def _load(args: argparse.Namespace):
    """The checkpoint's model and metadata, and its dataset."""
    from lowbit import data
    from lowbit.ptq import CheckpointError, load_model

    try:
        model, meta = load_model(args.checkpoint)
    except CheckpointError as e:
        raise InputError(e) from None
    if meta.get("recipe") not in ("fp32", "bf16", "fp16"):
        raise InputError(
            f"checkpoint {args.checkpoint} was trained with recipe {meta.get('recipe')!r}; "
            "PTQ starts from a float model (fp32, bf16 or fp16)"
        )
    try:
        dataset = data.load(meta.get("dataset", ""), args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(e) from None
    if tuple(model.config["image_shape"]) != dataset.image_shape:
        raise InputError(
            f"checkpoint {args.checkpoint} expects {model.config['image_shape']} images; "
            f"{dataset.name} has {list(dataset.image_shape)}"
        )
    return model, meta, dataset


def _config(args: argparse.Namespace, **override):
    from lowbit.ptq import PTQConfig

    granularity, group = args.granularity
    fields = dict(
        weights=args.weights,
        activations=args.activations,
        calibration=args.calibration,
        weight_calibration=args.weight_calibration,
        granularity=granularity,
        group_size=group,
        percentile=args.percentile,
        softmax=args.softmax,
        gelu=args.gelu,
        layernorm=args.layernorm,
        dynamic=args.dynamic,
        noisy_bias=args.noisy_bias,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    try:
        return PTQConfig(**(fields | override))
    except ValueError as e:
        raise InputError(e) from None


def _ptq_command(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)  # bad flags fail before the checkpoint is read
        default = "ptq-sweep" if args.sweep else f"ptq-{cfg.label}-{cfg.weights}-{cfg.activations}-{cfg.calibration}"
        out = args.out or absolute_path(f"runs/{default}")
        check_output_dir(out)
        model, _, dataset = _load(args)
        images = None
        if args.calibration_data == "synthetic":
            from lowbit.ptq.datafree import synthesize

            try:
                images = synthesize(model, args.samples, steps=args.synthetic_steps, seed=args.seed)
            except ValueError as e:  # a model without the ViT's attention ops
                raise InputError(e) from None
        if args.sweep:
            return _sweep(args, model, dataset, images, out)
        from lowbit.ptq import ptq, write_report

        _, metrics = ptq(model, dataset, cfg, images=images)
    except InputError as e:
        return fail("ptq", e)
    metrics.update(checkpoint=str(args.checkpoint), calibration_data=args.calibration_data)
    files = write_report(out, metrics)
    print(
        f"{cfg.label} ({cfg.weights} weights, {cfg.activations} activations, {cfg.calibration} calibration, "
        f"{args.calibration_data} data): test accuracy {100 * metrics['test_accuracy']:.2f}% "
        f"(float {100 * metrics['float_accuracy']:.2f}%, {-metrics['accuracy_drop_points']:+.2f} points); "
        f"lowest op SQNR {min(r['sqnr_db'] for r in metrics['ops']):.1f} dB"
    )
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def _sweep(args: argparse.Namespace, model, dataset, images, out: Path) -> int:
    from lowbit.ptq.sweep import markdown, sweep

    base = _config(args)
    result = sweep(model, dataset, base, images=images, log=lambda line: print(line, flush=True))
    result.update(checkpoint=str(args.checkpoint), calibration_data=args.calibration_data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ptq_sweep.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "ptq_sweep.md").write_text(table)
    print(table)
    print(f"wrote {out}/ptq_sweep.json and {out}/ptq_sweep.md")
    return 0


def _finetune_command(args: argparse.Namespace) -> int:
    from lowbit.ptq import save_model
    from lowbit.ptq.finetune import FinetuneConfig, finetune

    try:
        cfg = FinetuneConfig(
            method=args.method,
            target_format=args.target_format,
            noise_activations=not args.no_activation_noise,
            outlier_weight=args.outlier_weight,
            outlier_threshold=args.outlier_threshold,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        out = args.out or absolute_path(f"runs/finetune-{cfg.method}-{cfg.target_format}")
        check_output_dir(out)
        model, meta, dataset = _load(args)
        if args.batch_size > len(dataset.x_train):
            raise InputError(f"--batch-size {args.batch_size} exceeds the {len(dataset.x_train)} training examples")
    except (ValueError, InputError) as e:
        return fail("finetune", e)
    metrics = finetune(model, dataset, cfg)
    path = save_model(
        model,
        out,
        cfg.epochs,
        dict(
            dataset=dataset.name, hparams=meta.get("hparams"), finetune=metrics["config"], source=str(args.checkpoint)
        ),
        recipe=meta["recipe"],
        spec=(meta.get("model") or {}).get("spec"),
    )
    metrics.update(checkpoint=str(path), source=str(args.checkpoint), dataset=dataset.name)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"fine-tuned ({cfg.method}, {cfg.target_format}) for {plural(cfg.epochs, 'epoch')}: float accuracy "
        f"{100 * metrics['float_accuracy_before']:.2f}% -> {100 * metrics['float_accuracy']:.2f}%"
    )
    print(f"wrote {path} and {out}/metrics.json; next: lowbit ptq --checkpoint {out}")
    return 0
