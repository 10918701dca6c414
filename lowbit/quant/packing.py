"""Bit packing of element codes: the storage a QTensor really takes.

Codes are packed little-endian: the first code sits in the lowest bits. Widths
1, 2 and 4 share a byte (8, 4, 2 codes per byte); 6-bit codes go 4 per 3 bytes;
8-bit codes are stored as they are and 16-bit codes as uint16. Other widths use
the next of these containers (3 -> 4, 5 -> 6, 7 -> 8, 9..15 -> 16).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

WIDTHS = (1, 2, 4, 6, 8, 16)


def container_bits(bits: int) -> int:
    """The packing width used for ``bits``-bit codes (1..16)."""
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits={bits!r} is invalid; allowed: an integer in [1, 16]")
    return next(w for w in WIDTHS if w >= bits)


def _check_width(bits: int) -> None:
    if bits not in WIDTHS:
        raise ValueError(f"bits={bits!r} is invalid; allowed: {', '.join(map(str, WIDTHS))}")


def packed_size(n: int, bits: int) -> int:
    """Number of storage words (bytes, or uint16 for 16 bits) that ``n`` codes pack into."""
    _check_width(bits)
    if bits == 6:
        return 3 * math.ceil(n / 4)
    return n if bits == 16 else math.ceil(n * bits / 8)


@functools.partial(jax.jit, static_argnums=1)
def pack(codes: ArrayLike, bits: int) -> jax.Array:
    """Pack integer codes (any shape, only their low ``bits`` bits are kept) into a 1-D array.

    Args:
      codes: unsigned (or signed) integer array of codes.
      bits: 1, 2, 4, 6, 8 or 16.

    Returns:
      ``uint8`` of ``packed_size(codes.size, bits)`` bytes, or ``uint16`` codes for 16 bits.
    """
    _check_width(bits)
    c: jax.Array = jnp.asarray(codes).ravel().astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    if bits == 16:
        return c.astype(jnp.uint16)
    if bits == 8:
        return c.astype(jnp.uint8)
    per = 4 if bits == 6 else 8 // bits
    c = jnp.pad(c, (0, -c.size % per)).reshape(-1, per)
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    word = jnp.sum(lax.shift_left(c, shifts[None, :]), axis=1, dtype=jnp.uint32)
    if bits != 6:
        return word.astype(jnp.uint8)
    byte_shifts = jnp.arange(3, dtype=jnp.uint32) * jnp.uint32(8)
    return lax.shift_right_logical(word[:, None], byte_shifts[None, :]).astype(jnp.uint8).ravel()


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack(packed: ArrayLike, bits: int, n: int) -> jax.Array:
    """Inverse of ``pack``: the first ``n`` codes, 1-D (``uint8``; ``uint16`` for 16 bits)."""
    _check_width(bits)
    p = jnp.asarray(packed).ravel()
    if p.size != packed_size(n, bits):
        raise ValueError(f"packed has {p.size} words; {n} codes of {bits} bits need {packed_size(n, bits)}")
    if bits == 16:
        return p.astype(jnp.uint16)
    if bits == 8:
        return p.astype(jnp.uint8)
    w = p.astype(jnp.uint32)
    if bits == 6:
        b = w.reshape(-1, 3)
        w = b[:, 0] | lax.shift_left(b[:, 1], jnp.uint32(8)) | lax.shift_left(b[:, 2], jnp.uint32(16))
    per = 4 if bits == 6 else 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    c: jax.Array = lax.shift_right_logical(w[:, None], shifts[None, :]) & jnp.uint32((1 << bits) - 1)
    return c.ravel()[:n].astype(jnp.uint8)
