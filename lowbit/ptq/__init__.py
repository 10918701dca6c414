"""Post-training quantization of the ViT: calibration, ViT-specific quantizers, robust fine-tuning.

* ``ptq`` / ``quantize_vit``: static PTQ of a trained float ViT: every quantized
  layer records its operands on calibration images, activation clips come from
  ``lowbit.quant`` observers (absmax, percentile, MSE, KL) and are frozen into
  each layer instance's ``LayerRecipe``; weights per channel (or group/tensor).
  ``PTQConfig`` adds the ViT-specific softmax (log2, twin), GELU (twin) and
  LayerNorm (per channel, PTF; folded away) quantizers, dynamic activations and
  NoisyQuant's noisy bias.
* ``finetune`` (``lowbit.ptq.finetune``): adaptive quantization-noise and
  outlier-penalty fine-tuning before PTQ.
* ``synthesize`` (``lowbit.ptq.datafree``): data-free calibration images (PSAQ-ViT).
* ``load_vit`` / ``save_vit``: the ViT of a ``lowbit train`` checkpoint.
"""

from lowbit.ptq.calibrate import quantize_vit
from lowbit.ptq.config import PTQConfig, resolve_format
from lowbit.ptq.evaluate import accuracy, layer_sqnr, sqnr_db
from lowbit.ptq.restore import CheckpointError, find_checkpoint, load_vit, save_vit
from lowbit.ptq.run import calibration_images, ptq, write_report

__all__ = ["CheckpointError", "PTQConfig", "accuracy", "calibration_images", "find_checkpoint", "layer_sqnr",
           "load_vit", "ptq", "quantize_vit", "resolve_format", "save_vit", "sqnr_db", "write_report"]
