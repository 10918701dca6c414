"""``lowbit ptq`` and ``lowbit finetune``: post-training quantization of a trained model.

``lowbit ptq --method`` picks the pass: ``calibrate`` (the default, and all
``lowbit ptq`` did before it had methods: static activation scales calibrated on
training images, ``PTQConfig``) or a weight method (``rtn``, ``gptq``, ``awq``,
``smoothquant``, ``smoothquant+gptq``: ``WeightPTQConfig``, ``lowbit.ptq.weights.quantize_weights``).
An option of one kind of pass given to another is a one-line error naming both;
so that "given" is known, those options default to None here and the config
classes hold the defaults.

Each ``add_*_parser`` registers one subcommand and sets ``func``, which takes the
parsed arguments and returns the exit status (2 for bad input: a missing or
mismatched checkpoint, an unknown format, a missing dataset).

The choices come from ``lowbit.ptq.config`` (one list each, shared with the
library; that module loads without Flax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

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
from lowbit.ptq.config import (
    CALIBRATE,
    CALIBRATIONS,
    GELU,
    LAYERNORM,
    METHODS,
    PTQ_METHODS,
    SOFTMAX,
    WEIGHT_CALIBRATIONS,
    WEIGHT_METHODS,
    PTQConfig,
    WeightPTQConfig,
)

__all__ = ["add_finetune_parser", "add_ptq_parser"]

# Options (argparse dests) of one kind of --method only. --method calibrate's:
_CALIBRATE_ONLY = (
    "calibration",
    "weight_calibration",
    "granularity",
    "percentile",
    "dynamic",
    "noisy_bias",
    "softmax",
    "gelu",
    "layernorm",
    "sweep",
)
_WEIGHT_METHOD_ONLY = ("group_size", "include", "exclude", "rotate")
# A weight method's own settings: each a field of its settings (WEIGHT_METHODS) or of the method it composes
# (``then``), so it applies to the methods that have that field.
_METHOD_SETTINGS = ("damping", "act_order", "alpha")
_WEIGHT_NAMES = ", ".join(WEIGHT_METHODS)
NONE = "none"  # --activations none: float activations (weight-only)


def _granularity(text: str) -> tuple[str, int | None]:
    if text in ("tensor", "channel"):
        return text, None
    kind, _, size = text.partition(":")
    if kind == "group" and size.isdigit() and int(size) >= 1:
        return "group", int(size)
    raise argparse.ArgumentTypeError(f"expected tensor, channel or group:N (N >= 1), got {text!r}")


def _group_size(text: str) -> int:
    """``--group-size``: N >= 1 inputs per scale; ``0`` or ``channel``: one scale per output channel (0)."""
    if text == "channel":
        return 0
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected N >= 1, 0 or channel (per output channel), got {text!r}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _fields(config: Any) -> dict[str, object]:
    """A method config's settings by name: its fields, and those of the method it composes (``then``)."""
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    then = own.pop("then", None)
    return own | ({} if then is None else _fields(then))


def _methods_with(dest: str) -> tuple[str, ...]:
    """The --method values that option ``dest`` applies to."""
    if dest in _CALIBRATE_ONLY:
        return (CALIBRATE,)
    if dest in _WEIGHT_METHOD_ONLY:
        return tuple(WEIGHT_METHODS)
    return tuple(n for n, m in WEIGHT_METHODS.items() if dest in _fields(m))


def _default(method: str, dest: str) -> object:
    """The default of setting ``dest`` of weight method ``method`` (its reference settings)."""
    return _fields(WEIGHT_METHODS[method])[dest]


def _with(config: Any, settings: dict[str, object]) -> Any:
    """``config`` with ``settings`` (its own fields or its ``then`` method's), checked by the config classes."""
    then = getattr(config, "then", None)
    if then is not None:
        inner = {k: v for k, v in settings.items() if k in _fields(then)}
        settings = {k: v for k, v in settings.items() if k not in inner} | {"then": _with(then, inner)}
    return dataclasses.replace(config, **settings)


def _for(dest: str) -> str:
    """The --method values option ``dest`` applies to, for its help."""
    return " / ".join(_methods_with(dest))


def _check_applies(args: argparse.Namespace) -> None:
    """Raises InputError for an option given that the chosen --method does not take."""
    for dest in _CALIBRATE_ONLY + _WEIGHT_METHOD_ONLY + _METHOD_SETTINGS:
        if getattr(args, dest) is not None and args.method not in _methods_with(dest):
            raise InputError(
                f"{_flag(dest)} does not apply to --method {args.method}; it applies to --method {_for(dest)}"
            )
    if args.method == CALIBRATE and args.activations == NONE:
        raise InputError(
            f"--activations {NONE} does not apply to --method {CALIBRATE} (it calibrates activation scales); "
            f"weight-only quantization is --method {_for('group_size')}"
        )


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
        "--seed",
        type=seed_value,
        default=0,
        help="calibration sample / data order seed (and ptq --rotate's signs), 0 .. 2**63-1 (default: 0)",
    )


def add_ptq_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit ptq``."""
    parser = subparsers.add_parser(
        "ptq",
        help="post-training quantization of a trained model",
        description="Quantize every matmul and convolution of a trained model (vit, mlp, cnn or your own) "
        "and score it; writes metrics.json (method, settings, accuracy, per-op SQNR) and layer_sqnr.png. "
        f"--method {CALIBRATE} (the default) calibrates static activation scales on training images; "
        f"{_WEIGHT_NAMES} quantize the weights from the calibration images' inputs to "
        "each op (weight-only, or with --activations int8: W8A8, W4A8). "
        "--sweep scores a grid of calibrated settings instead and writes ptq_sweep.md/.json.",
    )
    _add_source(parser)
    q = parser.add_argument_group("quantization")
    q.add_argument(
        "--method",
        choices=PTQ_METHODS,
        default=CALIBRATE,
        help=f"{CALIBRATE}: calibrated static activations, round-to-nearest weights; {_WEIGHT_NAMES}: "
        f"a weight method on every op (default: {CALIBRATE})",
    )
    q.add_argument(
        "--weights",
        help="weight format: intN, float8_e4m3fn, float4_e2m1fn, nf4 (weight methods), ... "
        f"(default: {PTQConfig.weights} with --method {CALIBRATE}, {WeightPTQConfig.weights} with a weight method)",
    )
    q.add_argument(
        "--activations",
        help=f"activation format, or {NONE} (weight methods: float activations, W4A16) "
        f"(default: {PTQConfig.activations} with --method {CALIBRATE}, {NONE} with a weight method)",
    )
    w = parser.add_argument_group(f"weight methods ({_WEIGHT_NAMES})")
    w.add_argument(
        "--group-size",
        type=_group_size,
        help="inputs per weight scale; 0 or channel: one scale per output channel "
        f"(default: {WeightPTQConfig.group_size})",
    )
    w.add_argument(
        "--include", help="regex on op names (path:key, e.g. 'blocks/.*'): the ops to quantize (default: all)"
    )
    w.add_argument(
        "--exclude",
        help="regex on op names: ops that stay float, e.g. 'patch_embed:.*' (its few inputs fit no group size)",
    )
    w.add_argument(
        "--rotate",
        action="store_true",
        default=None,
        help="random-Hadamard rotation of each op's inputs and weights before quantization (QuaRot / QuIP#): "
        "spreads outlier channels; the ops rotate their inputs online; signs from --seed",
    )
    w.add_argument(
        "--damping",
        type=nonnegative_float,
        help=f"{_for('damping')}: Hessian damping, a fraction of its mean diagonal "
        f"(default: {_default('gptq', 'damping')})",
    )
    w.add_argument(
        "--act-order",
        action="store_true",
        default=None,
        help=f"{_for('act_order')}: quantize inputs by descending Hessian diagonal",
    )
    w.add_argument(
        "--alpha",
        type=nonnegative_float,
        help=f"{_for('alpha')}: migration strength in [0, 1] (default: {_default('smoothquant', 'alpha')})",
    )
    q = parser.add_argument_group(f"--method {CALIBRATE}")
    q.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        help=f"activation clip source (default: {PTQConfig.calibration})",
    )
    q.add_argument(
        "--weight-calibration",
        choices=WEIGHT_CALIBRATIONS,
        help="weight clip source (default: as --calibration; kl -> mse)",
    )
    q.add_argument(
        "--granularity",
        type=_granularity,
        help=f"weight scales: tensor, channel or group:N (default: {PTQConfig.granularity})",
    )
    q.add_argument("--percentile", type=float, help=f"for --calibration percentile (default: {PTQConfig.percentile})")
    q.add_argument(
        "--dynamic", action="store_true", default=None, help="activation scales from every batch, not calibration"
    )
    q.add_argument(
        "--noisy-bias",
        action="store_true",
        default=None,
        help="NoisyQuant: fixed noise before each linear op's input quantizer, removed in its bias",
    )
    vit = parser.add_argument_group(
        f"ViT-specific activations (--method {CALIBRATE}; on the built-in ViT's attention, MLP and LayerNorm ops)"
    )
    vit.add_argument(
        "--softmax",
        choices=SOFTMAX,
        help=f"attention probabilities: uniform, log2 (FQ-ViT), twin (PTQ4ViT) (default: {PTQConfig.softmax})",
    )
    vit.add_argument(
        "--gelu",
        choices=GELU,
        help=f"MLP hidden activations: uniform or twin (PTQ4ViT) (default: {PTQConfig.gelu})",
    )
    vit.add_argument(
        "--layernorm",
        choices=LAYERNORM,
        help=f"LayerNorm outputs: tensor, channel (RepQ-ViT folding) or ptf (FQ-ViT) (default: {PTQConfig.layernorm})",
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
        default=None,
        help=f"--method {CALIBRATE}: score W8A8, W6A6, W4A8, W4A4 (integer and float formats) x every "
        "calibration method",
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
    # A language model reads windows of its own context length; an image model the dataset's images.
    context = model.config.get("context") if "image_shape" not in model.config else None
    try:
        dataset = data.load(meta.get("dataset", ""), args.data_dir, context=context)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(e) from None
    if context is None and tuple(model.config["image_shape"]) != dataset.image_shape:
        raise InputError(
            f"checkpoint {args.checkpoint} expects {model.config['image_shape']} images; "
            f"{dataset.name} has {list(dataset.image_shape)}"
        )
    return model, meta, dataset


def _given(fields: dict[str, Any], keep: str | None = None) -> dict[str, Any]:
    """``fields`` without the options not given (None; ``keep``'s None is a value), so the defaults apply."""
    return {k: v for k, v in fields.items() if v is not None or k == keep}


def _config(args: argparse.Namespace, **override) -> PTQConfig | WeightPTQConfig:
    """The run's setting from the flags; the options not given keep the config class's defaults."""
    _check_applies(args)
    try:
        if args.method != CALIBRATE:
            settings = {d: getattr(args, d) for d in _METHOD_SETTINGS if getattr(args, d) is not None}
            fields = dict(
                method=_with(WEIGHT_METHODS[args.method], settings),
                weights=args.weights,
                activations=None if args.activations == NONE else args.activations,
                include=args.include,
                exclude=args.exclude,
                rotate=args.rotate,
                samples=args.samples,
                batch_size=args.batch_size,
                seed=args.seed,
            )
            if args.group_size is not None:
                fields["group_size"] = args.group_size or None  # 0: per output channel
            return WeightPTQConfig(**_given(fields, keep="group_size") | override)
        fields = dict(
            weights=args.weights,
            activations=args.activations,
            calibration=args.calibration,
            weight_calibration=args.weight_calibration,
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
        if args.granularity is not None:
            fields["granularity"], fields["group_size"] = args.granularity
        return PTQConfig(**_given(fields) | override)
    except ValueError as e:
        raise InputError(e) from None


def _setting(cfg: PTQConfig | WeightPTQConfig) -> tuple[str, str]:
    """``(default output directory name, what the summary line says of the setting)``."""
    if isinstance(cfg, WeightPTQConfig):
        group = "channel" if cfg.group_size is None else f"g{cfg.group_size}"
        activations = cfg.activations or "float"
        rotated = "-rotated" if cfg.rotate else ""
        return (
            f"ptq-{cfg.method.name}-{cfg.label}-{cfg.weights}-{group}-{activations}{rotated}",
            f"{cfg.method.name}{', rotated' if cfg.rotate else ''}, {cfg.weights} weights ({group}), "
            f"{activations} activations",
        )
    return (
        f"ptq-{cfg.label}-{cfg.weights}-{cfg.activations}-{cfg.calibration}",
        f"{cfg.weights} weights, {cfg.activations} activations, {cfg.calibration} calibration",
    )


def _ptq_command(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)  # bad flags fail before the checkpoint is read
        name, setting = _setting(cfg)
        out = args.out or absolute_path(f"runs/{'ptq-sweep' if args.sweep else name}")
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

        try:
            _, metrics = ptq(model, dataset, cfg, images=images)
        except ValueError as e:
            if isinstance(cfg, PTQConfig):  # its settings were checked above: anything else is a bug
                raise
            # What only the model's ops decide: a group size that does not divide an op's inputs, a
            # Hessian singular even with damping (too few --samples).
            raise InputError(e) from None
    except InputError as e:
        return fail("ptq", e)
    metrics.update(checkpoint=str(args.checkpoint), calibration_data=args.calibration_data)
    files = write_report(out, metrics)
    errors = [r for r in metrics["ops"] if "error" in r]
    versus_rtn = (
        f"; op output error {sum(r['error'] for r in errors) / len(errors):.3g} "
        f"(RTN {sum(r['rtn_error'] for r in errors) / len(errors):.3g}, mean over {len(errors)} ops)"
        if errors
        else ""
    )
    score = (
        f"held-out {metrics['bits_per_byte']:.3f} bits/byte (float {metrics['float_bits_per_byte']:.3f}, "
        f"{metrics['bits_per_byte_increase']:+.3f})"
        if "bits_per_byte" in metrics
        else f"test accuracy {100 * metrics['test_accuracy']:.2f}% "
        f"(float {100 * metrics['float_accuracy']:.2f}%, {-metrics['accuracy_drop_points']:+.2f} points)"
    )
    print(
        f"{cfg.label} ({setting}, {args.calibration_data} data): {score}; "
        f"lowest op SQNR {min(r['sqnr_db'] for r in metrics['ops']):.1f} dB{versus_rtn}"
    )
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def _sweep(args: argparse.Namespace, model, dataset, images, out: Path) -> int:
    from lowbit.ptq.sweep import markdown, sweep

    base = _config(args)
    assert isinstance(base, PTQConfig)  # --sweep is a --method calibrate option (_check_applies)
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
    score = (
        f"held-out {metrics['bits_per_byte_before']:.3f} -> {metrics['bits_per_byte']:.3f} bits/byte"
        if "bits_per_byte" in metrics
        else f"float accuracy {100 * metrics['float_accuracy_before']:.2f}% -> {100 * metrics['float_accuracy']:.2f}%"
    )
    print(f"fine-tuned ({cfg.method}, {cfg.target_format}) for {plural(cfg.epochs, 'epoch')}: {score}")
    print(f"wrote {path} and {out}/metrics.json; next: lowbit ptq --checkpoint {out}")
    return 0
