"""The PTQ sweep: accuracy of W8A8, W6A6, W4A8 and W4A4 (integer and float formats) x calibration method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from lowbit.data import Dataset
from lowbit.ptq.config import CALIBRATIONS, PTQConfig
from lowbit.ptq.evaluate import accuracy
from lowbit.ptq.run import calibration_images, ptq

__all__ = ["SETTINGS", "markdown", "sweep"]

# (setting, family, weights, activations)
SETTINGS = (
    ("W8A8", "int", "int8", "int8"),
    ("W8A8", "float", "float8_e4m3fn", "float8_e4m3fn"),
    ("W6A6", "int", "int6", "int6"),
    ("W6A6", "float", "float6_e2m3fn", "float6_e2m3fn"),
    ("W4A8", "int", "int4", "int8"),
    ("W4A8", "float", "float4_e2m1fn", "float8_e4m3fn"),
    ("W4A4", "int", "int4", "int4"),
    ("W4A4", "float", "float4_e2m1fn", "float4_e2m1fn"),
)


def sweep(
    model: nnx.Module,
    dataset: Dataset,
    base: PTQConfig,
    *,
    settings=SETTINGS,
    calibrations=CALIBRATIONS,
    images: np.ndarray | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Score every setting x calibration method.

    Args:
      model: the float NNX model.
      dataset: calibration (training) and test images.
      base: every other PTQ field (ViT-specific choices, samples, granularity, ...).
      settings: ``(setting, family, weights, activations)`` rows.
      calibrations: the activation calibration methods (columns).
      images: calibration images (default: ``base.samples`` training images).
      log: called with one line per finished run.

    Returns:
      ``float_accuracy``, ``base`` (the shared fields) and ``rows``: per
      setting and family, ``accuracy`` by calibration method (fractions) and the
      lowest op SQNR of each run (``min_sqnr_db``).
    """
    if images is None:
        images = calibration_images(dataset, base.samples, base.seed)
    float_accuracy = accuracy(model, dataset.x_test, dataset.y_test)
    rows = []
    for setting, family, weights, activations in settings:
        row = dict(
            setting=setting, family=family, weights=weights, activations=activations, accuracy={}, min_sqnr_db={}
        )
        for method in calibrations:
            cfg = dataclasses.replace(base, weights=weights, activations=activations, calibration=method)
            _, metrics = ptq(model, dataset, cfg, images=images, float_accuracy=float_accuracy)
            row["accuracy"][method] = metrics["test_accuracy"]
            row["min_sqnr_db"][method] = min(r["sqnr_db"] for r in metrics["ops"])
            log(f"{setting} {weights}/{activations} {method}: {100 * metrics['test_accuracy']:.2f}%")
        rows.append(row)
    shared = {k: v for k, v in base.to_json().items() if k not in ("weights", "activations", "calibration")}
    return dict(
        dataset=dataset.name,
        float_accuracy=float_accuracy,
        calibration_images=len(images),
        base=shared,
        calibrations=list(calibrations),
        rows=rows,
    )


def markdown(result: dict[str, Any]) -> str:
    """The sweep as a Markdown table: test accuracy (%) and, in brackets, points lost to float."""
    fa = result["float_accuracy"]
    methods = result["calibrations"]
    lines = [
        f"Float accuracy {100 * fa:.2f}% ({result['dataset']}, {result['calibration_images']} calibration "
        "images); cells: PTQ test accuracy % (change vs float, points).",
        "",
        "| setting | weights | activations | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---:|" * len(methods),
    ]
    for row in result["rows"]:
        cells = [f"{100 * a:.2f} ({100 * (a - fa):+.2f})" for a in (row["accuracy"][m] for m in methods)]
        lines.append(f"| {row['setting']} | {row['weights']} | {row['activations']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
