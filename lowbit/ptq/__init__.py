"""Post-training quantization of any NNX model: calibration, ViT-specific quantizers, robust fine-tuning.

Everything works per op (``lowbit.nn.ops``): every matmul and convolution the
forward pass runs, named ``path:key`` (``blocks/0/attn:einsum1``).

* ``ptq`` / ``quantize_model``: static PTQ of a trained float model: every op
  records its operands on calibration images, activation clips come from
  ``lowbit.quant`` observers (absmax, percentile, MSE, KL) and are frozen into
  one rule per op of a recipe that ``lowbit.quantize`` applies; weights per
  channel (or group/tensor). ``PTQConfig`` adds the ViT-specific softmax (log2,
  twin), GELU (twin) and LayerNorm (per channel, PTF; folded away) quantizers
  on the ops its regexes name, dynamic activations and NoisyQuant's noisy bias.
* ``quantize_weights`` (``lowbit.ptq.weights``): a weight method on every
  weighted op of any NNX model, from its calibration inputs: ``RTN`` (round to
  nearest), ``GPTQ`` (``lowbit.ptq.gptq``), ``AWQ`` (``lowbit.ptq.awq``),
  ``SmoothQuant`` (``lowbit.ptq.smoothquant``; ``SmoothQuant(then=GPTQ())``
  quantizes the smoothed weight by GPTQ); weight-only (W4A16, NF4, ...)
  or with an activation quantizer (W8A8, W4A8). Each method's module also
  quantizes one ``(K, N)`` weight from its inputs' Hessian (``hessian``):
  ``gptq.quantize``, ``awq.quantize``, ``smoothquant.quantize``, ``rtn.quantize``.
* ``finetune`` (``lowbit.ptq.finetune``): adaptive quantization-noise and
  outlier-penalty fine-tuning before PTQ.
* ``synthesize`` (``lowbit.ptq.datafree``): data-free calibration images (PSAQ-ViT).
* ``load_model`` / ``save_model``: the float model of a ``lowbit train`` checkpoint.

Names are imported on first use (PEP 562), so ``lowbit.ptq.config`` (the option
lists the CLI builds its parser from) loads without Flax.
"""

import importlib

# name -> module that defines it
_LAZY = {
    "quantize_model": "lowbit.ptq.calibrate",
    "AWQ": "lowbit.ptq.awq",
    "AWQResult": "lowbit.ptq.awq",
    "GPTQ": "lowbit.ptq.gptq",
    "GPTQResult": "lowbit.ptq.gptq",
    "hessian": "lowbit.ptq.gptq",
    "RTN": "lowbit.ptq.rtn",
    "output_error": "lowbit.ptq.rtn",
    "SmoothQuant": "lowbit.ptq.smoothquant",
    "SmoothResult": "lowbit.ptq.smoothquant",
    "smooth": "lowbit.ptq.smoothquant",
    "smoothed_hessian": "lowbit.ptq.smoothquant",
    "smoothing_scales": "lowbit.ptq.smoothquant",
    "WEIGHT_METHODS": "lowbit.ptq.config",
    "PTQ_METHODS": "lowbit.ptq.config",
    "WeightPTQConfig": "lowbit.ptq.config",
    "quantize_weights": "lowbit.ptq.weights",
    "PTQConfig": "lowbit.ptq.config",
    "resolve_format": "lowbit.ptq.config",
    "accuracy": "lowbit.ptq.evaluate",
    "op_sqnr": "lowbit.ptq.evaluate",
    "sqnr_db": "lowbit.ptq.evaluate",
    "CheckpointError": "lowbit.ptq.restore",
    "find_checkpoint": "lowbit.ptq.restore",
    "load_model": "lowbit.ptq.restore",
    "save_model": "lowbit.ptq.restore",
    "calibration_images": "lowbit.ptq.run",
    "ptq": "lowbit.ptq.run",
    "write_report": "lowbit.ptq.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit.ptq' has no attribute {name!r}")
