"""Round-to-nearest weights (the PTQ baseline) and what every weight method shares.

Every weight method (RTN, ``gptq``, ``awq``, ``smoothquant``) works on one
weight as a matrix ``w`` of shape ``(K, N)``: ``K`` inputs (the contracted
dimensions, flattened) by ``N`` outputs, so that the op computes ``y = x @ w``
for calibration inputs ``x`` of shape ``(n, K)`` (``lowbit.ptq.weights``
builds both views from any op). On that matrix a weight quantizer is placed as
``lowbit.quantize`` places it on a weight (``lowbit.recipes.op.retarget``):
``Group(size)`` groups run along the inputs (axis 0), ``Channel`` scales sit on
the outputs (axis 1), ``Tensor`` has one scale.

The output error of a quantized weight ``w_q`` on calibration inputs is
measured through their Hessian ``H = 2 xᵀx / n`` (``gptq.hessian``):
``tr((w - w_q)ᵀ H (w - w_q)) = 2 / n * ||x w - x w_q||²``, so no method keeps the
inputs themselves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowbit import quant
from lowbit.quant import Channel, Group, Quantizer

__all__ = ["RTN", "check_group", "check_weights", "oriented", "output_error", "quantize"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN:
    """Round-to-nearest: every weight onto its quantizer's grid, no calibration data used."""

    name = "rtn"


def check_weights(quantizer: Quantizer, field: str = "weights") -> None:
    """A weight (or dynamic activation) quantizer takes its scale from the tensor itself, or a fixed step.

    Raises:
      TypeError: ``quantizer`` is not a ``lowbit.quant.Quantizer``.
      ValueError: a static (calibrated) source or one whose step the caller passes.
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"{field} has type {type(quantizer).__name__}; allowed: a lowbit.quant.Quantizer")
    if quantizer.static or quantizer.scale.given:
        raise ValueError(
            f"{field}.scale={quantizer.scale!r} is invalid; allowed: a source that reads the tensor itself "
            "(Absmax(), Percentile(q), MSE(), with static=False) or Fixed(step): the scale comes from "
            "the tensor, not from a calibration state or from the caller"
        )


def check_group(quantizer: Quantizer, k: int, name: str = "weight") -> None:
    """A ``Group`` size must divide the input dimension ``k``.

    Raises:
      ValueError: naming the weight, the group size and the dimension.
    """
    g = quantizer.granularity
    if isinstance(g, Group) and g.size is not None and k % g.size:
        raise ValueError(
            f"{name}: group size {g.size} does not divide the input dimension {k}; allowed: a divisor of {k}"
        )


def oriented(quantizer: Quantizer, k: int, name: str = "weight") -> Quantizer:
    """``quantizer`` placed on a ``(K, N)`` weight: groups along the ``K`` inputs, channels on the outputs.

    Args:
      quantizer: the weight quantizer (any granularity axis; it is set here).
      k: the number of inputs ``K``.
      name: what the weight is (an op's name), for the error message.

    Raises:
      ValueError: a ``Group`` size that does not divide ``K``.
    """
    check_group(quantizer, k, name)
    return quantizer.along(1 if isinstance(quantizer.granularity, Channel) else 0)


def quantize(w: jax.Array, quantizer: Quantizer, *, name: str = "weight") -> jax.Array:
    """Round-to-nearest quantization of one weight.

    Args:
      w: float32 ``(K, N)`` weight (``y = x @ w``).
      quantizer: the weight quantizer (placed by ``oriented``).
      name: the weight's name in errors.

    Returns:
      float32 ``(K, N)``: the dequantized weight.
    """
    check_weights(quantizer)
    w = jnp.asarray(w, jnp.float32)
    return quant.fake_quant(oriented(quantizer, w.shape[0], name), w)


@jax.jit
def output_error(w: jax.Array, w_q: jax.Array, h: jax.Array) -> jax.Array:
    """``tr((w - w_q)ᵀ h (w - w_q))``: with ``h = 2 xᵀx / n``, twice the mean squared output error per input row.

    Args:
      w, w_q: float32 ``(K, N)`` float and quantized weights.
      h: float32 ``(K, K)`` Hessian of the calibration inputs.

    Returns:
      float32 scalar (output units squared, summed over the ``N`` outputs).
    """
    d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_q, jnp.float32)
    return jnp.sum(jnp.dot(h, d, precision=jax.lax.Precision.HIGHEST) * d)
