"""One PTQ run end to end: quantize a copy of the model, score it, report per-op errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lowbit.data import Dataset, is_text
from lowbit.nn.quantize import is_quantized
from lowbit.ptq.calibrate import quantize_model
from lowbit.ptq.capture import probe
from lowbit.ptq.config import CALIBRATE, PTQConfig, WeightPTQConfig
from lowbit.ptq.evaluate import evaluate, op_sqnr, plot_ops
from lowbit.ptq.weights import quantize_weights

__all__ = ["calibration_images", "ptq", "write_report"]

SQNR_IMAGES = 128  # test images the per-op SQNRs are measured on


def calibration_images(dataset: Dataset, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` training inputs (images, or token windows) drawn without replacement (all if there are fewer)."""
    n = min(samples, len(dataset.x_train))
    return dataset.x_train[np.random.default_rng(seed).choice(len(dataset.x_train), n, replace=False)]


def ptq(
    model: nnx.Module,
    dataset: Dataset,
    cfg: PTQConfig | WeightPTQConfig,
    *,
    images: np.ndarray | None = None,
    float_accuracy: float | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Quantize a copy of ``model`` with ``cfg`` and score it on ``dataset``'s test set.

    Args:
      model: the float NNX model; left unchanged.
      dataset: calibration inputs come from its training set, scores from its test set
        (images, or a ``lowbit.text.TextDataset`` for a language model).
      cfg: the PTQ setting: ``PTQConfig`` (method ``calibrate``) or
        ``WeightPTQConfig`` (a weight method: RTN, GPTQ, AWQ, SmoothQuant).
      images: calibration images to use instead of ``cfg.samples`` training
        images (e.g. synthetic ones).
      float_accuracy: the float model's test accuracy, if already known.

    Returns:
      ``(quantized_model, metrics)`` with ``metrics``: ``method``, ``config``,
      ``label`` (``W8A8`` ...), ``float_accuracy``, ``test_accuracy``,
      ``accuracy_drop_points`` and ``ops`` (per op, in forward order: its
      ``name``, what quantized it, ``sqnr_db``, ``lhs_sqnr_db``,
      ``rhs_sqnr_db``; a weight method's rows add ``error`` and ``rtn_error``,
      ``lowbit.ptq.weights.quantize_weights``'s relative output errors, and
      have no ``rhs_sqnr_db``: the model holds the dequantized weights, so its
      weights are no longer quantized as it runs). A language model
      (``lowbit.text.TextDataset``: accuracy is per next-byte prediction) adds
      ``float_test_loss`` and ``test_loss`` (nats per byte),
      ``float_bits_per_byte``, ``bits_per_byte`` and ``bits_per_byte_increase``.
    """
    if images is None:
        images = calibration_images(dataset, cfg.samples, cfg.seed)
    if isinstance(cfg, WeightPTQConfig):
        batches = [images[i : i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)]
        quantized, rows = quantize_weights(
            model,
            batches,
            weights=cfg.weight_quantizer,
            method=cfg.method,
            activations=cfg.activation_quantizer,
            include=cfg.include,
            exclude=cfg.exclude,
            rotate=cfg.rotate,
            seed=cfg.seed,
        )
        method = cfg.method.name
        if not is_quantized(quantized):  # weight-only: an ordinary model; probing finds its ops for op_sqnr
            quantized = probe(quantized, images[:1])
    else:
        quantized, rows = quantize_model(model, images, cfg)
        method = CALIBRATE
    text = is_text(dataset)
    # The float model's scores: its accuracy may be given (a sweep scores it once); its loss is not.
    before = evaluate(model, dataset.x_test, dataset.y_test) if float_accuracy is None or text else {}
    after = evaluate(quantized, dataset.x_test, dataset.y_test)
    if float_accuracy is None:
        float_accuracy = before["accuracy"]
    errors = {r["name"]: r for r in op_sqnr(model, quantized, dataset.x_test[:SQNR_IMAGES])}
    per_op = [dict(row, **errors[row["name"]]) for row in rows]
    if method != CALIBRATE:
        for row in per_op:
            row["rhs_sqnr_db"] = None
    metrics = dict(
        method=method,
        config=cfg.to_json(),
        label=cfg.label,
        dataset=dataset.name,
        calibration_images=len(images),
        float_accuracy=float_accuracy,
        test_accuracy=after["accuracy"],
        accuracy_drop_points=100 * (float_accuracy - after["accuracy"]),
        ops=per_op,
    )
    if text:  # a language model: held-out loss as the trainer reports it, in bits per byte too
        metrics.update(
            float_test_loss=before["loss"],
            test_loss=after["loss"],
            float_bits_per_byte=before["loss"] / math.log(2),
            bits_per_byte=after["loss"] / math.log(2),
            bits_per_byte_increase=(after["loss"] - before["loss"]) / math.log(2),
        )
    return quantized, metrics


def _finite(value):
    """``value`` with non-finite floats (an exact op's infinite SQNR) as None: strict JSON has no Infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(out: str | Path, metrics: dict[str, Any]) -> list[Path]:
    """Write ``metrics.json`` and ``layer_sqnr.png`` (when matplotlib is installed) to ``out``.

    Returns:
      The paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    written[0].write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False))
    cfg = metrics["config"]
    # A calibrated run names its clip source; a weight method names itself.
    how = cfg["calibration"] if metrics.get("method", CALIBRATE) == CALIBRATE else metrics["method"]
    score = (
        f"{metrics['bits_per_byte']:.3f} bits/byte (float {metrics['float_bits_per_byte']:.3f})"
        if "bits_per_byte" in metrics
        else f"{100 * metrics['test_accuracy']:.2f}% (float {100 * metrics['float_accuracy']:.2f}%)"
    )
    title = f"{metrics['label']} {cfg['weights']}/{cfg['activations'] or 'float'}, {how}: {score}"
    if plot_ops(metrics["ops"], out / "layer_sqnr.png", title):
        written.append(out / "layer_sqnr.png")
    return written
