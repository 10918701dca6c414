"""Noise shaped like quantization error: adaptive fine-tuning noise and NoisyQuant's noisy bias.

* ``quantization_step``: the grid spacing a format's absmax-scaled quantizer
  has at each element (per channel for weights). For an integer format it is
  the channel's step ``absmax / max``; for a float format it also grows with
  the element's binade, as the rounding error does.
* ``adaptive_noise``: uniform noise of one local step, ``U(-step/2, step/2)``,
  recomputed from the current tensor, so it follows each layer's distribution
  and outliers as fine-tuning changes them.
* ``NoisyBias`` (NoisyQuant, Liu et al. CVPR 2023): a fixed noise ``N`` is
  added to a linear layer's input before the activation quantizer and removed
  after it through the bias, ``y = Q(x + N) Q(W) + (b - N Q(W))``; for
  heavy-tailed inputs this lowers the expected quantization error of ``y``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import formats, quant
from lowbit.nn.layers import QLinear
from lowbit.training.qdot import DotQuantConfig, quantized_dot_general

__all__ = ["NoisyBias", "adaptive_noise", "noisy_bias_search", "quantization_step"]


def _grid(fmt) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative representable magnitudes (ascending) and the gap above each."""
    mags = np.unique(np.abs(np.asarray(formats.values(fmt), np.float64)))
    mags = mags[np.isfinite(mags)]
    return mags[:-1].astype(np.float32), np.diff(mags).astype(np.float32)


def quantization_step(x, fmt, reduce_axes=None):
    """The local quantization step of every element of ``x`` under absmax scaling to ``fmt``.

    Args:
      x: float array.
      fmt: the target element format (integer or float).
      reduce_axes: the axes that share one scale (a kernel ``(in, out)`` per
        output channel: ``(0,)``); None shares one scale over the whole tensor.

    Returns:
      float32 array of ``x``'s shape: ``scale * gap`` where ``scale = absmax /
      fmt.max_value`` and ``gap`` is the distance between the format's
      representable magnitudes around ``|x| / scale`` (1 for an integer format).
    """
    x = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax, jnp.float32(1)) / jnp.float32(fmt.max_value)
    if isinstance(fmt, formats.IntFormat):
        return jnp.broadcast_to(scale, x.shape)
    lows, gaps = _grid(fmt)
    # The grids are short (at most 2^7 magnitudes): one comparison per level beats a search.
    idx = jnp.sum(jnp.abs(x / scale)[..., None] >= jnp.asarray(lows[1:]), axis=-1)
    return scale * jnp.asarray(gaps)[idx]


def adaptive_noise(key, x, fmt, reduce_axes=None):
    """Uniform noise ``U(-step/2, step/2)`` with ``step = quantization_step(x, fmt, reduce_axes)``.

    The step is held constant for differentiation: the noise perturbs the
    forward pass without pulling ``x`` toward smaller scales.
    """
    step = jax.lax.stop_gradient(quantization_step(x, fmt, reduce_axes))
    return (jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5) * step).astype(x.dtype)


class NoisyBias(nnx.Module):
    """A ``QLinear`` whose input gets a fixed noise before quantization; its bias removes it again.

    Args:
      inner: the quantized layer; its bias is replaced by ``b - noise @ Q(W)``.
      noise: ``(in_features,)`` float32, added to every token's input.
    """

    def __init__(self, inner: QLinear, noise):
        if inner.bias is None:
            raise ValueError("NoisyBias needs a layer with a bias to fold the noise's product into")
        noise = jnp.asarray(noise, jnp.float32)
        w_q = _weight(inner.layer.dot, inner.kernel[...].astype(jnp.float32))
        inner.bias[...] = inner.bias[...] - (noise @ w_q).astype(inner.bias[...].dtype)
        self.inner = inner
        self.noise = nnx.Variable(noise)

    def __call__(self, x):
        return self.inner(x + self.noise[...].astype(x.dtype))


def _weight(config: DotQuantConfig, w):
    return w if config.rhs is None else quant.fake_quant(config.rhs, w)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _output_error(lhs, rhs, dn, config, noise, w_q, reference):
    out = quantized_dot_general(lhs + noise, rhs, dn, config) - noise @ w_q
    return jnp.sum(jnp.square(out - reference))


def noisy_bias_search(config: DotQuantConfig, lhs, rhs, dn, step: float, key,
                      amplitudes=(0.5, 1.0), draws: int = 4):
    """The noisy bias with the least output error on a calibration batch, or None if no noise is better.

    Candidates are ``U(-a * step / 2, a * step / 2)`` per input channel for each
    amplitude ``a`` and ``draws`` random draws (NoisyQuant samples and keeps the
    best); the error is the squared distance of the layer's output to its float
    output.

    Args:
      config: the layer's quantizers.
      lhs, rhs, dn: one recorded call (input, kernel, dimension numbers).
      step: the input quantizer's step.
      key: ``jax.random`` key of the draws.
      amplitudes, draws: the candidates.

    Returns:
      ``(noise, amplitude)``: the best ``(in_features,)`` noise and its
      amplitude, or ``(None, 0.0)``.
    """
    lhs, rhs = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)
    reference = jax.lax.dot_general(lhs, rhs, dn)
    w_q = _weight(config, rhs)

    def error(noise):
        return float(_output_error(lhs, rhs, dn, config, noise, w_q, reference))

    best, best_err, best_amp = None, error(jnp.zeros(lhs.shape[-1], jnp.float32)), 0.0
    for amp in amplitudes:
        for k in jax.random.split(jax.random.fold_in(key, int(1000 * amp)), draws):
            noise = jax.random.uniform(k, (lhs.shape[-1],), jnp.float32, -0.5, 0.5) * jnp.float32(amp * step)
            err = error(noise)
            if err < best_err:
                best, best_err, best_amp = noise, err, amp
    return best, best_amp
