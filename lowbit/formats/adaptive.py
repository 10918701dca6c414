"""Minifloats whose exponent bias is chosen from the data (AdaptivFloat).

A bias shift of ``d`` is the power-of-two scale ``2^d``: quantizing ``x`` with
bias ``base.bias + d`` equals ``quantize(base, x * 2^d) * 2^-d``. That identity is
the whole implementation; the rules below only choose ``d``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from lowbit.formats import _bits
from lowbit.formats._checks import check_float_input, check_int, check_name, check_range, require
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.protocol import BuiltinFormat, Encoded
from lowbit.formats.scales import _reduce_axes

RULES = ("max", "sqnr")
_MAX_SHIFT = 100  # bias shifts stay in [-100, 100]: 2^shift is a float32 normal


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveFloat(BuiltinFormat[tuple[jax.Array, ...]]):
    """A minifloat whose bias is chosen per tensor or per channel from the data.

    Attributes:
      base: the element format; its ``bias`` is the reference for shifts.
      rule: ``max`` (the largest bias such that max|x| <= max value) or ``sqnr``
        (try biases ``max_rule + d`` for ``d`` in ``search`` and keep the best SQNR).
      axis: ``None`` for one bias per tensor, else one bias per index of ``axis``.
      search: bias offsets tried by the ``sqnr`` rule (0 is the max rule).
      name: display name; not part of equality.
    """

    base: FloatFormat
    rule: str = "max"
    axis: int | None = None
    search: tuple[int, ...] = (-1, 0, 1, 2)
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        require(
            isinstance(self.base, FloatFormat) and self.base.radix == 2,
            "AdaptiveFloat",
            "base",
            self.base,
            "a radix-2 FloatFormat",
        )
        require(self.rule in RULES, "AdaptiveFloat", "rule", self.rule, ", ".join(RULES))
        if self.axis is not None:
            check_int("AdaptiveFloat", "axis", self.axis, -64, 63)
        require(
            isinstance(self.search, tuple)
            and 0 in self.search
            and all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and abs(d) <= _MAX_SHIFT
                for d in self.search
            ),
            "AdaptiveFloat",
            "search",
            self.search,
            f"a tuple of ints in [-{_MAX_SHIFT}, {_MAX_SHIFT}] that contains 0",
        )
        check_name("AdaptiveFloat", self.name)
        if not self.name:
            object.__setattr__(self, "name", f"adaptive_{self.base.name}_{self.rule}")

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def max_value(self) -> float:
        return self.base.max_value

    @property
    def has_nan(self) -> bool:
        return self.base.has_nan

    def _shifted(
        self, x: jax.Array, shift: jax.Array, saturate: bool, rounding: str, key: jax.Array | None
    ) -> jax.Array:
        """quantize(base, x * 2^shift) * 2^-shift, computed in float32."""
        xf = x.astype(jnp.float32)
        up, down = _pow2_pair(shift)
        return self.base._quantize(xf * up, saturate, rounding, key) * down

    def _choose(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        red = _reduce_axes(xf, self.axis)
        # initial=0: an empty tensor (or channel) has amax 0 and keeps the base bias.
        amax = jnp.max(jnp.abs(jnp.where(jnp.isfinite(xf), xf, 0.0)), axis=red, keepdims=True, initial=0.0)
        # Largest d with amax * 2^d <= max_value, from exponents and one mantissa compare.
        vmax = np.float32(self.base.max_value)
        emax = int(np.floor(np.log2(vmax)))
        safe = jnp.where(amax > 0, amax, jnp.float32(1.0))
        ea = _bits.exponent(safe)
        mant_a = _bits.to_bits(safe) & _bits.u32(0x7FFFFF)
        mant_v = int(vmax.view(np.uint32)) & 0x7FFFFF
        d = emax - ea - (mant_a > _bits.u32(mant_v)).astype(jnp.int32)
        d = jnp.where(amax > 0, d, 0)
        d = jnp.clip(d, -_MAX_SHIFT, _MAX_SHIFT)  # keeps 2^d a float32 normal
        if self.rule == "max":
            return d
        # Compare candidates on x * 2^d (its max near the format's max): a power-of-two
        # scale shifts every candidate's error alike, and tiny channels would
        # otherwise square their errors into float32 underflow and tie.
        up, _ = _pow2_pair(d)
        xn = xf * up
        best_d, best_err = d, None
        for off in self.search:
            cand = jnp.clip(d + off, -_MAX_SHIFT, _MAX_SHIFT)
            shift = jnp.full(d.shape, off, jnp.int32)
            err = jnp.sum(jnp.square(self._shifted(xn, shift, True, "nearest", None) - xn), axis=red, keepdims=True)
            if best_err is None:
                best_d, best_err = cand, err
            else:
                better = err < best_err
                best_d, best_err = jnp.where(better, cand, best_d), jnp.where(better, err, best_err)
        return best_d

    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array:
        return self._shifted(x, self._choose(x), saturate, rounding, key).astype(x.dtype)

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> tuple[jax.Array, ...]:
        d = self._choose(x)
        up, _ = _pow2_pair(d)
        codes = self.base._encode(x.astype(jnp.float32) * up, saturate, rounding, key)
        return codes, (self.base.bias + d).astype(jnp.int32)

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        if not isinstance(encoded, tuple) or len(encoded) != 2:
            raise ValueError(f"{self.name}: decode takes what encode returned, (codes, bias)")
        codes, bias = encoded
        if not jnp.issubdtype(bias.dtype, jnp.integer):
            raise TypeError(f"{self.name}: bias has dtype {bias.dtype}; allowed: an integer dtype (int32)")
        lo, hi = self.base.bias - _MAX_SHIFT, self.base.bias + _MAX_SHIFT
        check_range(
            bias,
            lo,
            hi,
            "bias",
            f"biases in [{lo}, {hi}], the range encode chooses from (under jit a bias outside is clamped into it)",
        )
        d = jnp.clip(bias.astype(jnp.int32) - self.base.bias, -_MAX_SHIFT, _MAX_SHIFT)
        _, down = _pow2_pair(d)
        return (self.base._decode(codes, jnp.float32) * down).astype(dtype)

    def _values(self) -> np.ndarray:
        return self.base._values()


def _pow2_pair(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _bits.pow2(d), _bits.pow2(-d)


def choose_bias(fmt: AdaptiveFloat, x: ArrayLike) -> jax.Array:
    """The exponent bias ``fmt`` picks for ``x`` (int32; per channel if ``fmt.axis`` is set, kept dims).

    An empty ``x`` (or channel) keeps ``fmt.base.bias``.
    """
    if not isinstance(fmt, AdaptiveFloat):
        raise TypeError(f"fmt has type {type(fmt).__name__}; allowed: an AdaptiveFloat")
    x = check_float_input(x)
    return (fmt.base.bias + fmt._choose(x)).astype(jnp.int32)
