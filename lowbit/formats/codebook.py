"""Codebook (lookup-table) formats: any sorted table of up to 256 values, as QLoRA's NF4.

The code of ``values[i]`` (ascending) is ``codes[i]``, by default ``i``. Rounding
works on the table alone, exactly in float32: nearest compares ``x`` with the
exact midpoints between neighbours (held as a float32 threshold plus whether the
midpoint is exact, so a tie is recognised only where float32 can hold it) and
breaks ties to the even code; stochastic rounding picks one of the two
neighbours with probability proportional to closeness (unbiased); toward-zero
takes the neighbour on x's side of zero. Every input saturates to the table's
ends (a codebook has no overflow code). Unused codes decode to NaN, and
``encode`` writes NaN as the smallest of them; a table that uses every code has
no NaN code, so there ``encode`` writes the code of the value nearest zero
while ``quantize`` keeps NaN. ``quantize`` returns ``x``'s dtype, so for
bfloat16 or float16 inputs it returns the table value rounded to that dtype
(NF4's values need float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.formats import _bits
from lowbit.formats._checks import require
from lowbit.formats.minifloat import U8, _random, _uniform
from lowbit.formats.protocol import BuiltinFormat, Encoded, codes_array

MAX_ENTRIES = 256  # codes are uint8

# QLoRA's NormalFloat4 (Dettmers et al. 2023), as bitsandbytes ships it (float32 values).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# AbnormalFloat4 for blocks of 64 (Yoshida 2023, "NF4 Isn't Information Theoretically
# Optimal (and that's Good)"), as bitsandbytes ships it; bitsandbytes stores the table
# descending, here codes index the ascending table.
AF4_B64_VALUES = (
    -1.0,
    -0.69441008,
    -0.51243739,
    -0.3736951,
    -0.25607552,
    -0.14982478,
    -0.04934812,
    0.0,
    0.04273164,
    0.12934483,
    0.21961274,
    0.31675666,
    0.42563882,
    0.55496234,
    0.72424863,
    1.0,
)


@dataclasses.dataclass(frozen=True, init=False)
class CodebookFormat(BuiltinFormat[jax.Array]):
    """A lookup-table element format (hashable: usable as a static jit argument).

    Built as ``CodebookFormat(values=..., codes=None, name="")``; ``values()``
    is the protocol method (the table as float32 numpy), ``table`` the stored tuple.

    Attributes:
      table: the ``values`` given, strictly ascending finite numbers, 2..256 of
        them, each zero or of magnitude >= 2^-100; each is rounded to float32
        on construction (they must stay distinct), and -0.0 is stored as +0.0.
      codes: the code of each value, distinct integers in 0..255; ``None``
        means ``0, 1, 2, ...`` (the index). Exact ties round to the lower
        neighbour when its code is even, else to the upper one (the even code
        whenever the two codes differ in parity).
      name: display name; not part of equality.
    """

    table: tuple[float, ...]
    codes: tuple[int, ...]
    name: str = dataclasses.field(compare=False)

    def __init__(
        self, *, values: Sequence[float] | np.ndarray, codes: Sequence[int] | None = None, name: str = ""
    ) -> None:
        own = "CodebookFormat"
        v = values
        ok = isinstance(v, (tuple, list, np.ndarray)) and 2 <= len(v) <= MAX_ENTRIES
        require(ok, own, "values", v, f"a sequence of 2..{MAX_ENTRIES} numbers")
        require(
            all(isinstance(e, (int, float, np.floating, np.integer)) and not isinstance(e, bool) for e in v),
            own,
            "values",
            v,
            "real numbers (not bools or strings)",
        )
        with np.errstate(over="ignore"):
            t = np.asarray(v, np.float64).astype(np.float32)
        require(bool(np.isfinite(t).all()), own, "values", v, "finite numbers inside float32's range")
        # Stochastic rounding takes differences of neighbours in float32; CPUs flush subnormal results.
        require(
            bool(((t == 0) | (np.abs(t) >= 2.0**-100)).all()),
            own,
            "values",
            v,
            "zero or magnitudes >= 2^-100 (so gaps between neighbours stay float32 normals)",
        )
        require(
            bool((np.diff(t) > 0).all()), own, "values", v, "strictly ascending numbers that stay distinct in float32"
        )
        object.__setattr__(self, "table", tuple(float(e) + 0.0 for e in t))  # + 0.0: -0 becomes +0
        c = tuple(range(len(t))) if codes is None else codes
        ok = (
            isinstance(c, (tuple, list))
            and len(c) == len(t)
            and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) and 0 <= e < MAX_ENTRIES for e in c)
        )
        require(
            ok and len(set(c)) == len(c),
            own,
            "codes",
            c,
            f"None or {len(t)} distinct integers in [0, {MAX_ENTRIES - 1}], one per value",
        )
        object.__setattr__(self, "codes", tuple(int(e) for e in c))
        require(isinstance(name, str), own, "name", name, "a string")
        object.__setattr__(self, "name", name or f"codebook{len(t)}")

    # ----- the Format protocol's attributes --------------------------------------
    @property
    def bits(self) -> int:
        """Code width: enough bits for the largest code."""
        return max(1, math.ceil(math.log2(max(self.codes) + 1)))

    @property
    def max_value(self) -> float:
        """The largest magnitude in the table: a scaled quantizer maps its absmax there."""
        return max(-self.table[0], self.table[-1])

    @property
    def has_nan(self) -> bool:
        """Whether some code is unused (unused codes decode to NaN)."""
        return len(self.table) < 1 << self.bits

    code_dtype = U8

    # ----- tables ------------------------------------------------------------------
    @functools.cached_property
    def _table(self) -> np.ndarray:
        return np.array(self.table, np.float32)

    @functools.cached_property
    def _codes(self) -> np.ndarray:
        return np.array(self.codes, np.uint8)

    @functools.cached_property
    def _decode_table(self) -> np.ndarray:
        """float32 value of every code 0 .. 2^bits - 1 (NaN for unused codes)."""
        table = np.full(2**self.bits, np.nan, np.float32)
        table[self._codes] = self._table
        return table

    @functools.cached_property
    def _midpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """Per neighbour pair ``(k, k+1)``: float32 floor of the exact midpoint, and
        whether a tie there rounds up (the midpoint is a float32 and code ``k`` is odd)."""
        v = self._table.astype(np.float64)
        mid = (v[:-1] + v[1:]) / 2  # exact in float64
        floor = mid.astype(np.float32)
        floor = np.where(floor > mid, np.nextafter(floor, np.float32(-np.inf)), floor).astype(np.float32)
        tie_up = (floor == mid) & (self._codes[:-1] % 2 == 1)
        return floor, tie_up

    @functools.cached_property
    def _nan_code(self) -> int:
        if self.has_nan:
            return int(np.flatnonzero(np.isnan(self._decode_table))[0])
        return int(self._codes[np.argmin(np.abs(self._table))])

    # ----- kernels -------------------------------------------------------------------
    def _index(self, xf: jax.Array, rounding: str, key: jax.Array | None) -> jax.Array:
        """int32 table index of float32 ``xf`` (NaN: garbage, callers mask it).

        Comparisons run on order keys (``_order_key``), integers, because CPUs read
        float32 subnormals as zero in float compares.
        """
        n = self._table.size
        xk = _order_key(_bits.to_bits(xf))
        if rounding == "nearest":
            floor, tie_up = self._midpoints
            fk = jnp.asarray(_order_key_np(floor))
            # x is past midpoint k iff x > floor_k, or x == floor_k at an exact tie that goes up.
            i = jnp.searchsorted(fk, xk, side="left").astype(jnp.int32)
            j = jnp.minimum(i, n - 2)
            up = (jnp.take(fk, j) == xk) & jnp.take(jnp.asarray(tie_up), j) & (i < n - 1)
            return i + up.astype(jnp.int32)
        tk = jnp.asarray(_order_key_np(self._table))
        below = jnp.clip(jnp.searchsorted(tk, xk, side="right").astype(jnp.int32) - 1, 0, n - 2)
        if rounding == "stochastic":
            # u < (x - lo) / (hi - lo), u on a 2^-24 grid; outside the table this saturates.
            # Nonzero table values are >= 2^-100 in magnitude, so the gap is a float32 normal.
            table = jnp.asarray(self._table)
            lo, hi = jnp.take(table, below), jnp.take(table, below + 1)
            up = _uniform(_random(rounding, key, xf.shape)) * (hi - lo) < xf - lo
            return below + up.astype(jnp.int32)
        # toward zero: the lower neighbour for x >= 0 unless it is negative, the upper one for
        # x < 0 unless it is positive; outside the table, the nearer end.
        lo, hi = jnp.take(tk, below), jnp.take(tk, below + 1)
        take_hi = jnp.where(xk >= 0, (xk >= hi) | (lo < 0), (hi <= 0) & (xk > lo))
        return below + take_hi.astype(jnp.int32)

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        del saturate  # every input maps onto the table: a codebook has no overflow code
        xf = x.astype(jnp.float32)
        codes = jnp.take(jnp.asarray(self._codes), self._index(xf, rounding, key))
        return jnp.where(jnp.isnan(xf), jnp.uint8(self._nan_code), codes)

    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        del saturate
        xf = x.astype(jnp.float32)
        q = jnp.take(jnp.asarray(self._table), self._index(xf, rounding, key))
        return jnp.where(jnp.isnan(xf), xf, q).astype(x.dtype)

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        codes = codes_array(encoded, self.name)
        return jnp.take(
            jnp.asarray(self._decode_table), codes.astype(jnp.int32), mode="fill", fill_value=jnp.nan
        ).astype(dtype)

    def _values(self) -> np.ndarray:
        return self._table.copy()


NF4 = CodebookFormat(values=NF4_VALUES, name="nf4")
AF4 = CodebookFormat(values=AF4_B64_VALUES, name="af4")
# float4_e2m1fn as a table with its own sign-magnitude codes (sign at bit 3): a
# cross-check of the table kernels against the minifloat ones.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude codes 0..7
FP4_E2M1_CODEBOOK = CodebookFormat(
    values=tuple(-m for m in _E2M1_MAGNITUDES[:0:-1]) + _E2M1_MAGNITUDES,
    codes=tuple(8 | c for c in range(7, 0, -1)) + tuple(range(8)),
    name="fp4_e2m1_codebook",
)


def _order_key(bits: jax.Array) -> jax.Array:
    """float32 bits (uint32) -> int32 keys ordered as the floats are (-0 and +0 share key 0)."""
    b = lax.bitcast_convert_type(bits, jnp.int32)
    return jnp.where(b < 0, -(b & 0x7FFFFFFF), b)


def _order_key_np(v: np.ndarray) -> np.ndarray:
    """``_order_key`` of float32 numpy values."""
    b = np.asarray(v, np.float32).view(np.int32)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b).astype(np.int32)
