"""Noise shaped like quantization error: adaptive fine-tuning noise and NoisyQuant's noisy bias.

* ``quantization_step``: the grid spacing a format's absmax-scaled quantizer
  has at each element (per channel for weights). For an integer format it is
  the channel's step ``absmax / max``; for a float format it also grows with
  the element's binade, as the rounding error does.
* ``adaptive_noise``: uniform noise of one local step, ``U(-step/2, step/2)``,
  recomputed from the current tensor, so it follows each layer's distribution
  and outliers as fine-tuning changes them.
* NoisyQuant's noisy bias (Liu et al. CVPR 2023): a fixed noise ``N`` is
  added to an op's input before the activation quantizer and its product with
  the quantized weight is subtracted from the result,
  ``y = Q(x + N) Q(W) - N Q(W)`` (at deployment ``- N Q(W)`` joins the bias);
  for heavy-tailed inputs this lowers the expected quantization error of
  ``y``. It is op state (``noisy_bias``, ``noisy_correction`` on the op's
  ``OpState``) applied by ``with_noisy_bias``, so any ``x @ W`` op can have it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import formats, quant
from lowbit.nn import intercept
from lowbit.nn.quantize import intercepting
from lowbit.training.qdot import DotQuantConfig, quantized_dot_general

__all__ = [
    "adaptive_noise",
    "linear_like",
    "noisy_bias_search",
    "quantization_step",
    "quantized_weight",
    "set_noisy_bias",
    "with_noisy_bias",
]


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


def linear_like(call, lhs_ndim: int, rhs_ndim: int) -> bool:
    """Whether an op is ``x @ W``: a 2-D weight contracted on its first axis with the input's last axis."""
    return call.kind == "dot_general" and rhs_ndim == 2 and call.dn == (((lhs_ndim - 1,), (0,)), ((), ()))


def set_noisy_bias(state: nnx.Module, noise, w_q) -> None:
    """Give an op (its ``OpState``) the noisy bias ``noise`` (``(in,)``), ``w_q`` its quantized ``(in, out)`` weight."""
    noise = jnp.asarray(noise, jnp.float32)
    state.noisy_bias = nnx.Variable(noise)
    state.noisy_correction = nnx.Variable(noise @ jnp.asarray(w_q, jnp.float32))


def _noisy(run, name, state, call, lhs, rhs):
    """``intercepting`` wrap: an op with a noisy bias runs on ``x + N`` and subtracts ``N Q(W)``."""
    noise = getattr(state, "noisy_bias", None)
    if noise is None:
        return run(lhs, rhs)
    out = run(lhs + noise[...].astype(lhs.dtype), rhs)
    return out - state.noisy_correction[...].astype(out.dtype)


@functools.cache
def _noisy_class(cls: type) -> type:
    """``cls`` (a quantized model class) whose calls apply the ops' noisy biases."""

    def __call__(self, *args, **kwargs):
        if intercept.active() is not None:  # an inner call of the same forward pass
            return cls.__call__(self, *args, **kwargs)
        with intercepting(self, wrap=_noisy):
            return cls.__call__(self, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}+noisy_bias"},
    )


def with_noisy_bias(qmodel: nnx.Module) -> nnx.Module:
    """``qmodel`` (discovered, from ``lowbit.quantize``), in place, made to apply its ops' noisy biases when called."""
    qmodel.__class__ = _noisy_class(type(qmodel))
    return qmodel


def quantized_weight(config: DotQuantConfig, w):
    """``w`` as the op's (retargeted) rhs quantizer sees it: ``Q(W)``."""
    return w if config.rhs is None else quant.fake_quant(config.rhs, w)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _output_error(lhs, rhs, dn, config, noise, w_q, reference):
    out = quantized_dot_general(lhs + noise, rhs, dn, config) - noise @ w_q
    return jnp.sum(jnp.square(out - reference))


def noisy_bias_search(config: DotQuantConfig, lhs, rhs, dn, step: float, key, amplitudes=(0.5, 1.0), draws: int = 4):
    """The noisy bias with the least output error on a calibration batch, or None if no noise is better.

    Candidates are ``U(-a * step / 2, a * step / 2)`` per input channel for each
    amplitude ``a`` and ``draws`` random draws (NoisyQuant samples and keeps the
    best); the error is the squared distance of the layer's output to its float
    output.

    Args:
      config: the op's quantizers, on its axes (``lowbit.recipes.op.retarget``).
      lhs, rhs, dn: one recorded call of an ``x @ W`` op (``linear_like``).
      step: the input quantizer's step.
      key: ``jax.random`` key of the draws.
      amplitudes, draws: the candidates.

    Returns:
      ``(noise, amplitude)``: the best ``(in_features,)`` noise and its
      amplitude, or ``(None, 0.0)``.
    """
    lhs, rhs = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)
    reference = jax.lax.dot_general(lhs, rhs, dn)
    w_q = quantized_weight(config, rhs)

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
