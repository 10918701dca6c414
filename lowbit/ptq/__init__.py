"""Post-training quantization of the ViT: calibration, ViT-specific quantizers, robust fine-tuning."""

from lowbit.ptq.calibrate import quantize_vit
from lowbit.ptq.config import PTQConfig, resolve_format
from lowbit.ptq.evaluate import accuracy, layer_sqnr, sqnr_db
from lowbit.ptq.restore import CheckpointError, find_checkpoint, load_vit, save_vit
from lowbit.ptq.run import calibration_images, ptq, write_report

__all__ = ["CheckpointError", "PTQConfig", "accuracy", "calibration_images", "find_checkpoint", "layer_sqnr",
           "load_vit", "ptq", "quantize_vit", "resolve_format", "save_vit", "sqnr_db", "write_report"]
