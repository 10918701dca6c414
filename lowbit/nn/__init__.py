"""Flax: ``quantize`` / ``describe`` for any NNX or linen model, explicit quantized layers, the built-in
models, weight export and packed (weight-only) inference."""

from lowbit.nn import export, lm, models, packed
from lowbit.nn.describe import describe
from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.nn.intercept import NotQuantizedError
from lowbit.nn.layers import QConv, QDotGeneral, QEinsum, QEinsumOp, QLinear
from lowbit.nn.quantize import LINEN_COLLECTIONS, discover, is_quantized, ops, quantize
from lowbit.nn.variables import OpState, OverwriteWithGradient, QuantKey

__all__ = [
    "LINEN_COLLECTIONS",
    "NotQuantizedError",
    "OpState",
    "OverwriteWithGradient",
    "QConv",
    "QDotGeneral",
    "QEinsum",
    "QEinsumOp",
    "QLinear",
    "QuantKey",
    "describe",
    "discover",
    "einsum_dimension_numbers",
    "export",
    "is_quantized",
    "lm",
    "models",
    "ops",
    "packed",
    "quantize",
]
