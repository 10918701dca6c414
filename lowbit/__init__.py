"""lowbit: low-precision number formats and training in them, for JAX.

Subpackages, in import order: ``formats`` (element and block formats) ←
``quant`` (scaled quantization) ← ``training`` (STE rules, quantized matmuls,
loss scaling, recipes, the train loop) ← ``nn`` (Flax layers, the ViT).
``lowbit.testing`` (Hypothesis strategies and property suite) and ``lowbit.data``
sit beside them and are imported on demand.
"""

from lowbit import formats

__version__ = "0.1.0"

__all__ = ["formats", "__version__"]
