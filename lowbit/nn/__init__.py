"""Flax NNX: quantized dot_general drop-ins, quantized layers, the ViT and weight export."""

from lowbit.nn import export
from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.nn.layers import OverwriteWithGradient, QConv, QDotGeneral, QEinsum, QEinsumOp, QLinear
from lowbit.nn.vit import ViT, default_patch_size

__all__ = ["OverwriteWithGradient", "QConv", "QDotGeneral", "QEinsum", "QEinsumOp", "QLinear", "ViT", "default_patch_size",
           "einsum_dimension_numbers", "export"]
