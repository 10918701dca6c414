"""Flax-free training numerics: STE rules, quantized dot_general, GradScale, loss scaling, policies,
narrow accumulators and the random Hadamard transform."""

from lowbit.training.accumulate import Accumulator, accumulated_dot_general
from lowbit.training.gradscale import gradscale_init, gradscale_update
from lowbit.training.hadamard import RHT, rht, rht_dot_operands, rht_inverse, rht_signs
from lowbit.training.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    skip_nonfinite,
)
from lowbit.training.policy import Policy, get_policy
from lowbit.training.qdot import DotQuantConfig, quantized_dot_general
from lowbit.training.ste import (
    binary_weight,
    clipped_ste,
    lsq,
    lsq_init_step,
    pact,
    sawb_clip,
    sawb_quantize,
    ste,
    ternary_weight,
)

__all__ = [
    "RHT",
    "Accumulator",
    "DotQuantConfig",
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "Policy",
    "StaticLossScale",
    "accumulated_dot_general",
    "all_finite",
    "binary_weight",
    "clipped_ste",
    "get_policy",
    "gradscale_init",
    "gradscale_update",
    "lsq",
    "lsq_init_step",
    "pact",
    "quantized_dot_general",
    "rht",
    "rht_dot_operands",
    "rht_inverse",
    "rht_signs",
    "sawb_clip",
    "sawb_quantize",
    "skip_nonfinite",
    "ste",
    "ternary_weight",
]
