"""An outlier penalty for quantization-aware fine-tuning, in the spirit of QuantTune.

An absmax-scaled quantizer spends its levels on the range ``[-max|x|, max|x|]``;
what matters for its error is how far the largest values sit above the bulk,
``max|x| / rms(x)``. QuantTune (Chiang et al. 2024) fine-tunes with a loss on
the deviation of outlier activations so that the dynamic range shrinks while
the task loss holds. Here the penalty of a tensor is the mean, over its
outliers only, of the squared excess of ``|x|`` over ``k`` times its RMS, in
units of that RMS: zero for a tensor whose values all lie within ``k`` RMS.
Averaging over the outliers (not over every element) keeps a handful of them
from being diluted by a large tensor; letting the gradient reach the RMS too
lets the model widen the bulk as well as pull in the tails, and either one
shrinks the range an absmax quantizer must cover per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["outlier_penalty", "range_ratio"]


def _rms(x, reduce_axes):
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=reduce_axes, keepdims=True))


def outlier_penalty(x, threshold: float = 3.0, reduce_axes=None):
    """``sum(relu(|x| / rms - k)^2) / #{|x| > k rms}`` per scale group, averaged (float32 scalar).

    Args:
      x: activations or a kernel.
      threshold: ``k``, the multiple of the RMS beyond which a value counts as an outlier.
      reduce_axes: the axes one quantization scale covers (a kernel ``(in,
        out)`` per output channel: ``(0,)``); None: the whole tensor.
    """
    x = jnp.asarray(x, jnp.float32)
    excess = jax.nn.relu(jnp.abs(x) / jnp.maximum(_rms(x, reduce_axes), 1e-12) - jnp.float32(threshold))
    count = jnp.sum((excess > 0).astype(jnp.float32), axis=reduce_axes, keepdims=True)
    per_group = jnp.sum(jnp.square(excess), axis=reduce_axes, keepdims=True) / jnp.maximum(count, 1)
    return jnp.mean(per_group)


def range_ratio(x, reduce_axes=None):
    """``max|x| / rms(x)`` per scale group, averaged: how many RMS the quantizer's range spans."""
    x = jnp.asarray(x, jnp.float32)
    ratio = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True) / jnp.maximum(_rms(x, reduce_axes), 1e-12)
    return jnp.mean(ratio)
