"""Exact float32 helpers for the quantization kernels.

Powers of two come from exponent bits (``lowbit.formats._bits``), never from
``log2``/``exp2``: they are exact and vectorise, and the kernels stay at memory
speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.formats import _bits
from lowbit.formats._bits import u32

MANT_MASK = 0x7FFFFF
POW2_MIN, POW2_MAX = -126, 126  # keeps 2^k and 1/2^k float32 normals


def div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` correctly rounded, with ``b`` broadcast against ``a``.

    XLA's CPU simplifier rewrites ``a / broadcast(b)`` as ``a * (1 / b)``, off
    by an ulp for about a third of inputs. A divisor that also depends on ``a``
    (1 where ``a`` is NaN, which divides to NaN either way) keeps the division.
    """
    return a / jnp.where(jnp.isnan(a), jnp.ones((), b.dtype), b)


def _mantissa(a: jax.Array) -> jax.Array:
    return _bits.to_bits(a) & u32(MANT_MASK)


def ceil_log2_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """Smallest int32 ``k`` with ``a <= b * 2^k``, for positive float32 normals ``a``, ``b``."""
    k = _bits.exponent(a) - _bits.exponent(b)
    return k + (_mantissa(a) > _mantissa(b)).astype(jnp.int32)


def floor_log2_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """Largest int32 ``k`` with ``b * 2^k <= a``, for positive float32 normals ``a``, ``b``."""
    k = _bits.exponent(a) - _bits.exponent(b)
    return k - (_mantissa(a) < _mantissa(b)).astype(jnp.int32)


def pow2(k: jax.Array) -> jax.Array:
    """Exact ``2^k`` (float32) for int32 ``k``, clamped to ``[POW2_MIN, POW2_MAX]``."""
    return _bits.pow2(jnp.clip(k, POW2_MIN, POW2_MAX))


def random_bits(key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """uint32 random bits for stochastic rounding (None without a key): the formats' one random source."""
    return None if key is None else _bits.random_bits(key, shape)


def round_int(t: jax.Array, rounding: str, rbits: jax.Array | None) -> jax.Array:
    """Round float32 ``t`` to integer values (float32) per ``rounding``.

    ``nearest`` is half to even. ``toward_zero`` and ``stochastic`` round the
    magnitude, so both are symmetric in the sign; stochastic rounding compares
    24 random bits with the fraction and is unbiased to 2^-24 of a step.
    """
    if rounding == "nearest":
        return lax.round(t, lax.RoundingMethod.TO_NEAREST_EVEN)
    a = jnp.abs(t)
    m = jnp.floor(a)
    if rounding == "stochastic":
        assert rbits is not None  # check_rounding requires a key for stochastic rounding
        u = lax.shift_right_logical(rbits, u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
        m = m + (u < a - m).astype(jnp.float32)
    return jnp.where(t < 0, -m, m)
