"""Minifloats: any exponent/mantissa widths, bias, radix 2 or 4, five special-value policies.

A magnitude code ``c`` (the bits below the sign) splits into an exponent field
``e = c >> mbits`` and a fraction ``f``. Its value is ``(1 + f/2^m) * r^(e - bias)``,
or ``(f/2^m) * r^(1 - bias)`` for ``e == 0`` when the format has a zero
(subnormals). Formats without a zero (E8M0) read ``e == 0`` as an ordinary binade.

Every kernel is bit-exact and close to memory speed. Round-to-nearest on a radix-2
grid is the float32 adder's own rounding (``_round_adder``); stochastic and
toward-zero rounding work on the float32 bit pattern (integer add + mask). Grids
of bare powers (no mantissa: E8M0, P3109 precision 1, radix-4 FP4) round on the
exponent bits (``_round_pow``). Other radix-4 grids are not a mantissa
truncation of float32, so they round against their (short) table of midpoints.
Grids reaching below float32's normal range take integer paths where the CPU
would flush float arithmetic on subnormals to zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from lowbit.formats import _bits
from lowbit.formats._bits import u32
from lowbit.formats._checks import check_bool, check_int, check_name, require
from lowbit.formats.protocol import BuiltinFormat, Encoded, codes_array

SPECIALS = ("ieee", "fn", "fnuz", "finite", "p3109")
_F32_MAX = float(np.finfo(np.float32).max)
# Width limits. Every value must be exact in float32, so a radix-2 grid has at most
# float32's 23 fraction bits and 8 exponent bits: 32 bits with the sign (e8m23 is
# float32 itself). Those formats round on the float32 bit pattern and decode by
# integer arithmetic, so no kernel depends on the width. Tables of every code
# (``decode_table``, ``values``) stop at 16 bits (65536 entries): past that a table
# is 2^17 .. 2^32 entries, so they refuse instead. Radix-4 grids round against a
# table of every magnitude, so they keep the 16-bit cap.
MAX_MBITS = 23
MAX_BITS = 32
TABLE_BITS = 16
# The code dtypes (jax's scalar types, typed as the dtype-likes they are).
U8: DTypeLike = jnp.uint8
U16: DTypeLike = jnp.uint16
U32: DTypeLike = jnp.uint32


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class FloatFormat(BuiltinFormat[jax.Array]):
    """A minifloat element format (hashable: usable as a static jit argument).

    Attributes:
      ebits: exponent field width, 1..8 (float32 holds at most 2^8 binades).
      mbits: mantissa (fraction) field width, 0..23 (float32's fraction width),
        so at most 32 bits in all; radix-4 formats at most 16 bits in all.
        Codes are uint8 up to 8 bits, uint16 up to 16, uint32 above; formats
        wider than 16 bits have no ``decode_table``/``values`` (2^bits entries).
      bias: exponent bias in [-256, 256]; ``None`` means the IEEE default
        ``2^(ebits-1) - 1``. Every value must be exact in float32 (checked).
      radix: 2, or 4 (exponent steps of 4x, as in Sun et al. 2020's radix-4 FP4).
      specials: ``ieee`` (top exponent holds inf and NaN), ``fn`` (no inf, the
        all-ones code is NaN), ``fnuz`` (no inf, NaN at the negative-zero code,
        no -0), ``finite`` (every code is a number), ``p3109`` (NaN at the
        negative-zero code, +-inf at the two all-ones codes, no -0).
      signed: whether a sign bit is stored (sign-magnitude, sign at bit bits-1);
        a bool, as is ``zero``.
      zero: ``False`` for formats with no zero and no subnormals (E8M0).
      name: display name; not part of equality.
    """

    ebits: int
    mbits: int
    bias: int  # an int once built (None at construction means the IEEE default)
    radix: int = 2
    specials: str = "ieee"
    signed: bool = True
    zero: bool = True
    name: str = dataclasses.field(default="", compare=False)

    def __init__(
        self,
        *,
        ebits: int,
        mbits: int,
        bias: int | None = None,
        radix: int = 2,
        specials: str = "ieee",
        signed: bool = True,
        zero: bool = True,
        name: str = "",
    ) -> None:
        # Written out, not generated, so that ``bias`` may be None here and is an int once built.
        fields = dict(ebits=ebits, mbits=mbits, radix=radix, specials=specials, signed=signed, zero=zero, name=name)
        for field, value in fields.items():
            object.__setattr__(self, field, value)
        self._validate(bias)

    def _validate(self, bias: int | None) -> None:
        """Check every field (``ValueError``/``TypeError`` naming it) and store ``bias``."""
        own = "FloatFormat"
        # Every field is bounded before anything is computed from it. float32
        # spans 2^-149 .. 2^128, 277 binades: 8 exponent bits (256 binades) is
        # the most any grid can use, and a bias beyond +-256 cannot fit either;
        # the value check below then pins the exact range.
        check_int(own, "ebits", self.ebits, 1, 8)
        check_int(own, "mbits", self.mbits, 0, MAX_MBITS)
        check_bool(own, "signed", self.signed)
        check_bool(own, "zero", self.zero)
        check_name(own, self.name)
        check_int(own, "radix", self.radix, 2, 4)
        # NumPy integers pass the checks; stored as Python ints (ldexp and hashing need them).
        for field in ("ebits", "mbits", "radix"):
            object.__setattr__(self, field, int(getattr(self, field)))
        require(self.radix in (2, 4), own, "radix", self.radix, "2 or 4")
        require(
            isinstance(self.specials, str) and self.specials in SPECIALS,
            own,
            "specials",
            self.specials,
            ", ".join(SPECIALS),
        )
        require(self.bits <= MAX_BITS, own, "bits", self.bits, f"sign + ebits + mbits <= {MAX_BITS}")
        require(
            self.radix == 2 or self.bits <= TABLE_BITS,
            own,
            "bits",
            self.bits,
            f"sign + ebits + mbits <= {TABLE_BITS} for radix 4 (radix-4 grids round against a table "
            "of every magnitude)",
        )
        if bias is None:
            bias = 2 ** (self.ebits - 1) - 1
        check_int(own, "bias", bias, -256, 256)
        object.__setattr__(self, "bias", int(bias))
        require(
            self.signed or self.specials in ("ieee", "fn", "finite"),
            own,
            "specials",
            self.specials,
            "ieee, fn or finite for an unsigned format",
        )
        require(
            self.specials != "ieee" or self.mbits >= 1,
            own,
            "mbits",
            self.mbits,
            ">= 1 with specials='ieee' (the top exponent holds inf and NaN)",
        )
        require(
            self.specials != "ieee" or self.ebits >= 2,
            own,
            "ebits",
            self.ebits,
            ">= 2 with specials='ieee' (one exponent bit leaves no normal binade)",
        )
        # Without a zero, the negative-zero code would be -min (E8M0 is unsigned for this reason).
        require(self.zero or not self.signed, own, "zero", self.zero, "False only for an unsigned format")
        require(
            self.max_code >= (1 if self.zero else 0),
            own,
            "specials",
            self.specials,
            "a policy that leaves at least one positive finite value for these widths",
        )
        smallest = self.grid_value(1 if self.zero else 0)
        # CPUs flush float32 subnormal arithmetic to zero: radix-2 grids handle those
        # inputs on integer bits, but overflow tests and radix-4 tables need normals.
        floor = 2.0**-126 if self.radix == 2 else 2.0**-100
        require(
            self.max_value <= _F32_MAX
            and self.max_value >= 2.0**-126
            and smallest >= 2.0**-149
            and np.float32(smallest) == smallest
            and (self.radix == 2 or smallest >= floor),
            own,
            "bias",
            self.bias,
            "a bias that keeps every value exact in float32, the largest >= 2^-126"
            + (" and the smallest >= 2^-100 (radix 4)" if self.radix == 4 else "")
            + f" (here the values would span {smallest:.3g} .. {self.max_value:.3g})",
        )
        if not self.name:
            object.__setattr__(self, "name", f"e{self.ebits}m{self.mbits}")

    # ----- code layout (Python ints, computed once) -------------------------------
    @property
    def bits(self) -> int:
        """Total storage width in bits."""
        return int(self.signed) + self.ebits + self.mbits

    @property
    def sign_bit(self) -> int:
        """Code of the sign bit (0 for unsigned formats)."""
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def _all_ones(self) -> int:
        return (1 << (self.ebits + self.mbits)) - 1

    @functools.cached_property
    def max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        top = self._all_ones
        reserved = {"ieee": 1 << self.mbits, "fn": 1, "p3109": 1}.get(self.specials, 0)
        return top - reserved

    @property
    def has_nan(self) -> bool:
        return self.specials != "finite"

    @property
    def has_inf(self) -> bool:
        return self.specials in ("ieee", "p3109")

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.zero and self.specials not in ("fnuz", "p3109")

    def grid_value(self, mag: int) -> float:
        """Value of magnitude code ``mag`` on the format's unbounded grid (Python float)."""
        e, f = divmod(mag, 1 << self.mbits)
        log2r = 1 if self.radix == 2 else 2
        if self.zero and e == 0:
            return math.ldexp(f, log2r * (1 - self.bias) - self.mbits)
        return math.ldexp((1 << self.mbits) + f, log2r * (e - self.bias) - self.mbits)

    @property
    def max_value(self) -> float:
        """Largest finite value."""
        return self.grid_value(self.max_code)

    @property
    def min_value(self) -> float:
        """Smallest positive value (the smallest subnormal, or code 0 without a zero)."""
        return self.grid_value(1 if self.zero else 0)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value."""
        return self.grid_value(1 << self.mbits if self.zero else 0)

    @property
    def emin(self) -> int:
        """Radix-2 exponent of the smallest normal (radix-2 formats)."""
        return (1 if self.zero else 0) - self.bias

    def nan_code(self, negative: bool = False) -> int:
        """The code ``encode`` gives NaN (ml_dtypes' choice: a quiet NaN keeping the sign)."""
        sign = self.sign_bit if negative else 0
        if self.specials == "ieee":
            return self._ieee_inf_code | (1 << (self.mbits - 1)) | sign
        if self.specials == "fn":
            return self._all_ones | sign
        if self.specials in ("fnuz", "p3109"):
            return self.sign_bit
        # finite: no NaN code; ml_dtypes writes a zero of the opposite sign.
        return self.sign_bit ^ sign

    @property
    def _ieee_inf_code(self) -> int:
        """Magnitude code of +inf with specials ``ieee``: the top exponent, fraction 0."""
        return self._all_ones - (1 << self.mbits) + 1

    @property
    def inf_code(self) -> int | None:
        """Magnitude code of +inf, or None."""
        if self.specials == "ieee":
            return self._ieee_inf_code
        return self._all_ones if self.specials == "p3109" else None

    @property
    def code_dtype(self) -> DTypeLike:
        """The codes' dtype: uint8 up to 8 bits, uint16 up to 16, else uint32."""
        if self.bits <= 8:
            return U8
        return U16 if self.bits <= 16 else U32

    # ----- tables -------------------------------------------------------------------
    def decode_table(self) -> np.ndarray:
        """float32 value of every code 0 .. 2^bits - 1 (NaN and inf included).

        Raises:
          ValueError: the format is wider than 16 bits (the table would have 2^bits entries).
        """
        require(
            self.bits <= TABLE_BITS,
            "FloatFormat",
            "bits",
            self.bits,
            f"at most {TABLE_BITS} for decode_table() and values(), which list all 2^bits codes "
            f"(2^{self.bits} here); encode, decode and quantize take formats of up to {MAX_BITS} bits",
        )
        return _decode_table(self)

    # ----- kernels ------------------------------------------------------------------
    @functools.cached_property
    def _over_bound(self) -> float | None:
        """The power of the radix just above ``max_value``, or None past float32.

        Non-saturating kernels clamp magnitudes (inf included) to it: it is a grid
        value, so it rounds to itself and overflow still reads ``value > max_value``,
        and it keeps the kernels' intermediate powers of two finite.
        """
        step = 1 if self.radix == 2 else 2
        exp = (math.frexp(self.max_value)[1] - 1) // step * step + step
        return math.ldexp(1.0, exp) if exp <= 127 else None

    @functools.cached_property
    def _adder_rounds(self) -> bool:
        """Whether ``_round_adder`` is exact for this format (see there)."""
        return (
            self.radix == 2
            and 1 <= self.mbits < _bits.MANT  # c must lie a binade above a: 23 fraction bits leave none
            and self.zero
            and self.min_value / 2 >= 2.0**-126
            and self._over_bound is not None
            and math.log2(self._over_bound) + _bits.MANT - self.mbits <= 127
        )

    @functools.cached_property
    def _pow_grid(self) -> bool:
        """Whether ``_round_pow`` covers this format (see there)."""
        if self.mbits != 0 or self.min_value < 2.0**-127:
            return False
        return self.min_value >= 2.0**-126 or (self.radix == 2 and not self.zero)

    def _clamp(self, abits: jax.Array, saturate: bool) -> jax.Array:
        """|x| as float32 (from its bits), clamped to the largest magnitude the kernels need.

        NaN stays NaN only where ``_round`` says it keeps NaN; callers mask it otherwise.
        """
        bound = self.max_value if saturate or not self.has_nan else self._over_bound
        if bound is None:
            return _bits.from_bits(abits)
        if self.min_value / 2 >= 2.0**-126:
            # A float min keeps NaN in one op; it flushes float32 subnormals to zero,
            # which is where this grid rounds them anyway.
            return jnp.minimum(_bits.from_bits(abits), jnp.float32(bound))
        return _bits.from_bits(jnp.minimum(abits, u32(_f32_bits(bound))))

    def _round(self, a: jax.Array, rounding: str, rbits: jax.Array | None) -> tuple[jax.Array, jax.Array, bool]:
        """Round ``a``, a magnitude from ``_clamp``, onto the unbounded grid.

        Returns ``(value, mag, keeps_nan)``: the rounded value (above ``max_value``
        means overflow), its magnitude code as uint32, and whether ``value`` is NaN
        where ``a`` is (a Python bool; else it is garbage there, as ``mag`` always is).
        """
        if self._pow_grid:
            value, mag = _round_pow(self, a, rounding, rbits)
        elif self.radix == 4:
            value, mag = _round_table(self, a, rounding, rbits)
        elif rounding == "nearest" and self._adder_rounds:
            return (*_round_adder(self, a), True)
        else:
            value, mag = _round_radix2(self, a, rounding, rbits)
        return value, mag.astype(jnp.uint32), False

    def _nan_inputs(self, b: jax.Array) -> jax.Array:
        """Inputs (bits ``b``) that give NaN whatever the rounding.

        NaN, and for an unsigned format the values it cannot hold: negatives, and
        zero without a zero. Integer tests: CPUs read float32 subnormals as zero.
        """
        if self.signed:
            return (b & u32(_bits.ABS)) > u32(_bits.INF_BITS)
        if self.zero:  # NaN or negative, but -0 is +0
            return (b > u32(_bits.INF_BITS)) & (b != u32(_bits.SIGN))
        return b - u32(1) >= u32(_bits.INF_BITS)  # NaN, negative or +-0 (+0 wraps)

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        b = _bits.to_bits(x.astype(jnp.float32))
        abits = b & u32(_bits.ABS)
        _, mag, _ = self._round(self._clamp(abits, saturate), rounding, _random(rounding, key, x.shape))
        isnan = self._nan_inputs(b)
        if not saturate and self.has_nan:  # overflow follows the format; else _clamp saturated
            over = mag > u32(self.max_code)
            if rounding == "toward_zero":  # never rounds a finite input past max_value
                mag, over = jnp.where(over, u32(self.max_code), mag), abits == u32(_bits.INF_BITS)
            inf_code = self.inf_code  # an int exactly when the format has inf
            if inf_code is not None:
                mag = jnp.where(over, u32(inf_code), mag)
            else:
                isnan = isnan | over
        neg = b >= u32(_bits.SIGN)
        sign = jnp.where(neg, u32(self.sign_bit), u32(0))
        if not self.has_negative_zero:
            sign = jnp.where(mag == 0, u32(0), sign)
        nan = jnp.where(neg, u32(self.nan_code(True)), u32(self.nan_code(False)))
        return jnp.where(isnan, nan, mag | sign).astype(self.code_dtype)

    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        b = _bits.to_bits(x.astype(jnp.float32))
        abits = b & u32(_bits.ABS)
        value, _, keeps_nan = self._round(self._clamp(abits, saturate), rounding, _random(rounding, key, x.shape))
        if not saturate and self.has_nan:
            over = value > jnp.float32(self.max_value)  # a float32 normal, checked at construction
            if rounding == "toward_zero":  # never rounds a finite input past max_value
                # An integer min (NaN, now max, is masked below): a float select against
                # max_value compiles to a min instruction, which flushes float32
                # subnormals (E8M0's 2^-127) to zero.
                value = _bits.from_bits(jnp.minimum(_bits.to_bits(value), u32(_f32_bits(self.max_value))))
                over, keeps_nan = abits == u32(_bits.INF_BITS), False
            value = jnp.where(over, jnp.float32(jnp.inf if self.has_inf else jnp.nan), value)
        if self.signed:
            vbits, sign = _bits.to_bits(value), b & u32(_bits.SIGN)
            if not self.has_negative_zero:
                sign = jnp.where(vbits == 0, u32(0), sign)
            value = _bits.from_bits(vbits | sign)
        if not (keeps_nan and self.signed):
            # NaN propagates even through formats without a NaN code: hiding it would be worse.
            value = jnp.where(self._nan_inputs(b), jnp.float32(jnp.nan), value)
        return value.astype(x.dtype)

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        # Only the low `bits` bits are read (formats.decode rejects wider concrete codes).
        codes = codes_array(encoded, self.name)
        if self.bits > TABLE_BITS:  # radix 2 (checked at construction): from the bits, no table
            return _bits.from_bits(_decode_bits(self, codes)).astype(dtype)
        table = jnp.asarray(self.decode_table())
        return jnp.take(table, codes.astype(jnp.int32) & ((1 << self.bits) - 1), mode="clip").astype(dtype)

    def _values(self) -> np.ndarray:
        t = self.decode_table()
        return np.unique(t[np.isfinite(t)]).astype(np.float32)


@functools.cache
def _decode_table(fmt: FloatFormat) -> np.ndarray:
    table = np.empty(1 << fmt.bits, np.float32)
    nmag = 1 << (fmt.ebits + fmt.mbits)
    for code in range(1 << fmt.bits):
        mag, neg = code % nmag, code >= nmag
        if mag <= fmt.max_code:
            v = fmt.grid_value(mag)
        elif mag == fmt.inf_code:
            v = math.inf
        else:
            v = math.nan
        table[code] = -v if neg else v
    if fmt.specials in ("fnuz", "p3109") and fmt.signed:
        table[fmt.sign_bit] = -math.nan  # the negative-zero code; ml_dtypes reads it as -NaN
    table.setflags(write=False)
    return table


def _decode_bits(fmt: FloatFormat, codes: jax.Array) -> jax.Array:
    """float32 bit patterns of ``codes`` of a radix-2 format, by integer arithmetic (any width).

    Equal to ``decode_table()`` bit for bit (NaN is 0x7FC00000 with the code's
    sign, as the table's ``-nan``), but needs no table: a magnitude code is the
    integer significand ``sig`` (the fraction, with the implicit bit unless the
    code is subnormal) times ``2^k``; normalising ``sig`` by its leading bit gives
    the float32 exponent and fraction, and values below 2^-126 are float32
    subnormals ``sig * 2^(k + 149)`` (exact: every value is exact in float32).
    """
    m = fmt.mbits
    c = codes.astype(jnp.uint32) & u32((1 << fmt.bits) - 1)
    mag = c & u32(fmt._all_ones)
    e = lax.shift_right_logical(mag, u32(m)).astype(jnp.int32)
    frac = mag & u32((1 << m) - 1)
    implicit = u32(1 << m)
    if fmt.zero:
        sig = jnp.where(e == 0, frac, frac | implicit)
        k = jnp.maximum(e, 1) - (fmt.bias + m)
    else:
        sig, k = frac | implicit, e - (fmt.bias + m)
    top = 31 - lax.clz(sig).astype(jnp.int32)  # floor(log2 sig); sig < 2^24, so top <= 23
    exp = top + k
    fraction = lax.shift_left(sig, jnp.clip(_bits.MANT - top, 0, 31).astype(jnp.uint32)) & u32((1 << _bits.MANT) - 1)
    normal = lax.shift_left((exp + 127).astype(jnp.uint32), u32(_bits.MANT)) | fraction
    sub = k + 149  # sig * 2^k = (sig * 2^sub) * 2^-149; exact in float32, so a right shift drops zeros
    subnormal = jnp.where(
        sub >= 0,
        lax.shift_left(sig, jnp.clip(sub, 0, 31).astype(jnp.uint32)),
        lax.shift_right_logical(sig, jnp.clip(-sub, 0, 31).astype(jnp.uint32)),
    )
    out = jnp.where(sig == 0, u32(0), jnp.where(exp >= -126, normal, subnormal))
    nan = u32(0x7FC00000)
    if fmt.max_code < fmt._all_ones:  # codes above max_code are inf or NaN
        special = nan if fmt.inf_code is None else jnp.where(mag == u32(fmt.inf_code), u32(_bits.INF_BITS), nan)
        out = jnp.where(mag > u32(fmt.max_code), special, out)
    if fmt.signed:
        if fmt.specials in ("fnuz", "p3109"):  # the negative-zero code is NaN
            out = jnp.where(c == u32(fmt.sign_bit), nan, out)
        out = out | jnp.where(c >= u32(fmt.sign_bit), u32(_bits.SIGN), u32(0))
    return out


def _f32_bits(v: float) -> int:
    """The float32 bit pattern of a Python float that float32 holds exactly."""
    return int(np.float32(v).view(np.uint32))


def _random(rounding: str, key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """The random words stochastic rounding consumes (None for the other roundings)."""
    if rounding != "stochastic":
        return None
    if key is None:  # formats.* check this first (check_rounding); the kernels rely on it
        raise ValueError("rounding='stochastic' needs an explicit jax.random key (key=...)")
    return _bits.random_bits(key, shape)


def _words(rbits: jax.Array | None) -> jax.Array:
    """The random words of stochastic rounding, which ``_random`` draws whenever rounding is stochastic."""
    assert rbits is not None, "stochastic rounding without random words"
    return rbits


def _uniform(rbits: jax.Array | None) -> jax.Array:
    """A uniform float32 in [0, 1) on a 2^-24 grid from random words."""
    u: jax.Array = lax.shift_right_logical(_words(rbits), u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
    return u


def _scale(a: jax.Array, k: int) -> jax.Array:
    """a * 2^k, exact, for a static int k that may exceed float32's exponent range."""
    while k:
        step = max(-126, min(127, k))
        a = a * jnp.float32(2.0**step)
        k -= step
    return a


def _round_int(t: jax.Array, rounding: str, rbits: jax.Array | None) -> jax.Array:
    """Round float32 ``t >= 0`` to an integer-valued float32 per ``rounding``."""
    if rounding == "nearest":
        return lax.round(t, lax.RoundingMethod.TO_NEAREST_EVEN)
    fl = jnp.floor(t)
    if rounding == "toward_zero":
        return fl
    # u < frac(t) with u on a 2^-24 grid: unbiased to 2^-24 of a step (frac is exact).
    return fl + (_uniform(rbits) < t - fl).astype(jnp.float32)


def _round_bits(abits: jax.Array, shift: int | jax.Array, rounding: str, rbits: jax.Array | None) -> jax.Array:
    """Round a non-negative float32 bit pattern (or a fixed-point integer) at bit ``shift``.

    ``shift`` is a static int or a uint32 array (per-element shifts, 0..31).
    """
    if isinstance(shift, int):
        if shift == 0:
            return abits
        shift = u32(shift)
    low = lax.shift_left(u32(1), shift) - u32(1)
    if rounding == "nearest":
        odd = lax.shift_right_logical(abits, shift) & u32(1)
        # half - 1 + odd: ties go to the even neighbour; with shift 0 nothing is added.
        bump = lax.shift_right_logical(low, u32(1)) + jnp.where(shift > 0, odd, u32(0))
        abits = abits + bump
    elif rounding == "stochastic":
        abits = abits + (_words(rbits) & low)
    return abits & ~low


def _round_adder(fmt: FloatFormat, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Round half to even by the float32 adder: ``(a + c) - c``.

    ``c = 2^(max(floor(log2 a), emin) - mbits + 23)`` is the power of two whose ulp
    is the grid step at ``a``; ``a + c`` stays in c's binade, so the addition
    rounds ``a`` once, half to even, and subtracting ``c`` is exact. That is
    the whole normal and subnormal rounding in five vector ops, and NaN passes
    through. Valid when ``c`` stays finite for every clamped ``a`` and the grid's
    smallest half-step is a float32 normal (the CPU flushes float32 subnormals to
    zero, which is where they round anyway). ``c`` depends on ``a``, so the
    compiler cannot fold ``(a + c) - c`` away (it does for a constant ``c``).
    """
    m = fmt.mbits
    cbits = jnp.maximum(_bits.to_bits(a) & u32(_bits.INF_BITS), u32((fmt.emin + 127) << _bits.MANT))
    cbits = cbits + u32((_bits.MANT - m) << _bits.MANT)
    c = _bits.from_bits(cbits)
    s = a + c
    # Inside c's binade bits count grid steps: s - c is (2^m + fraction) steps for a
    # normal result, the fraction for a subnormal one; c's exponent gives the rest.
    binade = lax.shift_right_logical(cbits, u32(_bits.MANT)) - u32(fmt.emin + 150 - m)
    mag = (_bits.to_bits(s) - cbits) + lax.shift_left(binade, u32(m))
    return s - c, mag


def _round_pow(fmt: FloatFormat, a: jax.Array, rounding: str, rbits: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Grids of powers of the radix (mbits == 0: E8M0, P3109 precision 1, radix-4 FP4), on the bits.

    A power of 2 or 4 is a float32 with a zero mantissa (and, radix 4, an odd
    biased exponent). Flooring onto the grid is therefore a mask on the bits, and
    rounding to nearest first adds the distance from the lower power to the
    midpoint, 1.5 * 2^k (mantissa 0x400000) or 2.5 * 4^k (mantissa 0x200000 in the
    binade 2^(2k+1)), less one, plus one more when the upper neighbour has the even
    code: the carry into the exponent is the round-up decision. Ties go by the code,
    not by float32's exponent parity, which differs when the bias is even.
    Integer-only except for stochastic rounding's radix-4 and below-the-grid
    decisions, so float32 subnormals need no flush workaround; E8M0's 2^-127 is one,
    handled by moving its binade to where a normal exponent field 0 would put it.
    """
    radix2 = fmt.radix == 2
    low = np.float32(fmt.min_value)
    low_bits = _f32_bits(fmt.min_value)
    abits = _bits.to_bits(a)
    t = jnp.maximum(abits, u32(low_bits))  # below the grid: decided at the end
    shifted = low_bits < 1 << _bits.MANT
    if shifted:  # [2^-127, 2^-126) is linear in the bits: 2t - 2^23 gives it field 0
        t = jnp.minimum(t, t + t - u32(1 << _bits.MANT))
    exp_lsb = _bits.MANT if radix2 else _bits.MANT + 1  # lowest exponent bit that counts
    # Radix 4 floors to an odd biased exponent: field - 1 (folded into the add), then set bit 0.
    lower = 0 if radix2 else 1 << _bits.MANT
    if rounding == "nearest":
        # Upper code even: radix 2 when field + bias is even, radix 4 when (field >> 1) + bias is odd.
        parity = lax.shift_right_logical(t, u32(exp_lsb))
        if (fmt.bias + radix2) % 2:
            parity = parity + u32(1)
        half = 0x3FFFFF if radix2 else 0x5FFFFF
        t = t + u32((half - lower) % 2**32) + (parity & u32(1))
    elif not radix2:
        t = t - u32(lower)
    elif rounding == "stochastic":  # uniform in the binade: p = (a - lo) / lo
        t = t + (_words(rbits) & u32((1 << _bits.MANT) - 1))
    r = (t if radix2 else t | u32(lower)) & u32(_bits.INF_BITS)
    mag = lax.shift_right_logical(r, u32(exp_lsb)) + u32((fmt.bias - (127 if radix2 else 63)) % 2**32)
    if shifted:
        r = jnp.maximum(r, u32(low_bits))  # field 0 is 2^-127 again
    value = _bits.from_bits(r)
    if rounding == "stochastic" and not radix2:
        below = abits < u32(low_bits) if fmt.zero else jnp.zeros(a.shape, bool)
        lo = jnp.where(below, jnp.float32(0), value)
        gap = jnp.where(below, jnp.float32(low), value * jnp.float32(3))
        up = _uniform(rbits) * gap < a - lo  # as _round_table decides, bit for bit
        return jnp.where(up, lo + gap, lo), jnp.where(below, u32(0), mag) + up.astype(jnp.uint32)
    if not fmt.zero:
        return value, mag  # everything below the grid rounds up to its smallest value
    if rounding == "nearest":  # the tie at low / 2 goes to zero, code 0
        zero = abits <= u32(_f32_bits(fmt.min_value / 2))
    elif rounding == "toward_zero":
        zero = abits < u32(low_bits)
    else:  # t was lifted onto low, so it stays low; only zero or low are possible
        zero = (abits < u32(low_bits)) & ~(_uniform(rbits) * jnp.float32(low) < a)
    return jnp.where(zero, jnp.float32(0), value), jnp.where(zero, u32(0), mag)


def _round_radix2(
    fmt: FloatFormat, a: jax.Array, rounding: str, rbits: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    m, emin, shift = fmt.mbits, fmt.emin, _bits.MANT - fmt.mbits
    abits = _bits.to_bits(a)
    r = _round_bits(abits, shift, rounding, rbits)
    value = _bits.from_bits(r)
    mag = lax.shift_right_logical(r, u32(shift)).astype(jnp.int32) + ((fmt.bias - 127) << m)
    below = a < jnp.float32(2.0**emin)
    if fmt.zero:  # subnormals: a fixed-point grid of step 2^(emin - m)
        n = _round_int(_scale(a, m - emin), rounding, rbits)
        value = jnp.where(below, _scale(n, emin - m), value)
        mag = jnp.where(below, n.astype(jnp.int32), mag)
    else:  # no zero: everything below the smallest value rounds up to it
        value = jnp.where(below, jnp.float32(2.0**emin), value)
        mag = jnp.where(below, 0, mag)
    if fmt.min_value / 2 < 2.0**-126:
        # The grid reaches into float32's subnormals, where CPUs flush float
        # arithmetic to zero: round those inputs on their integer bits instead.
        tiny = abits < u32(1 << _bits.MANT)
        v2, m2 = _round_f32_subnormal(fmt, abits, rounding, rbits)
        value, mag = jnp.where(tiny, v2, value), jnp.where(tiny, m2, mag)
    return value, mag


def _round_f32_subnormal(
    fmt: FloatFormat, n: jax.Array, rounding: str, rbits: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Round float32 subnormals (``n`` = bits = value / 2^-149) onto a radix-2 grid."""
    m, emin = fmt.mbits, fmt.emin
    e = -118 - lax.clz(n).astype(jnp.int32)  # floor(log2 value); -150 for zero
    # Grid step at this exponent, in units of 2^-149 (validated to be >= 1).
    step_exp = (jnp.maximum(e, emin) if fmt.zero else e) - m + 149
    r = _round_bits(n, jnp.clip(step_exp, 0, 31).astype(jnp.uint32), rounding, rbits)
    er = -118 - lax.clz(r).astype(jnp.int32)
    normal_mag = lax.shift_left(er + fmt.bias, m) | (
        lax.shift_right_logical(r, jnp.clip(er - m + 149, 0, 31).astype(jnp.uint32)).astype(jnp.int32) & ((1 << m) - 1)
    )
    if fmt.zero:
        sub = er < emin
        mag = jnp.where(sub, lax.shift_right_logical(r, u32(emin - m + 149)).astype(jnp.int32), normal_mag)
        return _bits.from_bits(r), mag
    low = e < emin  # no zero: below the smallest value rounds up to it
    r = jnp.where(low, u32(1 << (emin + 149)), r)
    return _bits.from_bits(r), jnp.where(low, 0, normal_mag)


def _round_table(fmt: FloatFormat, a: jax.Array, rounding: str, rbits: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Nearest / stochastic / toward-zero rounding against the magnitude table."""
    vals = [fmt.grid_value(c) for c in range(fmt.max_code + 2)]  # one past max: overflow
    table = jnp.asarray(np.array(vals, np.float32))
    idx = jnp.zeros(a.shape, jnp.int32)
    if rounding == "nearest":
        for i in range(len(vals) - 1):
            mid = (vals[i] + vals[i + 1]) / 2
            assert np.float32(mid) == mid, "midpoint must be exact in float32"
            up = (a > jnp.float32(mid)) | ((a == jnp.float32(mid)) & ((i + 1) % 2 == 0))
            idx = idx + up.astype(jnp.int32)
        return jnp.take(table, idx), idx
    for v in vals[1:]:
        idx = idx + (a >= jnp.float32(v)).astype(jnp.int32)
    idx = jnp.minimum(idx, len(vals) - 2) if rounding == "toward_zero" else idx
    if rounding == "stochastic":
        lo = jnp.take(table, idx)
        gap = jnp.take(table, jnp.minimum(idx + 1, len(vals) - 1)) - lo
        idx = jnp.minimum(idx + (_uniform(rbits) * gap < a - lo).astype(jnp.int32), len(vals) - 1)
    return jnp.take(table, idx), idx
