"""Tests for lowbit.testing: the strategies reach the hard cases, and the suite catches broken formats.

The suite is only as good as the bugs it finds, so each property is checked
against a deliberately broken format (a subclass that breaks exactly one rule)
and must fail with that property's name.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.database import InMemoryExampleDatabase
from jax import lax

from lowbit import formats, quant, testing
from lowbit.formats import AdaptiveFloat, FloatFormat, IntFormat

E3M3 = FloatFormat(ebits=3, mbits=3, specials="fn")


class TestE3M3(testing.FormatProperties):
    """The pytest form of the suite, as a user writes it."""

    fmt = E3M3


# ----- strategies ----------------------------------------------------------------------------


@pytest.mark.parametrize("specials", formats.SPECIALS)
@pytest.mark.parametrize("radix", [2, 4])
def test_float_formats_reach_every_radix_and_policy(specials, radix):
    found = find(
        testing.float_formats(),
        lambda f: f.radix == radix and f.specials == specials,
        settings=settings(max_examples=5000, database=None),
    )
    assert isinstance(found, FloatFormat)


@pytest.mark.parametrize(
    "condition",
    [
        lambda f: not f.signed,
        lambda f: not f.zero,
        lambda f: f.min_value < 2.0**-126,
        lambda f: f.max_value > 2.0**100,
    ],
)
def test_float_formats_reach_unsigned_zeroless_and_extreme_ranges(condition):
    find(testing.float_formats(), condition, settings=settings(max_examples=5000, database=None))


@given(fmt=testing.float_formats(max_bits=6), ints=testing.int_formats(max_bits=5))
def test_drawn_formats_are_valid_and_within_bits(fmt, ints):
    assert fmt.bits <= 6 and ints.bits <= 5
    assert fmt == FloatFormat(
        ebits=fmt.ebits,
        mbits=fmt.mbits,
        bias=fmt.bias,
        radix=fmt.radix,
        specials=fmt.specials,
        signed=fmt.signed,
        zero=fmt.zero,
    )
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
        find(
            testing.formats_any(),
            lambda f, kind=kind: isinstance(f, kind),
            settings=settings(max_examples=500, database=None),
        )


# ----- the suite catches broken formats --------------------------------------------------------


class _TiesAway(FloatFormat):
    """Nudges every input one float32 ulp away from zero: exact ties round away from zero."""

    def _quantize(self, x, saturate, rounding, key):
        b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        finite = (b & jnp.uint32(0x7FFFFFFF)) < jnp.uint32(0x7F800000)
        nudged = lax.bitcast_convert_type(jnp.where(finite, b + jnp.uint32(1), b), jnp.float32)
        return super()._quantize(nudged, saturate, rounding, key).astype(x.dtype)


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


# ----- a user's format, written against the protocol alone (no lowbit import) ---------------

_LUT = np.array([-8, -4, -2, -1, -0.5, -0.25, -0.125, 0, 0.125, 0.25, 0.5, 1, 2, 4, 8], np.float32)


class UserLUT:
    """Zero and +-2^k for k in -3..3 as a 4-bit table; code 15 is NaN. Only jax and numpy."""

    name, bits, max_value, has_nan = "user_lut4", 4, 8.0, True

    def _index(self, x, rounding, key):
        x = x.astype(jnp.float32)
        t = jnp.asarray(_LUT)
        i = jnp.clip(jnp.searchsorted(t, x, side="right").astype(jnp.int32) - 1, 0, _LUT.size - 2)
        lo, hi = t[i], t[i + 1]
        if rounding == "nearest":
            mid = (lo + hi) / 2  # exact: neighbours are zero or powers of two a factor 2 apart
            up = (x > mid) | ((x == mid) & (i % 2 == 1))
        elif rounding == "stochastic":
            up = jax.random.uniform(key, x.shape) * (hi - lo) < x - lo
        else:
            up = jnp.where(x >= 0, x >= hi, (hi <= 0) & (x > lo))
        return i + up.astype(jnp.int32)

    def encode(self, x, *, saturate, rounding, key):
        return jnp.where(jnp.isnan(x), 15, self._index(x, rounding, key)).astype(jnp.uint8)

    def decode(self, codes, *, dtype):
        table = jnp.asarray(np.append(_LUT, np.float32(np.nan)))
        return jnp.take(table, codes.astype(jnp.int32), mode="fill", fill_value=jnp.nan).astype(dtype)

    def quantize(self, x, *, saturate, rounding, key):
        q = jnp.take(jnp.asarray(_LUT), self._index(x, rounding, key)).astype(x.dtype)
        return jnp.where(jnp.isnan(x), x, q)

    def values(self):
        return _LUT.copy()


USER = UserLUT()


class _KeylessStochastic(FloatFormat):
    """Stochastic rounding that ignores its key (always key 0): unbiased and reproducible, but not random."""

    def _quantize(self, x, saturate, rounding, key):
        return super()._quantize(x, saturate, rounding, None if key is None else jax.random.key(0))


class _HalfTruncates(FloatFormat):
    """Right for float32 inputs; bfloat16 and float16 inputs are rounded toward zero instead of to nearest."""

    def _quantize(self, x, saturate, rounding, key):
        if x.dtype != jnp.float32 and rounding == "nearest":
            rounding = "toward_zero"
        return super()._quantize(x, saturate, rounding, key)


class _HalfEncodesWrong(FloatFormat):
    """encode is off by one code for 16-bit inputs only."""

    def _encode(self, x, saturate, rounding, key):
        codes = super()._encode(x, saturate, rounding, key)
        return codes if x.dtype == jnp.float32 else codes ^ jnp.uint8(1)


class _UserTiesUp:
    """A user's lookup-table format (below) whose nearest rounding sends every tie up."""

    def __init__(self):
        self.inner = UserLUT()
        self.name, self.bits, self.max_value, self.has_nan = "ties_up", 4, 8.0, True

    def encode(self, x, *, saturate, rounding, key):
        return self.inner.encode(_nudge_up(x), saturate=saturate, rounding=rounding, key=key)

    def decode(self, codes, *, dtype):
        return self.inner.decode(codes, dtype=dtype)

    def quantize(self, x, *, saturate, rounding, key):
        return self.inner.quantize(_nudge_up(x), saturate=saturate, rounding=rounding, key=key).astype(x.dtype)

    def values(self):
        return self.inner.values()


def _nudge_up(x):
    return jnp.nextafter(x.astype(jnp.float32), jnp.float32(jnp.inf))


E4M3_BIAS8 = FloatFormat(ebits=4, mbits=3, bias=8, specials="fn")  # self-consistent, but not e4m3fn


def _e4m3fn(x):
    return x.astype(ml_dtypes.float8_e4m3fn)


# Each mutant breaks the contract one way; the kit must name the property it breaks.
MUTANTS = [
    (_TiesAway(ebits=3, mbits=2, specials="ieee"), None, "ties to the even code"),
    (_NearestForStochastic(ebits=3, mbits=2, specials="fn"), None, "unbiased"),
    (_NeverSaturates(ebits=3, mbits=2, specials="ieee"), None, "saturation"),
    (_LosesNaN(ebits=2, mbits=1, specials="finite"), None, "keeps NaN"),
    (_AlwaysUp(bits=4), None, "toward_zero"),
    (_BadDecode(bits=4), None, "decode(encode(v)) == v"),
    (_KeylessStochastic(ebits=3, mbits=2, specials="fn"), None, "stochastic rounding uses its key"),
    (_HalfTruncates(ebits=3, mbits=2, specials="fn"), None, "bfloat16 inputs: quantize (near)"),
    (_HalfEncodesWrong(ebits=3, mbits=2, specials="fn"), None, "float16 inputs: encode"),
    (_UserTiesUp(), None, "ties to the even code"),
    (E4M3_BIAS8, _e4m3fn, "matches the reference"),
]


@pytest.mark.parametrize(
    ("fmt", "reference", "message"),
    MUTANTS,
    ids=[type(m[0]).__name__.strip("_") + (":reference" if m[1] else "") for m in MUTANTS],
)
def test_suite_kills_every_mutant(fmt, reference, message):
    with pytest.raises(AssertionError, match="violates") as err:
        testing.check_format(fmt, examples=2, reference=reference)
    assert message in str(err.value)
    assert "x=" in str(err.value) or message.startswith("decode")  # the report names offending inputs


def test_bias_8_passes_without_a_reference_and_e4m3fn_passes_with_it():
    # The wrong bias is self-consistent: only the reference can tell it from e4m3fn.
    testing.check_format(E4M3_BIAS8, examples=2)
    testing.check_format("float8_e4m3fn", examples=2, reference=_e4m3fn)


class _SaturatesNothingAndLosesNaN(FloatFormat):
    def _quantize(self, x, saturate, rounding, key):
        q = super()._quantize(x, False, rounding, key)
        return jnp.where(jnp.isnan(x), jnp.zeros_like(x), q)


def test_check_format_reports_every_failing_property_at_once():
    with pytest.raises(AssertionError) as err:
        testing.check_format(_SaturatesNothingAndLosesNaN(ebits=3, mbits=2, specials="ieee"), examples=2)
    text = str(err.value)
    assert "keeps NaN" in text and "saturation" in text and "quantize == decode(encode)" in text
    assert text.count("\n  ") == int(text.split("violates ")[1].split(" ")[0])  # one line per property


class _WrongBetween(FloatFormat):
    """Rounds (1.13, 1.17) up to 1.25 instead of down to 1.125: between the hard values, so only drawn inputs
    find it."""

    def _quantize(self, x, saturate, rounding, key):
        q = super()._quantize(x, saturate, rounding, key)
        ax = jnp.abs(x)
        return jnp.where((ax > 1.13) & (ax < 1.17), jnp.sign(x) * jnp.asarray(1.25, x.dtype), q)


def test_check_format_raises_inside_given_so_hypothesis_shrinks_and_saves_the_input():
    fmt = _WrongBetween(ebits=3, mbits=3, specials="fn")
    testing.check_grid(fmt)  # every deterministic input passes: only a drawn one fails
    db = InMemoryExampleDatabase()
    settings.register_profile("_before_this_test", settings.default)
    settings.register_profile("_with_db", settings.default, database=db)
    settings.load_profile("_with_db")
    try:
        with pytest.raises(AssertionError, match="nearest rounding") as err:
            testing.check_format(fmt, examples=20)
    finally:
        settings.load_profile("_before_this_test")
    assert "x=1.1" in str(err.value) or "x=-1.1" in str(err.value)
    # Hypothesis saved the failing input under check_format's key: it was raised inside @given.
    assert any(k.startswith(b"lowbit.check_format") for k in db.data)


def test_reference_must_be_callable_and_keep_the_shape():
    with pytest.raises(TypeError, match="reference"):
        testing.check_format(E3M3, reference="ml_dtypes")
    with pytest.raises(AssertionError, match="reference\\(x\\) has x's shape"):
        testing.check_format(E3M3, examples=1, reference=lambda x: x[:3])


def _lut_reference(x):
    """UserLUT's nearest rounding in numpy: the nearest entry, ties to the even code, saturating; NaN stays."""
    xc = np.clip(x.astype(np.float64), _LUT[0], _LUT[-1])
    d = np.abs(np.nan_to_num(xc)[:, None] - _LUT[None, :])
    nearest = d == d.min(1, keepdims=True)
    even = nearest & (np.arange(_LUT.size) % 2 == 0)
    idx = np.where(even.any(1), even.argmax(1), nearest.argmax(1))
    return np.where(np.isnan(x), np.float32(np.nan), _LUT[idx])


# The two-line pytest form, here with the reference a user would write in numpy.
test_user_format_two_lines = testing.format_test(USER, examples=3, reference=_lut_reference)


def test_user_format_is_a_format_registers_and_quantizes():
    assert isinstance(USER, formats.Format)
    formats.register("user_lut4", USER)
    formats.register("user_lut4", USER)  # the same format again: a no-op
    assert formats.get("user_lut4") is USER and "user_lut4" in formats.names()
    q = quant.Quantizer(format="user_lut4", granularity=quant.Channel(axis=-1))
    w = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
    y = quant.fake_quant(q, w)
    step = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 8.0
    np.testing.assert_array_equal(np.asarray(y), np.asarray(formats.quantize(USER, w / step) * step))
    qt = quant.quantize(q, w)
    assert qt.codes.size == w.size // 2  # 4-bit codes, two per byte
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qt)), np.asarray(y))


@pytest.mark.parametrize(
    ("name", "fmt", "error", "match"),
    [
        ("user_lut4", UserLUT(), ValueError, "already registered"),  # a different object under a taken name
        ("float8_e4m3fn", USER, ValueError, "already registered"),
        ("p3109_k9p3", USER, ValueError, "reserved"),
        ("has space", USER, ValueError, "letters, digits"),
        ("", USER, ValueError, "letters, digits"),
        (3, USER, TypeError, "a string"),
        ("not_a_format", object(), TypeError, "lacks name, bits, max_value, has_nan, encode"),
    ],
)
def test_register_rejects_taken_reserved_and_bad_names_and_non_formats(name, fmt, error, match):
    formats.register("user_lut4", USER)
    with pytest.raises(error, match=match):
        formats.register(name, fmt)


def test_api_rejects_a_non_format_naming_what_it_lacks():
    with pytest.raises(TypeError, match="lacks .*quantize"):
        formats.quantize(object(), jnp.zeros(3, jnp.float32))


def test_check_array_takes_any_shape_and_chunks_it():
    x = np.linspace(-20, 20, 3 * 700, dtype=np.float32).reshape(3, 700)
    testing.check_array(E3M3, x)
    testing.check_array(E3M3, np.float32(math.pi))


@pytest.mark.parametrize("fmt", [AdaptiveFloat(base=E3M3), formats.get("mxfp4_e2m1"), "float8_e4m3fn", None])
def test_only_element_formats(fmt):
    with pytest.raises(TypeError, match="element format"):
        testing.check_grid(fmt)
