"""Tests for lowbit.testing: the strategies reach the hard cases, and the suite catches broken formats.

The suite is only as good as the bugs it finds, so each property is checked
against a deliberately broken format (a subclass that breaks exactly one rule)
and must fail with that property's name.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from jax import lax

from lowbit import formats, testing
from lowbit.formats import AdaptiveFloat, FloatFormat, IntFormat

E3M3 = FloatFormat(ebits=3, mbits=3, specials="fn")


class TestE3M3(testing.FormatProperties):
    """The pytest form of the suite, as a user writes it."""

    fmt = E3M3


# ----- strategies ----------------------------------------------------------------------------


@pytest.mark.parametrize("specials", formats.SPECIALS)
@pytest.mark.parametrize("radix", [2, 4])
def test_float_formats_reach_every_radix_and_policy(specials, radix):
    found = find(testing.float_formats(), lambda f: f.radix == radix and f.specials == specials,
                 settings=settings(max_examples=5000, database=None))
    assert isinstance(found, FloatFormat)


@pytest.mark.parametrize("condition", [
    lambda f: not f.signed, lambda f: not f.zero, lambda f: f.min_value < 2.0**-126, lambda f: f.max_value > 2.0**100,
])
def test_float_formats_reach_unsigned_zeroless_and_extreme_ranges(condition):
    find(testing.float_formats(), condition, settings=settings(max_examples=5000, database=None))


@given(fmt=testing.float_formats(max_bits=6), ints=testing.int_formats(max_bits=5))
def test_drawn_formats_are_valid_and_within_bits(fmt, ints):
    assert fmt.bits <= 6 and ints.bits <= 5
    assert fmt == FloatFormat(ebits=fmt.ebits, mbits=fmt.mbits, bias=fmt.bias, radix=fmt.radix,
                              specials=fmt.specials, signed=fmt.signed, zero=fmt.zero)
    assert ints == IntFormat(bits=ints.bits, signed=ints.signed, narrow=ints.narrow)


def test_hard_values_hold_midpoints_ulps_thresholds_and_specials():
    fmt = formats.get("float8_e4m3fn")
    hv = testing.hard_values(fmt)
    bits = set(hv.view(np.uint32).tolist())
    v = formats.values(fmt).astype(np.float64)
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    for pts in (v.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))):
        assert set(pts.view(np.uint32).tolist()) <= bits
    assert {464.0, -464.0, 480.0, np.nextafter(np.float32(464), np.float32(0))} <= set(hv[np.isfinite(hv)].tolist())
    specials = {0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F800000, 0xFF800000, 0, 0x80000000, 1, 0x807FFFFF}
    assert specials <= bits
    assert hv.dtype == np.float32 and not hv.flags.writeable


@given(data=st.data())
def test_hard_arrays_and_floats_have_fixed_shapes_and_float32(data):
    fmt = data.draw(st.sampled_from([E3M3, formats.get("int4"), formats.get("fp4_radix4")]))
    x = data.draw(testing.hard_arrays(fmt, shape=(3, 5)))
    assert x.shape == (3, 5) and x.dtype == np.float32
    assert isinstance(data.draw(testing.hard_floats(fmt)), np.float32)


def test_formats_any_draws_every_kind():
    for kind in (FloatFormat, IntFormat, formats.BinaryFormat):
        find(testing.formats_any(), lambda f, kind=kind: isinstance(f, kind),
             settings=settings(max_examples=500, database=None))


# ----- the suite catches broken formats --------------------------------------------------------


class _TiesAway(FloatFormat):
    """Nudges every input one float32 ulp away from zero: exact ties round away from zero."""

    def _quantize(self, x, saturate, rounding, key):
        b = lax.bitcast_convert_type(x, jnp.uint32)
        finite = (b & jnp.uint32(0x7FFFFFFF)) < jnp.uint32(0x7F800000)
        nudged = lax.bitcast_convert_type(jnp.where(finite, b + jnp.uint32(1), b), jnp.float32)
        return super()._quantize(nudged, saturate, rounding, key)


class _NearestForStochastic(FloatFormat):
    """Stochastic rounding that is secretly round-to-nearest: on the grid, but biased."""

    def _quantize(self, x, saturate, rounding, key):
        return super()._quantize(x, saturate, "nearest" if rounding == "stochastic" else rounding, None)


class _NeverSaturates(FloatFormat):
    """Ignores saturate=True."""

    def _quantize(self, x, saturate, rounding, key):
        return super()._quantize(x, False, rounding, key)


class _LosesNaN(FloatFormat):
    """Quantizes NaN to zero."""

    def _quantize(self, x, saturate, rounding, key):
        return jnp.where(jnp.isnan(x), jnp.zeros_like(x), super()._quantize(x, saturate, rounding, key))


class _AlwaysUp(IntFormat):
    """toward_zero that rounds up instead."""

    def _quantize(self, x, saturate, rounding, key):
        if rounding == "toward_zero":
            return jnp.clip(jnp.ceil(x), self.min_int, self.max_int).astype(x.dtype)
        return super()._quantize(x, saturate, rounding, key)


class _BadDecode(IntFormat):
    """Decodes code 3 as 4."""

    def _decode(self, codes, dtype):
        out = super()._decode(codes, dtype)
        return jnp.where(codes == 3, jnp.asarray(4, dtype), out)


@pytest.mark.parametrize(("fmt", "message"), [
    (_TiesAway(ebits=3, mbits=2, specials="ieee"), "ties to the even code"),
    (_NearestForStochastic(ebits=3, mbits=2, specials="fn"), "unbiased"),
    (_NeverSaturates(ebits=3, mbits=2, specials="ieee"), "saturation"),
    (_LosesNaN(ebits=2, mbits=1, specials="finite"), "keeps NaN"),
    (_AlwaysUp(bits=4), "toward_zero"),
    (_BadDecode(bits=4), "decode(encode(v)) == v"),
])
def test_suite_catches_broken_formats(fmt, message):
    with pytest.raises(AssertionError, match="violates") as err:
        testing.check_format(fmt, examples=2)
    assert message in str(err.value)
    assert "x=" in str(err.value) or message.startswith("decode")  # the report names offending inputs


def test_check_array_takes_any_shape_and_chunks_it():
    x = np.linspace(-20, 20, 3 * 700, dtype=np.float32).reshape(3, 700)
    testing.check_array(E3M3, x)
    testing.check_array(E3M3, np.float32(math.pi))


@pytest.mark.parametrize("fmt", [AdaptiveFloat(base=E3M3), "float8_e4m3fn", None])
def test_only_element_formats(fmt):
    with pytest.raises(TypeError, match="element format"):
        testing.check_grid(fmt)
