"""The uniform kernels: ``Q(x / step) * step`` on an integer grid or a delegated element format.

Fake quantization and ``decode(encode(.))`` run the same float32 operations in
the same order, so they agree bit for bit (integer grids cannot store NaN:
``encode`` writes a NaN as code 0, where fake quantization keeps it NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from lowbit import formats
from lowbit.quant import _arith

if TYPE_CHECKING:
    from lowbit.quant.quantizer import Quantizer


def scaled(q: Quantizer, x: jax.Array, step: jax.Array) -> jax.Array:
    """``x / step``: a multiply by the exact reciprocal when every step is a power of two."""
    if q.pow2_step:
        inverse: jax.Array = jnp.float32(1) / step
        return x * inverse
    return _arith.div(x, step)


# ----- integer grid (symmetric or with a zero point) ----------------------------------
def _int_levels(
    q: Quantizer, x: jax.Array, step: jax.Array, zp: jax.Array | None, rounding: str, key: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Clipped integer levels ``c`` (float32) and ``c - zp``, the multiple of ``step``."""
    qmin, qmax = q.int_range
    n = _arith.round_int(scaled(q, x, step), rounding, _arith.random_bits(key, x.shape))
    if zp is None:
        c = jnp.clip(n, jnp.float32(qmin), jnp.float32(qmax))
        # round(-0.3) is -0; the codes decode to +0, so fake quantization does too.
        return c, jnp.where(c == 0, jnp.float32(0), c)
    c = jnp.clip(n + zp, jnp.float32(qmin), jnp.float32(qmax))
    return c, c - zp


def int_fake(
    q: Quantizer, x: jax.Array, step: jax.Array, zp: jax.Array | None, rounding: str, key: jax.Array | None
) -> jax.Array:
    """Fake-quantize float32 ``x`` on the integer grid with ``step`` and zero point ``zp`` (or None)."""
    return _int_levels(q, x, step, zp, rounding, key)[1] * step


def int_encode(
    q: Quantizer, x: jax.Array, step: jax.Array, zp: jax.Array | None, rounding: str, key: jax.Array | None
) -> jax.Array:
    """Two's complement codes (low ``bits`` bits) of the clipped levels."""
    bits: int = q.format.bits
    c = _int_levels(q, x, step, zp, rounding, key)[0].astype(jnp.int32)
    return (c & ((1 << bits) - 1)).astype(q.format.code_dtype)


def int_decode(q: Quantizer, codes: jax.Array, step: jax.Array, zp: jax.Array | None) -> jax.Array:
    """Inverse of ``int_encode``: ``(c - zp) * step`` in float32."""
    bits: int = q.format.bits
    c = codes.astype(jnp.int32) & ((1 << bits) - 1)
    if q.format.signed:  # sign-extend the low `bits` bits
        c = lax.shift_right_arithmetic(lax.shift_left(c, 32 - bits), 32 - bits)
    v = c.astype(jnp.float32)
    return (v if zp is None else v - zp) * step


# ----- any other element format, delegated to lowbit.formats ---------------------------
def format_fake(q: Quantizer, x: jax.Array, step: jax.Array, rounding: str, key: jax.Array | None) -> jax.Array:
    t = scaled(q, x, step)
    y: jax.Array = formats.quantize(q.format, t, saturate=q.saturate, rounding=rounding, key=key)
    return y * step


def format_encode(q: Quantizer, x: jax.Array, step: jax.Array, rounding: str, key: jax.Array | None) -> jax.Array:
    codes: jax.Array = formats.encode(q.format, scaled(q, x, step), saturate=q.saturate, rounding=rounding, key=key)
    return codes


def format_decode(q: Quantizer, codes: jax.Array, step: jax.Array) -> jax.Array:
    v: jax.Array = formats.decode(q.format, codes)
    return v * step
