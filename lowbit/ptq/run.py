"""One PTQ run end to end: calibrate a copy of the model, score it, report per-op errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lowbit.data import Dataset
from lowbit.ptq.calibrate import quantize_model
from lowbit.ptq.config import PTQConfig
from lowbit.ptq.evaluate import accuracy, op_sqnr, plot_ops

__all__ = ["calibration_images", "ptq", "write_report"]

SQNR_IMAGES = 128  # test images the per-op SQNRs are measured on


def calibration_images(dataset: Dataset, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` training images drawn without replacement (all of them if there are fewer)."""
    n = min(samples, len(dataset.x_train))
    return dataset.x_train[np.random.default_rng(seed).choice(len(dataset.x_train), n, replace=False)]


def ptq(
    model: nnx.Module,
    dataset: Dataset,
    cfg: PTQConfig,
    *,
    images: np.ndarray | None = None,
    float_accuracy: float | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Quantize a copy of ``model`` with ``cfg`` and score it on ``dataset``'s test set.

    Args:
      model: the float NNX model; left unchanged.
      dataset: calibration images come from its training set, scores from its test set.
      cfg: the PTQ setting.
      images: calibration images to use instead of ``cfg.samples`` training
        images (e.g. synthetic ones).
      float_accuracy: the float model's test accuracy, if already known.

    Returns:
      ``(quantized_model, metrics)`` with ``metrics``: ``config``, ``label``
      (``W8A8`` ...), ``float_accuracy``, ``test_accuracy``,
      ``accuracy_drop_points`` and ``ops`` (per op, in forward order: its
      ``name``, quantizers, step, ``sqnr_db``, ``lhs_sqnr_db``, ``rhs_sqnr_db``).
    """
    if images is None:
        images = calibration_images(dataset, cfg.samples, cfg.seed)
    quantized, rows = quantize_model(model, images, cfg)
    if float_accuracy is None:
        float_accuracy = accuracy(model, dataset.x_test, dataset.y_test)
    test_accuracy = accuracy(quantized, dataset.x_test, dataset.y_test)
    errors = {r["name"]: r for r in op_sqnr(model, quantized, dataset.x_test[:SQNR_IMAGES])}
    per_op = [dict(row, **errors[row["name"]]) for row in rows]
    metrics = dict(
        config=cfg.to_json(),
        label=cfg.label,
        dataset=dataset.name,
        calibration_images=len(images),
        float_accuracy=float_accuracy,
        test_accuracy=test_accuracy,
        accuracy_drop_points=100 * (float_accuracy - test_accuracy),
        ops=per_op,
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
    title = (
        f"{metrics['label']} {metrics['config']['weights']}/{metrics['config']['activations']}, "
        f"{metrics['config']['calibration']}: {100 * metrics['test_accuracy']:.2f}% "
        f"(float {100 * metrics['float_accuracy']:.2f}%)"
    )
    if plot_ops(metrics["ops"], out / "layer_sqnr.png", title):
        written.append(out / "layer_sqnr.png")
    return written
