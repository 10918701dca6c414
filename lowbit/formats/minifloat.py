"""Minifloats: any exponent/mantissa widths, bias, radix 2 or 4, five special-value policies.

A magnitude code ``c`` (the bits below the sign) splits into an exponent field
``e = c >> mbits`` and a fraction ``f``. Its value is ``(1 + f/2^m) * r^(e - bias)``,
or ``(f/2^m) * r^(1 - bias)`` for ``e == 0`` when the format has a zero
(subnormals). Formats without a zero (E8M0) read ``e == 0`` as an ordinary binade.

Radix-2 formats round on the float32 bit pattern (integer add + mask), which is
bit-exact and runs at memory speed. Radix-4 grids are not a mantissa truncation of
float32, so they round against their (short) table of midpoints instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.formats import _bits
from lowbit.formats._bits import u32
from lowbit.formats._checks import check_int, require

SPECIALS = ("ieee", "fn", "fnuz", "finite", "p3109")
_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatFormat:
    """A minifloat element format (hashable: usable as a static jit argument).

    Attributes:
      ebits: exponent field width, >= 1.
      mbits: mantissa (fraction) field width, 0..23.
      bias: exponent bias; ``None`` means the IEEE default ``2^(ebits-1) - 1``.
      radix: 2, or 4 (exponent steps of 4x, as in Sun et al. 2020's radix-4 FP4).
      specials: ``ieee`` (top exponent holds inf and NaN), ``fn`` (no inf, the
        all-ones code is NaN), ``fnuz`` (no inf, NaN at the negative-zero code,
        no -0), ``finite`` (every code is a number), ``p3109`` (NaN at the
        negative-zero code, +-inf at the two all-ones codes, no -0).
      signed: whether a sign bit is stored (sign-magnitude, sign at bit bits-1).
      zero: ``False`` for formats with no zero and no subnormals (E8M0).
      name: display name; not part of equality.
    """

    ebits: int
    mbits: int
    bias: int | None = None
    radix: int = 2
    specials: str = "ieee"
    signed: bool = True
    zero: bool = True
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        own = "FloatFormat"
        check_int(own, "ebits", self.ebits, 1)
        check_int(own, "mbits", self.mbits, 0, 23)
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.ebits - 1) - 1)
        check_int(own, "bias", self.bias, -(2**20), 2**20)
        require(self.radix in (2, 4), own, "radix", self.radix, "2 or 4")
        require(self.specials in SPECIALS, own, "specials", self.specials, ", ".join(SPECIALS))
        require(self.bits <= 16, own, "bits", self.bits, "sign + ebits + mbits <= 16")
        require(
            self.signed or self.specials in ("ieee", "fn", "finite"),
            own, "specials", self.specials, "ieee, fn or finite for an unsigned format",
        )
        require(
            self.specials != "ieee" or self.mbits >= 1,
            own, "mbits", self.mbits, ">= 1 with specials='ieee' (the top exponent holds inf and NaN)",
        )
        require(self.max_code >= (1 if self.zero else 0), own, "specials", self.specials,
                "a policy that leaves at least one positive finite value for these widths")
        smallest = self.grid_value(1 if self.zero else 0)
        require(
            self.max_value <= _F32_MAX and smallest >= 2.0**-149 and np.float32(smallest) == smallest,
            own, "bias", self.bias,
            "a bias that keeps every value exact in float32 "
            f"(here the values would span {smallest:.3g} .. {self.max_value:.3g})",
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
            return self.inf_code | (1 << (self.mbits - 1)) | sign
        if self.specials == "fn":
            return self._all_ones | sign
        if self.specials in ("fnuz", "p3109"):
            return self.sign_bit
        # finite: no NaN code; ml_dtypes writes a zero of the opposite sign.
        return self.sign_bit ^ sign

    @property
    def inf_code(self) -> int | None:
        """Magnitude code of +inf, or None."""
        if self.specials == "ieee":
            return self._all_ones - (1 << self.mbits) + 1
        return self._all_ones if self.specials == "p3109" else None

    @property
    def code_dtype(self):
        return jnp.uint8 if self.bits <= 8 else jnp.uint16

    # ----- tables -------------------------------------------------------------------
    def decode_table(self) -> np.ndarray:
        """float32 value of every code 0 .. 2^bits - 1 (NaN and inf included)."""
        return _decode_table(self)

    # ----- kernels ------------------------------------------------------------------
    def _round(self, a, rounding, rbits):
        """Round finite ``a >= 0`` (float32) onto the grid.

        Returns ``(value, mag)``: the rounded float32 value (possibly above
        ``max_value``, which callers treat as overflow) and its magnitude code.
        """
        if self.radix == 2:
            return _round_radix2(self, a, rounding, rbits)
        return _round_table(self, a, rounding, rbits)

    def _overflow(self, value, isinf, saturate, rounding):
        """Masks for results that leave the finite range: (to max, to inf, to NaN)."""
        over = value > jnp.float32(self.max_value)
        # Round-toward-zero never rounds a finite input up past the largest value.
        if saturate or not self.has_nan or rounding == "toward_zero":
            to_max, over = over, jnp.zeros_like(over)
        else:
            to_max = jnp.zeros_like(over)
        if saturate or not self.has_nan:
            to_max, isinf = to_max | isinf, jnp.zeros_like(isinf)
        over = over | isinf
        if self.has_inf:
            return to_max, over, jnp.zeros_like(over)
        return to_max, jnp.zeros_like(over), over

    def _unsigned_nan(self, a, neg):
        """Inputs an unsigned format cannot hold: negatives (and zero without a zero)."""
        nonzero = _bits.to_bits(a) != u32(0)  # integer test: CPUs read float32 subnormals as 0
        return neg & nonzero if self.zero else neg | ~nonzero

    def _encode(self, x, saturate, rounding, key):
        a, neg, isnan, isinf, rbits = _split(x, rounding, key)
        value, mag = self._round(a, rounding, rbits)
        to_max, to_inf, to_nan = self._overflow(value, isinf, saturate, rounding)
        mag = jnp.where(to_max, self.max_code, mag)
        if self.inf_code is not None:
            mag = jnp.where(to_inf, self.inf_code, mag)
        isnan = isnan | to_nan
        sign = jnp.where(neg, self.sign_bit, 0)
        if not self.has_negative_zero:
            sign = jnp.where(mag == 0, 0, sign)
        code = mag | sign
        if not self.signed:
            isnan = isnan | self._unsigned_nan(a, neg)
        code = jnp.where(isnan, jnp.where(neg, self.nan_code(True), self.nan_code(False)), code)
        return code.astype(self.code_dtype)

    def _quantize(self, x, saturate, rounding, key):
        a, neg, isnan, isinf, rbits = _split(x, rounding, key)
        value, _ = self._round(a, rounding, rbits)
        to_max, to_inf, to_nan = self._overflow(value, isinf, saturate, rounding)
        value = jnp.where(to_max, jnp.float32(self.max_value), value)
        value = jnp.where(to_inf, jnp.float32(jnp.inf), value)
        if self.signed:
            sbits = jnp.where(neg, u32(_bits.SIGN), u32(0))
            if not self.has_negative_zero:
                sbits = jnp.where(_bits.to_bits(value) == 0, u32(0), sbits)
            value = _bits.from_bits(_bits.to_bits(value) | sbits)
        else:
            to_nan = to_nan | self._unsigned_nan(a, neg)
        # NaN propagates even through formats without a NaN code: hiding it would be worse.
        value = jnp.where(isnan | to_nan, jnp.float32(jnp.nan), value)
        return value.astype(x.dtype)

    def _decode(self, codes, dtype):
        table = jnp.asarray(self.decode_table())
        return jnp.take(table, codes.astype(jnp.int32), mode="fill", fill_value=jnp.nan).astype(dtype)

    def _values(self) -> np.ndarray:
        t = self.decode_table()
        return np.unique(t[np.isfinite(t)]).astype(np.float32)


@functools.lru_cache(maxsize=None)
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
        table[fmt.sign_bit] = np.nan
    table.setflags(write=False)
    return table


def _split(x, rounding, key):
    """float32 magnitude, sign, NaN/inf masks and the random bits of ``x``."""
    b = _bits.to_bits(x.astype(jnp.float32))
    neg = b >= u32(_bits.SIGN)
    abits = b & u32(_bits.ABS)
    isnan = abits > u32(_bits.INF_BITS)
    isinf = abits == u32(_bits.INF_BITS)
    a = _bits.from_bits(jnp.where(isnan | isinf, u32(0), abits))
    rbits = jax.random.bits(key, x.shape, jnp.uint32) if rounding == "stochastic" else None
    return a, neg, isnan, isinf, rbits


def _scale(a, k: int):
    """a * 2^k, exact, for a static int k that may exceed float32's exponent range."""
    while k:
        step = max(-126, min(127, k))
        a = a * jnp.float32(2.0**step)
        k -= step
    return a


def _round_int(t, rounding, rbits):
    """Round float32 ``t >= 0`` to an integer-valued float32 per ``rounding``."""
    if rounding == "nearest":
        return lax.round(t, lax.RoundingMethod.TO_NEAREST_EVEN)
    fl = jnp.floor(t)
    if rounding == "toward_zero":
        return fl
    # u < frac(t) with u on a 2^-24 grid: unbiased to 2^-24 of a step (frac is exact).
    u = lax.shift_right_logical(rbits, u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
    return fl + (u < t - fl).astype(jnp.float32)


def _round_bits(abits, shift, rounding, rbits):
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
        abits = abits + (rbits & low)
    return abits & ~low


def _round_radix2(fmt: FloatFormat, a, rounding, rbits):
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


def _round_f32_subnormal(fmt: FloatFormat, n, rounding, rbits):
    """Round float32 subnormals (``n`` = bits = value / 2^-149) onto a radix-2 grid."""
    m, emin = fmt.mbits, fmt.emin
    e = -118 - lax.clz(n).astype(jnp.int32)  # floor(log2 value); -150 for zero
    # Grid step at this exponent, in units of 2^-149 (validated to be >= 1).
    step_exp = (jnp.maximum(e, emin) if fmt.zero else e) - m + 149
    r = _round_bits(n, jnp.clip(step_exp, 0, 31).astype(jnp.uint32), rounding, rbits)
    er = -118 - lax.clz(r).astype(jnp.int32)
    normal_mag = lax.shift_left(er + fmt.bias, m) | (
        lax.shift_right_logical(r, jnp.clip(er - m + 149, 0, 31).astype(jnp.uint32)).astype(jnp.int32)
        & ((1 << m) - 1)
    )
    if fmt.zero:
        sub = er < emin
        mag = jnp.where(sub, lax.shift_right_logical(r, u32(emin - m + 149)).astype(jnp.int32), normal_mag)
        return _bits.from_bits(r), mag
    low = e < emin  # no zero: below the smallest value rounds up to it
    r = jnp.where(low, u32(1 << (emin + 149)), r)
    return _bits.from_bits(r), jnp.where(low, 0, normal_mag)


def _round_table(fmt: FloatFormat, a, rounding, rbits):
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
        u = lax.shift_right_logical(rbits, u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
        idx = jnp.minimum(idx + (u * gap < a - lo).astype(jnp.int32), len(vals) - 1)
    return jnp.take(table, idx), idx
