"""Scaled quantization: granularity, scale sources, calibration, packed ``QTensor``.

A ``Quantizer`` is data made of typed parts: an element format, a granularity
(``Tensor``, ``Channel``, ``Group``, ``Block``), a scale source (``Absmax``,
``Percentile``, ``MSE``, ``KL``, ``Fixed``, ``Learned``, ``Delayed``), a grid
kind (``Uniform``, ``Log2``, ``Twin``, ``PTF``), the scale format and the
rounding. ``fake_quant`` returns the dequantized array, ``quantize`` a
``QTensor`` of packed codes, and ``dequantize`` reverses it bit for bit.
Static quantizers take their parameters from ``calibrate``.
"""

from lowbit.quant.api import dequantize, fake_quant, qparams, quantize
from lowbit.quant.calibrate import CalibrationState, Observer, calibrate, observer
from lowbit.quant.granularity import Block, Channel, Group, Tensor
from lowbit.quant.kinds import PTF, Log2, Twin, Uniform
from lowbit.quant.packing import pack, unpack
from lowbit.quant.params import QParams
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantizer import SCALE_FORMATS, Quantizer
from lowbit.quant.sources import KL, MSE, Absmax, Delayed, Fixed, Learned, Percentile

__all__ = [
    "KL",
    "MSE",
    "PTF",
    "SCALE_FORMATS",
    "Absmax",
    "Block",
    "CalibrationState",
    "Channel",
    "Delayed",
    "Fixed",
    "Group",
    "Learned",
    "Log2",
    "Observer",
    "Percentile",
    "QParams",
    "QTensor",
    "Quantizer",
    "Tensor",
    "Twin",
    "Uniform",
    "calibrate",
    "dequantize",
    "fake_quant",
    "observer",
    "pack",
    "qparams",
    "quantize",
    "unpack",
]
