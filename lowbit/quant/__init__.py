"""Scaled quantization: granularity, scale sources, calibration, packed ``QTensor``.

A ``Quantizer`` is data (element format, granularity, scale source and format,
rounding, zero point, kind); ``fake_quant`` returns the dequantized array,
``quantize`` a ``QTensor`` of packed codes, and ``dequantize`` reverses it bit
for bit. Static quantizers take their parameters from ``calibrate``.
"""

from lowbit.quant.api import dequantize, fake_quant, qparams, quantize
from lowbit.quant.calibrate import CalibrationState, Observer, calibrate, observer
from lowbit.quant.packing import pack, unpack
from lowbit.quant.params import QParams
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantizer import (
    GRANULARITIES,
    KINDS,
    SCALE_FORMATS,
    SCALES,
    TWIN_SPLITS,
    ZERO_POINT_RANGES,
    Quantizer,
)

__all__ = [
    "GRANULARITIES",
    "KINDS",
    "SCALE_FORMATS",
    "SCALES",
    "TWIN_SPLITS",
    "ZERO_POINT_RANGES",
    "CalibrationState",
    "Observer",
    "QParams",
    "QTensor",
    "Quantizer",
    "calibrate",
    "dequantize",
    "fake_quant",
    "observer",
    "pack",
    "qparams",
    "quantize",
    "unpack",
]
