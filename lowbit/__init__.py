"""lowbit: low-precision number formats and training in them, for JAX.

Subpackages, in import order: ``formats`` (element, codebook and block formats) ←
``quant`` (scaled quantization) ← ``training`` (Flax-free STE rules, quantized
dot_general, GradScale, loss scaling, policies) ← ``recipes`` (rules and the named
recipes) ← ``nn`` (``quantize`` / ``describe`` for any Flax model, explicit layers,
built-in models) ← ``trainer`` (the train step, loop, checkpoints) ← ``ptq`` ← ``cli``.
``lowbit.testing`` (Hypothesis strategies and property suite) and ``lowbit.data``
sit beside them.

The everyday names are here: ``lowbit.quantize``, ``lowbit.describe``,
``lowbit.train``, ``lowbit.optimizer``, ``lowbit.Rule``, ``lowbit.Recipe``,
``lowbit.NotQuantizedError``
(imported on first use, so ``import lowbit`` stays light).
"""

import importlib

from lowbit import formats

__version__ = "0.1.0"

# name -> module that defines it; loaded on first access (PEP 562).
_LAZY = {
    "quantize": "lowbit.nn",
    "describe": "lowbit.nn",
    "train": "lowbit.trainer",
    "Rule": "lowbit.recipes",
    "Recipe": "lowbit.recipes",
    "optimizer": "lowbit.nn.optimizer",
    "NotQuantizedError": "lowbit.nn",
}

__all__ = [
    "NotQuantizedError",
    "Recipe",
    "Rule",
    "describe",
    "formats",
    "optimizer",
    "quantize",
    "train",
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
