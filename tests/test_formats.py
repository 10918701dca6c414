"""Tests for lowbit.formats: table-driven over the registry, against ml_dtypes and hand tables.

Every ml_dtypes float format is compared bit for bit with ml_dtypes on 2^20
float32 inputs built from ml_dtypes' own code table (values, midpoints, one ulp
either side, overflow thresholds, NaN payloads, subnormals, random bits); formats
ml_dtypes lacks are compared with tables written here from their definitions.
Each format compiles one jitted function at one shape; the per-format property
suite (``lowbit.testing.check_format``) runs over the whole registry and over
Hypothesis-drawn formats.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from lowbit import formats, testing
from lowbit.formats import AdaptiveFloat, BinaryFormat, FloatFormat, IntFormat

ELEMENT = [n for n in formats.names() if isinstance(formats.get(n), (FloatFormat, IntFormat, BinaryFormat))]
ML_DTYPES = [
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
]
# One format of each kind, for the checks that compile a function per format.
KINDS = [
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e8m0fnu",
    "float4_e2m1fn",
    "fp4_radix4",
    "int4",
    "uint4",
    "ternary",
    "binary",
    "p3109_k8p3",
]
N_ML = 2**20  # inputs per ml_dtypes format: one compiled shape
SHAPE = (4, 64)  # the shape of the small eager checks
# Enough random arrays per format to matter, few enough for the CI budget.
EXAMPLES = max(3, settings.default.max_examples // 5)


def _bits32(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _padded(x, size: int = 1024) -> jnp.ndarray:
    """``x`` as float32, zero-padded to ``size``: one shape, so eager ops compile once for all formats."""
    x = np.asarray(x, np.float32).ravel()
    assert x.size <= size
    return jnp.asarray(np.pad(x, (0, size - x.size)))


def _random_floats(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 9, shape))).astype(np.float32)


# ----- the registry and the property suite --------------------------------------------------


def test_registry_names_every_design_format():
    wanted = ML_DTYPES + ["int8", "int4", "int2", "uint8", "uint4", "uint2", "fp4_radix4", "binary", "ternary"]
    wanted += [f"p3109_k{k}p{p}" for k in range(3, 9) for p in range(1, k)]
    assert set(wanted) <= set(formats.names())
    assert all(formats.get(n).name == n for n in wanted)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="float8_e4m3fn") as err:
        formats.get("float8_e9m9")
    assert "float8_e9m9" in str(err.value) and "p3109_k8p3" in str(err.value)


@pytest.mark.parametrize("name", ELEMENT)
class TestEveryFormat:
    def test_property_suite(self, name):
        testing.check_format(formats.get(name), examples=EXAMPLES)

    def test_keeps_dtype(self, name):
        fmt = formats.get(name)
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            x = jnp.asarray(_random_floats(1)).astype(dtype)
            q = formats.quantize(fmt, x)
            assert q.dtype == dtype and q.shape == x.shape
            # Rounding happens in float32: the result is the float32 one, cast back.
            ref = formats.quantize(fmt, x.astype(jnp.float32)).astype(dtype)
            np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(ref, np.float32))
            assert formats.decode(fmt, formats.encode(fmt, x), dtype=dtype).dtype == dtype

    def test_integer_input_is_a_type_error(self, name):
        fmt = formats.get(name)
        for x in (jnp.arange(4), jnp.arange(4, dtype=jnp.uint8), jnp.array([True, False])):
            with pytest.raises(TypeError, match="float32"):
                formats.quantize(fmt, x)
            with pytest.raises(TypeError, match="float32"):
                formats.encode(fmt, x)

    def test_codes_dtype_and_width(self, name):
        fmt = formats.get(name)
        codes = formats.encode(fmt, jnp.asarray(_random_floats(2)))
        assert codes.dtype == (jnp.uint8 if fmt.bits <= 8 else jnp.uint16)
        assert int(codes.max()) < 2**fmt.bits


@pytest.mark.parametrize("name", KINDS)
def test_jit_and_vmap_agree_with_eager(name):
    fmt = formats.get(name)
    x = jnp.asarray(_random_floats(3))
    keys = jax.random.split(jax.random.key(0), 3)

    def stochastic(row, key):
        return formats.quantize(fmt, row, rounding="stochastic", key=key)

    @jax.jit
    def run(x, keys):
        return (
            jax.vmap(lambda row: formats.quantize(fmt, row))(x),
            jax.vmap(lambda row: formats.encode(fmt, row))(x),
            jax.vmap(stochastic, in_axes=(None, 0))(x[0], keys),
        )

    q, codes, by_key = (np.asarray(a) for a in run(x, keys))
    np.testing.assert_array_equal(q, np.asarray(formats.quantize(fmt, x)))
    np.testing.assert_array_equal(codes, np.asarray(formats.encode(fmt, x)))
    # vmap over keys: each row is that key's own stochastic rounding, as without vmap.
    for k, row in zip(keys, by_key, strict=True):
        np.testing.assert_array_equal(row, np.asarray(stochastic(x[0], k)))


@settings(max_examples=max(4, settings.default.max_examples // 4), phases=[Phase.explicit, Phase.generate])
@given(fmt=testing.formats_any(), data=st.data())
def test_property_suite_on_generated_formats(fmt, data):
    # No shrinking: each candidate format compiles anew, and the failure message
    # already names the format and the inputs that break it.
    testing.check_grid(fmt)
    testing.check_array(fmt, data.draw(testing.hard_arrays(fmt), label="x"))


# ----- against ml_dtypes -------------------------------------------------------------------


def _ml_table(name) -> np.ndarray:
    t = getattr(ml_dtypes, name)
    bits = formats.get(name).bits
    return np.arange(2**bits, dtype=np.uint8).view(t).astype(np.float32)


def _ml_inputs(name: str) -> np.ndarray:
    """2^20 float32 inputs from ml_dtypes' own table: every value, midpoint and threshold, +-1 ulp."""
    fi = ml_dtypes.finfo(getattr(ml_dtypes, name))
    v = np.unique(_ml_table(name)[np.isfinite(_ml_table(name))].astype(np.float64))
    top = float(fi.max)
    beyond = top + 2.0 ** (math.floor(math.log2(top)) - int(fi.nmant))  # the next value past max
    pts = np.concatenate([v, (v[1:] + v[:-1]) / 2, [(top + beyond) / 2, beyond, 2 * top, v[v > 0].min() / 2]])
    pts = pts[pts <= np.finfo(np.float32).max].astype(np.float32)
    with np.errstate(over="ignore"):
        pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))])
    rng = np.random.default_rng(sum(map(ord, name)))
    special = np.array(
        [
            0,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0xFF800001,
            0x7FFFFFFF,
            0xFFFFFFFF,
            0x7FA00000,
            0xFFA00001,
            1,
            0x80000001,
            0x007FFFFF,
            0x807FFFFF,
            0x00800000,
            0x80800000,
            0x00400000,
            0x00400001,
            0x00600000,
            0x7F7FFFFF,
            0xFF7FFFFF,
        ],
        np.uint32,
    )
    n_rest = N_ML - 2 * pts.size - special.size
    raw = rng.integers(0, 2**32, n_rest, dtype=np.uint64).astype(np.uint32)
    subnormal = raw & np.uint32(0x807FFFFF)
    mags = np.exp(rng.uniform(np.log(v[v > 0].min() / 4), np.log(min(top * 4, 3e38)), n_rest))
    in_range = _bits32(mags * rng.choice([-1.0, 1.0], n_rest))
    kind = rng.integers(0, 3, n_rest)
    rest = np.select([kind == 0, kind == 1], [raw, subnormal], in_range)
    out = np.concatenate([_bits32(pts), _bits32(-pts), special, rest]).astype(np.uint32)
    assert out.size == N_ML
    return _f32(out)


def _e8m0_deviations(x) -> np.ndarray:
    """Inputs where lowbit deliberately differs from ml_dtypes for E8M0 (README, "Formats"): the
    exact ties 1.5 * 2^k, the float32 subnormal 1.5 * 2^-127 included (ml_dtypes rounds up,
    lowbit to the even code). Every other input, subnormals included, rounds alike."""
    b = _bits32(x)
    positive_normal = (b >= 0x00800000) & (b < 0x7F800000)
    tie = positive_normal & ((b & 0x7FFFFF) == 0x400000)
    return tie | (b == 0x00600000)


def test_readme_e8m0_differences_from_the_installed_ml_dtypes():
    # The README's bullet, checked against whatever ml_dtypes is installed: ties differ exactly
    # where the lower neighbour has the even code; float32 subnormals between 2^-127 and 2^-126
    # round to the nearer value in both (ml_dtypes before 0.7 rounded every one of them up).
    k = np.arange(-127, 127)
    ties = (1.5 * np.exp2(k)).astype(np.float32)
    sub = _f32(np.arange(0x00400001, 0x00800000, 977, dtype=np.uint32))
    sub = sub[_bits32(sub) != 0x00600000]
    got = np.asarray(formats.encode("float8_e8m0fnu", _padded(np.concatenate([ties, sub]), 8192)))
    want = np.concatenate([ties, sub]).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    got, want = got[: want.size], want
    lower = (k + 127).astype(np.uint8)  # the code of 2^k
    np.testing.assert_array_equal(got[: k.size], np.where(lower % 2 == 0, lower, lower + 1))
    np.testing.assert_array_equal(want[: k.size], lower + 1)  # ml_dtypes: ties up
    np.testing.assert_array_equal(got[k.size :], want[k.size :])
    assert set(np.unique(want[k.size :])) == {0, 1}  # both neighbours occur: nearest, not all up


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float4_e2m1fn", "float8_e5m2", "int8", "nf4"])
def test_values_list_zero_once_as_positive_zero(name):
    v = formats.values(name)
    zeros = v[v == 0]
    assert zeros.size == 1 and not np.signbit(zeros[0])


@pytest.mark.parametrize("name", ML_DTYPES)
class TestAgainstMlDtypes:
    def test_decode_every_code_bit_exact(self, name):
        fmt = formats.get(name)
        codes = np.arange(2**fmt.bits, dtype=np.uint8)
        got = np.asarray(formats.decode(fmt, jnp.asarray(codes)))
        want = _ml_table(name)
        bad = _bits32(got) != _bits32(want)
        assert not bad.any(), [
            (hex(c), hex(g), hex(w)) for c, g, w in zip(codes[bad], _bits32(got)[bad], _bits32(want)[bad], strict=True)
        ]

    def test_format_flags_match(self, name):
        fmt, table = formats.get(name), _ml_table(name)
        assert fmt.bits == ml_dtypes.finfo(getattr(ml_dtypes, name)).bits
        assert fmt.max_value == float(ml_dtypes.finfo(getattr(ml_dtypes, name)).max)
        assert fmt.has_nan == bool(np.isnan(table).any())
        assert fmt.has_inf == bool(np.isinf(table).any())
        assert fmt.has_negative_zero == bool(((table == 0) & np.signbit(table)).any())
        np.testing.assert_array_equal(formats.values(fmt), np.unique(table[np.isfinite(table)]))

    def test_encode_and_quantize_match_ml_dtypes(self, name):
        fmt, t = formats.get(name), getattr(ml_dtypes, name)
        x = _ml_inputs(name)
        with warnings.catch_warnings():  # NaN into a format without NaN warns; its result is tested
            warnings.simplefilter("ignore", RuntimeWarning)
            want_codes = x.astype(t).view(np.uint8) & np.uint8(2**fmt.bits - 1)
            want_values = x.astype(t).astype(np.float32)
        run = jax.jit(lambda x: (formats.encode(fmt, x, saturate=False), formats.quantize(fmt, x, saturate=False)))
        codes, values = (np.asarray(a) for a in run(jnp.asarray(x)))
        keep = ~_e8m0_deviations(x) if name == "float8_e8m0fnu" else np.ones(x.shape, bool)
        bad = keep & (codes != want_codes)
        assert not bad.any(), f"{bad.sum()} codes differ, e.g. " + ", ".join(
            f"x=0x{b:08x}: got 0x{g:02x} ml_dtypes 0x{w:02x}"
            for b, g, w in zip(_bits32(x)[bad][:5], codes[bad][:5], want_codes[bad][:5], strict=True)
        )
        # quantize agrees except that it keeps NaN where the format has no NaN code.
        nan_kept = np.isnan(x) & (not fmt.has_nan)
        same = (_bits32(values) == _bits32(want_values)) | (np.isnan(values) & np.isnan(want_values))
        bad = keep & ~nan_kept & ~same
        assert not bad.any(), [
            (hex(b), float(g), float(w))
            for b, g, w in zip(_bits32(x)[bad][:5], values[bad][:5], want_values[bad][:5], strict=True)
        ]
        assert np.isnan(values[nan_kept]).all()


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [(FloatFormat(ebits=5, mbits=10), np.float16), (FloatFormat(ebits=8, mbits=7), ml_dtypes.bfloat16)],
)
def test_generic_16_bit_formats_match_float16_and_bfloat16(fmt, dtype):
    # FloatFormat's defaults at IEEE half and bfloat16 widths are those types, subnormals included.
    codes = np.arange(2**16, dtype=np.uint16)
    table = codes.view(dtype).astype(np.float32)
    got = np.asarray(formats.decode(fmt, jnp.asarray(codes)))
    nan = np.isnan(table)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(_bits32(got)[~nan], _bits32(table)[~nan])
    v = np.unique(table[np.isfinite(table)].astype(np.float64))
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    raw = np.random.default_rng(16).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate(
        [
            v.astype(np.float32),
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            _f32(raw),
            _f32(raw & np.uint32(0x807FFFFF)),
        ]
    )
    x = x[~np.isnan(x)][: 2**21]  # NaN payloads: numpy keeps them in float16, formats write one NaN
    with np.errstate(over="ignore"):
        want = x.astype(dtype).view(np.uint16)
    got = np.asarray(jax.jit(lambda x: formats.encode(fmt, x))(jnp.asarray(x)))
    bad = got != want
    assert not bad.any(), [
        (hex(b), hex(g), hex(w)) for b, g, w in zip(_bits32(x)[bad][:5], got[bad][:5], want[bad][:5], strict=True)
    ]


def test_ml_inputs_cover_the_hard_cases():
    x = _ml_inputs("float8_e4m3fn")
    b = _bits32(x)
    assert x.size >= 10**6
    assert {0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F800000, 0xFF800000} <= set(b.tolist())
    assert ((b & 0x7F800000) == 0).sum() > 10**5  # float32 subnormals (and zeros)
    assert {464.0, -464.0, 0.0009765625, 0.001953125} <= set(x.tolist())  # overflow tie, min/2, min


E8M0_TABLE = [
    # (float32 bits, expected code): the pinned deviations from ml_dtypes.
    *[(int(_bits32(1.5 * 2.0**k)), (k + 127) + ((k + 127) % 2)) for k in range(-126, 127)],  # ties -> even
    (0x7F400000, 254),  # 1.5 * 2^127: the tie with the overflow goes to the even max code
    (0x00600000, 0),  # 1.5 * 2^-127 (a float32 subnormal): tie -> code 0
    (0x00400001, 0),  # just above 2^-127: nearest is 2^-127, not 2^-126
    (0x0051EB85, 0),  # 1.28 * 2^-127
    (0x005FFFFF, 0),
    (0x00600001, 1),
    (0x007FFFFF, 1),
    (0x00000001, 0),  # below the grid rounds up to its smallest value
    (0x00400000, 0),
    (0x00800000, 1),
    (0x00000000, 0xFF),  # no zero: zero, negatives and NaN are NaN
    (0x80000000, 0xFF),
    (0xBF800000, 0xFF),
    (0x7FC00000, 0xFF),
]


def test_e8m0_ties_and_subnormals_by_table():
    x = _f32([b for b, _ in E8M0_TABLE])
    want = np.array([c for _, c in E8M0_TABLE], np.uint8)
    got = np.asarray(formats.encode("float8_e8m0fnu", jnp.asarray(x)))
    bad = got != want
    assert not bad.any(), [
        (hex(b), int(g), int(w)) for b, g, w in zip(_bits32(x)[bad], got[bad], want[bad], strict=True)
    ]


# ----- radix-4 FP4 and two-phase rounding ----------------------------------------------------

R4 = [0.0] + [4.0**k for k in range(-3, 4)]  # magnitude code e -> value


def _r4_table():
    """(x, expected magnitude code) from DESIGN: codes e = 1..7 are 4^(e-4), thresholds 0.625 * 4^n."""
    rows = [(v, c) for c, v in enumerate(R4)]
    rows += [(0.5 * 4.0**-3, 0), (np.nextafter(np.float32(0.5 * 4.0**-3), 1), 1), (0.4 * 4.0**-3, 0)]
    for n in range(-2, 4):
        mid, lo_code, hi_code = 0.625 * 4.0**n, n + 3, n + 4
        rows += [
            (mid, lo_code if lo_code % 2 == 0 else hi_code),
            (np.nextafter(np.float32(mid), 0), lo_code),
            (np.nextafter(np.float32(mid), 100), hi_code),
        ]
    rows += [(64.0, 7), (100.0, 7), (1e30, 7), (math.inf, 7)]  # 'finite': always saturates
    return rows


def test_fp4_radix4_by_table():
    fmt = formats.get("fp4_radix4")
    assert fmt.bits == 4 and not fmt.has_nan and not fmt.has_inf
    np.testing.assert_array_equal(formats.values(fmt), np.array(sorted({-v for v in R4} | set(R4)), np.float32))
    rows = _r4_table()
    mags = np.array([r[0] for r in rows], np.float32)
    x = np.concatenate([mags, -mags])
    codes = np.array([r[1] for r in rows] + [r[1] | 8 for r in rows], np.uint8)
    for saturate in (False, True):
        got = np.asarray(formats.encode(fmt, jnp.asarray(x), saturate=saturate))
        np.testing.assert_array_equal(got, codes, err_msg=f"saturate={saturate}")
    values = np.array([R4[c] for c in codes % 8], np.float32) * np.where(codes >= 8, -1, 1)
    np.testing.assert_array_equal(np.asarray(formats.quantize(fmt, jnp.asarray(x))), values)


TWO_PHASE = [  # x, even grid {4^k}, odd grid {2 * 4^k}; exact midpoints go to the even code
    (1.0, 1.0, 0.5),
    (3.0, 4.0, 2.0),
    (2.5, 1.0, 2.0),
    (5.0, 4.0, 2.0),
    (6.0, 4.0, 8.0),
    (0.2, 0.25, 0.125),
    (100.0, 64.0, 128.0),
    (1000.0, 64.0, 128.0),
    (-3.0, -4.0, -2.0),
    (0.0, 0.0, 0.0),
    (2.0**-7, 0.0, 0.0),
    (1.5 * 2.0**-7, 2.0**-6, 0.0),
    (2.0**-6, 2.0**-6, 0.0),
    (1.5 * 2.0**-6, 2.0**-6, 2.0**-5),
]


def test_two_phase_by_table():
    x = jnp.asarray(np.array([r[0] for r in TWO_PHASE], np.float32))
    even, odd = formats.two_phase(x)
    np.testing.assert_array_equal(np.asarray(even), np.array([r[1] for r in TWO_PHASE], np.float32))
    np.testing.assert_array_equal(np.asarray(odd), np.array([r[2] for r in TWO_PHASE], np.float32))


@given(seed=st.integers(0, 2**32 - 1))
def test_two_phase_lands_on_even_and_odd_grids(seed):
    x = jnp.asarray(_random_floats(seed))
    even, odd = (np.abs(np.asarray(a)) for a in formats.two_phase(x))
    assert set(even.ravel().tolist()) <= {0.0} | {4.0**k for k in range(-3, 4)}
    assert set(odd.ravel().tolist()) <= {0.0} | {2 * 4.0**k for k in range(-3, 4)}
    np.testing.assert_array_equal(
        np.asarray(formats.two_phase(x)[1]), 2 * np.asarray(formats.quantize("fp4_radix4", x / 2))
    )
    for rounding in ("stochastic", "toward_zero"):
        key = jax.random.key(seed) if rounding == "stochastic" else None
        e, o = (np.abs(np.asarray(a)) for a in formats.two_phase(x, rounding=rounding, key=key))
        assert set(e.ravel().tolist()) <= {0.0} | {4.0**k for k in range(-3, 4)}
        assert set(o.ravel().tolist()) <= {0.0} | {2 * 4.0**k for k in range(-3, 4)}


# ----- integer, ternary and binary formats by table -------------------------------------------

INT_TABLE = {
    # name: [(x, quantized value, code)]; half-integers go to the even integer, then saturate.
    "int8": [
        (0.5, 0, 0x00),
        (1.5, 2, 0x02),
        (2.5, 2, 0x02),
        (-0.5, 0, 0x00),
        (-1.5, -2, 0xFE),
        (127.4, 127, 0x7F),
        (127.5, 127, 0x7F),
        (300.0, 127, 0x7F),
        (-128.0, -128, 0x80),
        (-128.5, -128, 0x80),
        (-1e9, -128, 0x80),
        (math.inf, 127, 0x7F),
        (-math.inf, -128, 0x80),
        (-1.0, -1, 0xFF),
    ],
    "int4": [
        (7.0, 7, 0x7),
        (7.5, 7, 0x7),
        (-8.0, -8, 0x8),
        (-8.5, -8, 0x8),
        (-3.5, -4, 0xC),
        (3.5, 4, 0x4),
        (-0.4, 0, 0x0),
        (6.5, 6, 0x6),
    ],
    "int2": [(1.0, 1, 0b01), (1.5, 1, 0b01), (-2.0, -2, 0b10), (-1.5, -2, 0b10), (-0.5, 0, 0b00), (-1.0, -1, 0b11)],
    "uint8": [
        (255.0, 255, 0xFF),
        (255.5, 255, 0xFF),
        (254.5, 254, 0xFE),
        (-1.0, 0, 0x00),
        (-0.5, 0, 0x00),
        (0.5, 0, 0x00),
        (1.5, 2, 0x02),
        (-math.inf, 0, 0x00),
    ],
    "uint4": [(15.0, 15, 0xF), (16.0, 15, 0xF), (14.5, 14, 0xE), (-3.0, 0, 0x0)],
    "uint2": [(3.0, 3, 0b11), (2.5, 2, 0b10), (9.0, 3, 0b11), (-9.0, 0, 0b00)],
    "ternary": [
        (0.0, 0, 0b00),
        (0.5, 0, 0b00),
        (0.51, 1, 0b01),
        (1.5, 1, 0b01),
        (-0.5, 0, 0b00),
        (-0.6, -1, 0b11),
        (-1.5, -1, 0b11),
        (-2.0, -1, 0b11),
        (-100.0, -1, 0b11),
        (7.0, 1, 0b01),
    ],
    # sign(0) = +1; code 0 is +1, code 1 is -1; a negative subnormal is negative.
    "binary": [
        (0.0, 1, 0),
        (-0.0, 1, 0),
        (0.3, 1, 0),
        (-0.3, -1, 1),
        (5.0, 1, 0),
        (-5.0, -1, 1),
        (math.inf, 1, 0),
        (-math.inf, -1, 1),
        (-1e-45, -1, 1),
        (1e-45, 1, 0),
        (-(2.0**-126), -1, 1),
    ],
}


@pytest.mark.parametrize("name", sorted(INT_TABLE))
def test_integer_formats_by_table(name):
    fmt = formats.get(name)
    rows = INT_TABLE[name]
    x, n = _padded([r[0] for r in rows], 64), len(rows)
    for saturate in (True, False):  # integers have no overflow code: both saturate
        np.testing.assert_array_equal(
            np.asarray(formats.quantize(fmt, x, saturate=saturate))[:n],
            np.array([r[1] for r in rows], np.float32),
            err_msg=f"saturate={saturate}",
        )
        np.testing.assert_array_equal(
            np.asarray(formats.encode(fmt, x, saturate=saturate))[:n],
            np.array([r[2] for r in rows], np.uint8),
            err_msg=f"saturate={saturate}",
        )


@pytest.mark.parametrize(
    ("fmt", "values"),
    [
        (IntFormat(bits=8, narrow=True), np.arange(-127, 128)),
        (IntFormat(bits=3), np.arange(-4, 4)),
        (IntFormat(bits=1, signed=False), np.arange(0, 2)),
        (IntFormat(bits=4, signed=False, narrow=True), np.arange(0, 15)),
        (IntFormat(bits=12), np.arange(-2048, 2048)),
        (formats.get("ternary"), np.arange(-1, 2)),
        (formats.get("binary"), np.array([-1, 1])),
    ],
)
def test_integer_values_and_round_trip(fmt, values):
    np.testing.assert_array_equal(formats.values(fmt), values.astype(np.float32))
    back = formats.decode(fmt, formats.encode(fmt, _padded(values, 4096)))
    np.testing.assert_array_equal(np.asarray(back)[: values.size], values)
    # Midpoints between neighbours round to the even integer (binary: to the sign).
    mids = (values[1:] + values[:-1]) / 2
    want = np.where(mids == 0, 1, mids) if isinstance(fmt, BinaryFormat) else 2 * np.round(mids / 2)
    got = np.asarray(formats.quantize(fmt, _padded(mids, 4096)))[: mids.size]
    np.testing.assert_array_equal(got, np.clip(want, values[0], values[-1]))


def test_integer_nan_quantizes_to_nan_and_encodes_to_zero():
    x = jnp.asarray(np.array([np.nan, -np.nan], np.float32))
    for name in ("int8", "uint4", "ternary"):
        assert np.isnan(np.asarray(formats.quantize(name, x))).all()
        np.testing.assert_array_equal(np.asarray(formats.encode(name, x)), [0, 0])


# ----- IEEE P3109 against its definition -----------------------------------------------------

P3109 = [(k, p) for k in range(3, 9) for p in range(1, k)]


def _p3109_magnitude(k: int, p: int, mag: int) -> float:
    """Value of magnitude bits ``mag`` of binary{K}p{P}: bias 2^(K-P-1), P-1 fraction bits,
    subnormals at exponent field 0."""
    bias, m = 2 ** (k - p - 1), p - 1
    e, f = mag >> m, mag % 2**m
    return f * 2.0 ** (1 - bias - m) if e == 0 else (2**m + f) * 2.0 ** (e - bias - m)


def _p3109_definition(k: int, p: int) -> np.ndarray:
    """float64 value of every code of binary{K}p{P}, written from the definition."""
    half = 2 ** (k - 1)
    out = np.array([_p3109_magnitude(k, p, c % half) * (-1 if c >= half else 1) for c in range(2**k)])
    out[half], out[half - 1], out[2**k - 1] = math.nan, math.inf, -math.inf
    return out


@pytest.mark.parametrize(("k", "p"), P3109)
def test_p3109_matches_its_definition(k, p):
    fmt = formats.get(f"p3109_k{k}p{p}")
    table = _p3109_definition(k, p)
    assert fmt == formats.p3109(k, p)
    assert (fmt.bits, fmt.has_nan, fmt.has_inf, fmt.has_negative_zero) == (k, True, True, False)
    codes = np.arange(2**k, dtype=np.uint8)
    got = np.asarray(formats.decode(fmt, jnp.asarray(np.pad(codes, (0, 256 - codes.size)))))[: codes.size]
    got = got.astype(np.float64)
    np.testing.assert_array_equal(got, table)
    assert not np.signbit(got[got == 0]).any()  # no -0: its code is NaN

    # Encode: every value to its code; every midpoint (and one ulp either side) to
    # the nearer code, exact ties to the even one; specials to their codes.
    finite = np.flatnonzero(np.isfinite(table))
    order = finite[np.argsort(table[finite])]
    vals, vcodes = table[order], codes[order]
    mids = (vals[1:] + vals[:-1]) / 2
    tie = np.where(vcodes[:-1] % 2 == 0, vcodes[:-1], vcodes[1:])
    max_code, top = 2 ** (k - 1) - 2, vals[-1]
    beyond = _p3109_magnitude(k, p, 2 ** (k - 1) - 1)  # where +inf's code sits on the grid
    threshold = (top + beyond) / 2  # a tie between max (even code) and +inf: stays max
    rows = [(v, c) for v, c in zip(vals, vcodes, strict=True)]
    rows += [(m, c) for m, c in zip(mids, tie, strict=True)]
    rows += [(np.nextafter(np.float32(m), -np.inf), lo) for m, lo in zip(mids, vcodes[:-1], strict=True)]
    rows += [(np.nextafter(np.float32(m), np.inf), hi) for m, hi in zip(mids, vcodes[1:], strict=True)]
    rows += [
        (threshold, max_code),
        (np.nextafter(np.float32(threshold), np.inf), 2 ** (k - 1) - 1),
        (-threshold, max_code | 2 ** (k - 1)),
        (-2 * beyond, 2**k - 1),
        (math.inf, 2 ** (k - 1) - 1),
        (-math.inf, 2**k - 1),
        (math.nan, 2 ** (k - 1)),
        (-math.nan, 2 ** (k - 1)),
        (-0.0, 0),
        (-vals[vals > 0].min() / 2, 0),
    ]
    x = np.array([r[0] for r in rows], np.float32)
    want = np.array([r[1] for r in rows], np.uint8)
    got = np.asarray(formats.encode(fmt, _padded(x)))[: x.size]
    bad = got != want
    assert not bad.any(), [(float(a), int(g), int(w)) for a, g, w in zip(x[bad], got[bad], want[bad], strict=True)][:8]
    # Saturating: overflow and inf go to +-max instead.
    sat = np.asarray(
        formats.encode(fmt, jnp.asarray(np.array([math.inf, -math.inf, 2 * beyond], np.float32)), saturate=True)
    )
    np.testing.assert_array_equal(sat, [max_code, max_code | 2 ** (k - 1), max_code])


# ----- rounding modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["float8_e4m3fn", "float4_e2m1fn", "fp4_radix4", "int4", "float8_e8m0fnu", "p3109_k4p1"]
)
def test_stochastic_rounding_is_unbiased_and_reproducible(name):
    fmt = formats.get(name)
    v = formats.values(fmt)
    pos = v[v > 0]
    lo, hi = float(pos[1]), float(pos[2])
    points = np.array([lo + 0.1 * (hi - lo), (lo + hi) / 2, lo + 0.9 * (hi - lo)], np.float32)
    n = 2**13
    x = jnp.asarray(np.repeat(points, n))
    key = jax.random.key(7)
    q = np.asarray(formats.quantize(fmt, x, rounding="stochastic", key=key)).reshape(3, n)
    assert set(np.unique(q)) <= {lo, hi}
    # Mean within 6 standard errors (Bernoulli, variance <= (hi - lo)^2 / 4).
    np.testing.assert_array_less(np.abs(q.mean(1) - points), 6 * (hi - lo) / 2 / math.sqrt(n))
    again = formats.quantize(fmt, x, rounding="stochastic", key=key)
    np.testing.assert_array_equal(np.asarray(again).reshape(3, n), q)
    other = np.asarray(formats.quantize(fmt, x, rounding="stochastic", key=jax.random.key(8)))
    assert not np.array_equal(other.reshape(3, n), q)
    codes = formats.encode(fmt, x, rounding="stochastic", key=key)
    np.testing.assert_array_equal(np.asarray(formats.decode(fmt, codes)).reshape(3, n), q)


@pytest.mark.parametrize(
    "name", ["float8_e4m3fn", "float8_e5m2", "float6_e3m2fn", "fp4_radix4", "int8", "uint4", "ternary", "p3109_k5p2"]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_toward_zero_never_increases_magnitude(name, seed):
    fmt = formats.get(name)
    x = _random_floats(seed) * np.float32(fmt.max_value / 8)
    for saturate in (True, False):
        q = np.asarray(formats.quantize(fmt, jnp.asarray(x), saturate=saturate, rounding="toward_zero"))
        assert (np.abs(q) <= np.abs(x)).all()
        # It is the largest grid magnitude not above |x| (here every |x| is in range or above it).
        v = formats.values(fmt)
        below = np.array([v[v <= a].max() if a >= 0 else v[v >= a].min() for a in x.ravel()])
        np.testing.assert_array_equal(q.ravel(), below)


def test_rounding_argument_errors():
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="rounding"):
        formats.quantize("int8", x, rounding="up")
    with pytest.raises(ValueError, match="key"):
        formats.quantize("int8", x, rounding="stochastic")
    with pytest.raises(TypeError, match="integer"):
        formats.decode("int8", jnp.ones(3))


# ----- invalid parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: FloatFormat(ebits=0, mbits=3), "ebits"),
        (lambda: FloatFormat(ebits=4, mbits=-1), "mbits"),
        (lambda: FloatFormat(ebits=4, mbits=24), "mbits"),
        (lambda: FloatFormat(ebits=5, mbits=12, radix=4), "bits"),  # radix 4 stays at 16 bits
        (lambda: FloatFormat(ebits=4, mbits=3, radix=3), "radix"),
        (lambda: FloatFormat(ebits=5, mbits=2, bias=-200), "bias"),
        (lambda: FloatFormat(ebits=5, mbits=2, bias=300), "bias"),
        (lambda: FloatFormat(ebits=4, mbits=0, specials="ieee"), "mbits"),
        (lambda: FloatFormat(ebits=4, mbits=3, specials="posit"), "specials"),
        (lambda: FloatFormat(ebits=4, mbits=3, specials="fnuz", signed=False), "specials"),
        (lambda: FloatFormat(ebits=1, mbits=0, specials="fn", signed=False), "specials"),
        (lambda: FloatFormat(ebits=4.0, mbits=3), "ebits"),
        (lambda: IntFormat(bits=17), "bits"),
        (lambda: IntFormat(bits=0, signed=False), "bits"),
        (lambda: IntFormat(bits=1), "bits"),
        (lambda: formats.p3109(2, 1), "K"),
        (lambda: formats.p3109(8, 8), "P"),
        (lambda: AdaptiveFloat(base=formats.get("float8_e4m3fn"), rule="median"), "rule"),
        (lambda: AdaptiveFloat(base=formats.get("fp4_radix4")), "base"),
    ],
)
def test_invalid_parameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b.*allowed"):
        make()


# ----- adaptive exponent bias ----------------------------------------------------------------

E4M3 = formats.get("float8_e4m3fn")
_choose_bias = jax.jit(formats.choose_bias, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _adaptive(fmt, x):
    """quantize, decode(encode) saturating and not, and the chosen bias, in one compile per format."""
    codes, bias = formats.encode(fmt, x, saturate=True)
    return (
        formats.quantize(fmt, x),
        formats.decode(fmt, (codes, bias)),
        bias,
        formats.decode(fmt, formats.encode(fmt, x)),
        formats.choose_bias(fmt, x),
    )


def _brute_force_bias(base: FloatFormat, amax: float) -> int:
    """Largest bias b with amax <= max value at bias b (= base.max_value * 2^(base.bias - b))."""
    if amax == 0:
        return base.bias
    return max(b for b in range(base.bias - 100, base.bias + 101) if amax <= base.max_value * 2.0 ** (base.bias - b))


def _channel_data(seed, shape=(6, 5)):
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.integers(-60, 60, shape[0]))[:, None]
    x = rng.standard_normal(shape) * scale
    x[rng.integers(0, shape[0])] *= 0  # one all-zero channel
    return x.astype(np.float32)


@given(seed=st.integers(0, 2**32 - 1))
def test_adaptive_max_rule_matches_brute_force(seed):
    x = _channel_data(seed)
    per_tensor = _choose_bias(AdaptiveFloat(base=E4M3), jnp.asarray(x))
    assert int(np.asarray(per_tensor).reshape(())) == _brute_force_bias(E4M3, float(np.abs(x).max()))
    for axis in (0, -2):
        bias = np.asarray(_choose_bias(AdaptiveFloat(base=E4M3, axis=axis), jnp.asarray(x)))
        assert bias.shape == (6, 1) and bias.dtype == np.int32
        np.testing.assert_array_equal(bias[:, 0], [_brute_force_bias(E4M3, float(a)) for a in np.abs(x).max(1)])
    bias = np.asarray(_choose_bias(AdaptiveFloat(base=E4M3, axis=1), jnp.asarray(x)))
    assert bias.shape == (1, 5)
    np.testing.assert_array_equal(bias[0], [_brute_force_bias(E4M3, float(a)) for a in np.abs(x).max(0)])


def test_adaptive_max_rule_exact_at_the_boundary():
    # amax exactly max_value * 2^j fits at bias base - j; one ulp more needs one less.
    for j in (-20, 0, 7):
        top = np.float32(E4M3.max_value * 2.0**j)
        for amax, want in ((top, E4M3.bias - j), (np.nextafter(top, np.float32(np.inf)), E4M3.bias - j - 1)):
            got = _choose_bias(AdaptiveFloat(base=E4M3), jnp.asarray(np.array([amax, -amax / 3], np.float32)))
            assert int(np.asarray(got).reshape(())) == want == _brute_force_bias(E4M3, float(amax))


@pytest.mark.parametrize("base", ["float8_e4m3fn", "float6_e2m3fn", "float4_e2m1fn"])
@given(seed=st.integers(0, 2**32 - 1))
def test_adaptive_sqnr_rule_never_worse_and_round_trips(base, seed):
    base = formats.get(base)
    x = jnp.asarray(_channel_data(seed) * np.float32(np.random.default_rng(seed).uniform(0.5, 2)))
    fmax, fsqnr = AdaptiveFloat(base=base, axis=0), AdaptiveFloat(base=base, axis=0, rule="sqnr")
    err = {}
    for fmt in (fmax, fsqnr):
        q, back, bias, back_ns, chosen = (np.asarray(a) for a in _adaptive(fmt, x))
        assert q.dtype == np.float32 and q.shape == x.shape
        err[fmt.rule] = ((q.astype(np.float64) - np.asarray(x, np.float64)) ** 2).sum(1)
        np.testing.assert_array_equal(back, q)
        np.testing.assert_array_equal(bias, chosen)
        if fmt.rule == "max":  # nothing overflows, so the non-saturating encode agrees too
            np.testing.assert_array_equal(back_ns, q)
    assert (err["sqnr"] <= err["max"] * (1 + 1e-6)).all(), (err["sqnr"], err["max"])


def test_adaptive_bias_shift_is_a_power_of_two_scale():
    x = jnp.asarray(_channel_data(3))
    fmt = AdaptiveFloat(base=E4M3, axis=0)
    d = np.asarray(formats.choose_bias(fmt, x)) - E4M3.bias
    scaled = np.asarray(x) * np.exp2(d).astype(np.float32)
    want = np.asarray(formats.quantize(E4M3, jnp.asarray(scaled))) * np.exp2(-d).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_adaptive(fmt, x)[0]), want)


# ----- regressions: inputs where the property suite found lowbit.formats wrong ----------------


def test_binary_stochastic_rounding_is_unbiased():
    # Stochastic binarization (BinaryConnect): P(+1) = (1 + x) / 2, so E[q(x)] = x on [-1, 1].
    n = 2**13
    x = jnp.asarray(np.repeat(np.array([-0.5, 0.0, 0.5], np.float32), n))
    q = np.asarray(formats.quantize("binary", x, rounding="stochastic", key=jax.random.key(0))).reshape(3, n)
    assert set(np.unique(q)) <= {-1.0, 1.0}
    np.testing.assert_array_less(np.abs(q.mean(1) - [-0.5, 0.0, 0.5]), 6 / math.sqrt(n))


def test_adaptive_sqnr_rule_is_scale_invariant():
    # A power-of-two scale shifts every candidate's error equally, so the SQNR rule must
    # pick the same offset from the max rule at any scale (and never a worse one).
    base = formats.get("float6_e2m3fn")
    x = np.array([[3.0, 1.1, -2.3, 0.7]], np.float32)
    offsets = []
    for scale in (1.0, 2.0**-70, 2.0**60):
        xs = jnp.asarray(x * np.float32(scale))
        by_rule = {
            r: int(np.asarray(_choose_bias(AdaptiveFloat(base=base, rule=r, axis=0), xs))[0, 0])
            for r in ("max", "sqnr")
        }
        offsets.append(by_rule["sqnr"] - by_rule["max"])
    assert offsets == [offsets[0]] * 3, offsets


@pytest.mark.parametrize("specials", ["finite", "fn", "ieee", "fnuz", "p3109"])
def test_zeroless_formats_must_be_unsigned(specials):
    # Without a zero the negative-zero code would stand for -min (and NaN for fnuz/p3109).
    with pytest.raises(ValueError, match="zero"):
        FloatFormat(ebits=2, mbits=1, specials=specials, zero=False)


def _rejected_or(make, check):
    """Formats the constructor may reject (ValueError); if it builds them, ``check`` must hold."""
    try:
        fmt = make()
    except ValueError:
        return
    check(fmt)


def test_ieee_with_one_exponent_bit_has_a_normal_value():
    # ebits=1 under 'ieee' leaves only subnormals: min_normal names the inf/NaN binade.
    _rejected_or(
        lambda: FloatFormat(ebits=1, mbits=2, specials="ieee"),
        lambda fmt: np.testing.assert_array_equal(np.float32(fmt.min_normal) in formats.values(fmt), True),
    )


def test_radix4_grid_inside_float32_subnormals():
    # Values 2^-149, 2^-148, 3 * 2^-149 ...: quantize must fix them and encode must keep them apart.
    def check(fmt):
        v = formats.values(fmt)
        x = _padded(v)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: formats.quantize(fmt, x))(x))[: v.size], v)
        codes = jax.jit(lambda x: formats.encode(fmt, x))(x)
        np.testing.assert_array_equal(np.asarray(formats.decode(fmt, codes))[: v.size], v)

    _rejected_or(lambda: FloatFormat(ebits=1, mbits=1, bias=75, radix=4, specials="finite"), check)


def test_overflow_past_a_max_value_below_float32_normals():
    # max_value < 2^-126: quantize(saturate=False) must still overflow to inf, as encode does.
    def check(fmt):
        edge = np.float32(fmt.grid_value(fmt.max_code + 1))  # the first grid value past max
        x = _padded([edge, 2 * edge, np.float32(fmt.max_value)])
        q = np.asarray(jax.jit(lambda x: formats.quantize(fmt, x, saturate=False))(x))[:3]
        np.testing.assert_array_equal(q, np.float32([np.inf, np.inf, fmt.max_value]))
        back = formats.decode(fmt, jax.jit(lambda x: formats.encode(fmt, x))(x))
        np.testing.assert_array_equal(np.asarray(back)[:3], q)

    _rejected_or(lambda: FloatFormat(ebits=3, mbits=2, bias=140, specials="p3109"), check)
    _rejected_or(lambda: FloatFormat(ebits=2, mbits=0, bias=130, specials="p3109"), check)


def test_stochastic_rounding_of_float32_subnormal_inputs_is_unbiased():
    # Smallest value 2^-125: a float32 subnormal x rounds up to it with probability x / 2^-125.
    def check(fmt):
        n = 2**13
        x = jnp.full((n,), 2.0**-127, jnp.float32)
        q = np.asarray(formats.quantize(fmt, x, rounding="stochastic", key=jax.random.key(1)), np.float64)
        assert fmt.min_value == 2.0**-125 and set(np.unique(q)) <= {0.0, 2.0**-125}
        np.testing.assert_array_less(abs(q.mean() / 2.0**-125 - 0.25), 6 * 0.5 / math.sqrt(n))

    _rejected_or(lambda: FloatFormat(ebits=2, mbits=5, bias=61, radix=4, specials="finite", signed=False), check)
