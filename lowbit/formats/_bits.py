"""Exact float32 bit helpers shared by the format kernels.

Every kernel rounds on the float32 bit pattern: integer adds and masks on the
mantissa are exact and vectorise, where ``log2``/``exp2`` are neither.
"""

import jax.numpy as jnp
from jax import lax

SIGN = 0x80000000
ABS = 0x7FFFFFFF
INF_BITS = 0x7F800000
MANT = 23  # float32 mantissa bits


def u32(v: int) -> jnp.ndarray:
    """A uint32 scalar constant (keeps strict dtype promotion happy)."""
    return jnp.uint32(v)


def to_bits(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> uint32 bit pattern."""
    return lax.bitcast_convert_type(x, jnp.uint32)


def from_bits(b: jnp.ndarray) -> jnp.ndarray:
    """uint32 bit pattern -> float32."""
    return lax.bitcast_convert_type(b, jnp.float32)


def pow2(k: jnp.ndarray) -> jnp.ndarray:
    """Exact 2^k as float32 for integer k in [-126, 127] (int32 array).

    Built from the exponent field, so it is exact and costs one shift; callers
    keep k inside the normal range.
    """
    return from_bits(lax.shift_left((k + 127).astype(jnp.uint32), u32(MANT)))


def exponent(x: jnp.ndarray) -> jnp.ndarray:
    """floor(log2|x|) as int32 for finite nonzero float32 x (subnormals included)."""
    b = to_bits(x) & u32(ABS)
    field = lax.shift_right_logical(b, u32(MANT)).astype(jnp.int32)
    # Subnormals: b is the integer mantissa m, |x| = m * 2^-149.
    return jnp.where(field == 0, -118 - lax.clz(b).astype(jnp.int32), field - 127)
