"""Integer and binary element formats (values relative to a scale of 1).

Integers round (half to even by default) and then saturate, unlike ml_dtypes'
truncating integer casts: that is what a quantizer needs. Codes are two's
complement in the low ``bits`` bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from lowbit.formats import _bits
from lowbit.formats._bits import u32
from lowbit.formats._checks import check_bool, check_name, checked_int, require
from lowbit.formats.minifloat import U8, U16, _random, _round_int, _uniform
from lowbit.formats.protocol import BuiltinFormat, Encoded, codes_array


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat(BuiltinFormat[jax.Array]):
    """A b-bit integer grid.

    Attributes:
      bits: storage width, 1..16 (2..16 when signed).
      signed: two's complement when True (a bool).
      narrow: drop the most negative code so the grid is symmetric
        (int8 narrow is [-127, 127]); ternary is 2-bit narrow. Unsigned, it
        drops the largest code (a bool).
      name: display name; not part of equality.
    """

    bits: int
    signed: bool = True
    narrow: bool = False
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        own = "IntFormat"
        check_bool(own, "signed", self.signed)
        check_bool(own, "narrow", self.narrow)
        check_name(own, self.name)
        # A NumPy integer is taken and stored as a Python int: names, hashes and reprs stay plain.
        object.__setattr__(self, "bits", checked_int(own, "bits", self.bits, 2 if self.signed else 1, 16))
        require(
            self.signed or not self.narrow or self.bits >= 2,
            own,
            "narrow",
            self.narrow,
            "False for a 1-bit unsigned format (narrow would leave only 0)",
        )
        if not self.name:
            kind = "int" if self.signed else "uint"
            object.__setattr__(self, "name", f"{kind}{self.bits}" + ("_narrow" if self.narrow else ""))

    @property
    def min_int(self) -> int:
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + int(self.narrow)

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1 - int(self.narrow)

    @property
    def max_value(self) -> float:
        return float(self.max_int)

    @property
    def has_nan(self) -> bool:
        return False

    @property
    def code_dtype(self) -> DTypeLike:
        return U8 if self.bits <= 8 else U16

    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        del saturate  # integers always saturate: an integer grid has no overflow code
        xf = x.astype(jnp.float32)
        if rounding == "nearest":  # half to even is sign-symmetric: round x itself
            q = lax.round(xf, lax.RoundingMethod.TO_NEAREST_EVEN)
        elif rounding == "toward_zero":
            q = jnp.trunc(xf)
        else:  # round the magnitude so the random draw is sign-symmetric too
            b = _bits.to_bits(xf)
            mag = _round_int(_bits.from_bits(b & u32(_bits.ABS)), rounding, _random(rounding, key, x.shape))
            q = _bits.from_bits(_bits.to_bits(mag) | (b & u32(_bits.SIGN)))
        return jnp.clip(q, jnp.float32(self.min_int), jnp.float32(self.max_int)).astype(x.dtype)

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        q = self._quantize(x.astype(jnp.float32), saturate, rounding, key)
        q = jnp.where(jnp.isnan(q), jnp.float32(0), q).astype(jnp.int32)
        return (q & ((1 << self.bits) - 1)).astype(self.code_dtype)

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        codes = codes_array(encoded, self.name)
        # Only the low `bits` bits are read (formats.decode rejects wider concrete codes).
        c = codes.astype(jnp.int32) & ((1 << self.bits) - 1)
        if self.signed:  # sign-extend the low `bits` bits
            c = lax.shift_right_arithmetic(lax.shift_left(c, 32 - self.bits), 32 - self.bits)
        return c.astype(dtype)

    def _values(self) -> np.ndarray:
        return np.arange(self.min_int, self.max_int + 1, dtype=np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryFormat(BuiltinFormat[jax.Array]):
    """{-1, +1} (1 bit: code 0 is +1, code 1 is -1); sign(0) = +1 (XNOR-Net).

    Stochastic rounding is BinaryConnect's: +1 with probability (1 + x) / 2, x
    clipped to [-1, 1]; toward-zero rounding has no zero to go to and takes the sign.
    """

    name: str = dataclasses.field(default="binary", compare=False)

    def __post_init__(self) -> None:
        check_name("BinaryFormat", self.name)

    bits = 1
    max_value = 1.0
    has_nan = False
    code_dtype = U8

    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        del saturate  # every input maps onto the grid
        one = jnp.ones((), x.dtype)
        if rounding == "stochastic":  # BinaryConnect: P(+1) = (1 + x) / 2, unbiased on [-1, 1]
            xf = jnp.clip(x.astype(jnp.float32), jnp.float32(-1), jnp.float32(1))
            u = _uniform(_random(rounding, key, x.shape))
            return jnp.where(jnp.isnan(x), x, jnp.where(u < (1 + xf) / 2, one, -one))
        return jnp.where(jnp.isnan(x), x, jnp.where(_negative(x), -one, one))

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        return _negative(self._quantize(x, saturate, rounding, key)).astype(jnp.uint8)

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        codes = codes_array(encoded, self.name)
        return (1 - 2 * (codes.astype(jnp.int32) & 1)).astype(dtype)

    def _values(self) -> np.ndarray:
        return np.array([-1.0, 1.0], np.float32)


def _negative(x: jax.Array) -> jax.Array:
    """x < 0 on the bits: CPUs read float32 subnormals as zero, and -0 is not negative."""
    return _bits.to_bits(x.astype(jnp.float32)) > u32(_bits.SIGN)
