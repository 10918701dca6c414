"""Flax NNX: quantized dot_general drop-ins, quantized layers and the ViT."""

from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.nn.layers import OverwriteWithGradient, QConv, QDotGeneral, QEinsum, QEinsumOp, QLinear

__all__ = ["OverwriteWithGradient", "QConv", "QDotGeneral", "QEinsum", "QEinsumOp", "QLinear",
           "einsum_dimension_numbers"]
