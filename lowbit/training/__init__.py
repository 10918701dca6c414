"""Training numerics: STE rules, quantized matmuls, GradScale, loss scaling, policies, recipes."""

from lowbit.training import checkpoint, recipes
from lowbit.training.checkpoint import CheckpointError
from lowbit.training.gradscale import gradscale_init, gradscale_update
from lowbit.training.loop import TrainState, make_optimizer, train
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
from lowbit.training.recipes import LayerRecipe, Recipe
from lowbit.training.variables import OverwriteWithGradient
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
    "CheckpointError", "OverwriteWithGradient", "TrainState", "checkpoint", "make_optimizer", "train",
    "DotQuantConfig", "DynamicLossScale", "LayerRecipe", "LossScale", "NoOpLossScale", "Policy", "Recipe",
    "StaticLossScale", "all_finite", "binary_weight", "clipped_ste", "get_policy", "gradscale_init",
    "gradscale_update", "lsq", "lsq_init_step", "pact", "quantized_dot_general", "recipes", "sawb_clip",
    "sawb_quantize", "skip_nonfinite", "ste", "ternary_weight",
]
