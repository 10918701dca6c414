"""Data-dependent scales of the binary and ternary formats (XNOR-Net, TWN)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from lowbit.formats._checks import check_float_input


def _reduce_axes(w: jax.Array, axis: int | None) -> tuple[int, ...] | None:
    """Axes to reduce so that one scale remains per index of ``axis`` (None: per tensor)."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis={axis!r} is invalid; allowed: an integer or None")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(
            f"axis={axis} is out of range for a {w.ndim}-d array; allowed: [{-w.ndim}, {w.ndim - 1}] or None"
        )
    axis = axis % w.ndim
    return tuple(i for i in range(w.ndim) if i != axis)


def binary_scale(w: ArrayLike, axis: int | None = None) -> jax.Array:
    """alpha = mean|w| (XNOR-Net), per tensor or per index of ``axis``, kept dims.

    ``w`` is a float32, bfloat16 or float16 array (as for ``formats.quantize``).
    """
    w = check_float_input(w, "w")
    return jnp.mean(jnp.abs(w), axis=_reduce_axes(w, axis), keepdims=True)


def ternary_threshold(w: ArrayLike, axis: int | None = None) -> tuple[jax.Array, jax.Array]:
    """TWN's threshold and scale: Delta = 0.7 mean|w|, alpha = mean of |w| where |w| > Delta.

    Returns:
      ``(delta, alpha)``, each shaped to broadcast against ``w`` (kept dims).
      A tensor whose entries are all zero gets alpha = 0.
    """
    w = check_float_input(w, "w")
    red = _reduce_axes(w, axis)
    aw = jnp.abs(w)
    delta = jnp.asarray(0.7, w.dtype) * jnp.mean(aw, axis=red, keepdims=True)
    keep = aw > delta
    count = jnp.sum(keep, axis=red, keepdims=True).astype(w.dtype)
    total = jnp.sum(jnp.where(keep, aw, jnp.zeros_like(aw)), axis=red, keepdims=True)
    alpha = total / jnp.maximum(count, jnp.ones_like(count))
    return delta, alpha


def ternarize(w: ArrayLike, axis: int | None = None) -> jax.Array:
    """TWN ternary weights: alpha * sign(w) * [|w| > Delta] (no gradient rule; see training.ste)."""
    w = check_float_input(w, "w")
    delta, alpha = ternary_threshold(w, axis)
    return jnp.where(jnp.abs(w) > delta, alpha * jnp.sign(w), jnp.zeros_like(w))
