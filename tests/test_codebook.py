"""Codebook formats: the published tables bit for bit, the FP4 table against the minifloat kernel
and ml_dtypes, the property suite on drawn tables, and NF4 as QLoRA stores weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats, quant, testing
from lowbit.formats import CodebookFormat

# QLoRA's NormalFloat4 as published in bitsandbytes (functional.py / kernels.cu), written out by hand.
NF4_PUBLISHED = [
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
]
# AbnormalFloat4, block size 64 (arXiv 2306.06965), as bitsandbytes lists it before reversing.
AF4_PUBLISHED = [
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
]


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize(("name", "table"), [("nf4", NF4_PUBLISHED), ("af4", AF4_PUBLISHED)])
def test_published_tables_bit_for_bit(name, table):
    fmt = formats.get(name)
    want = np.array(table, np.float32)
    assert fmt.bits == 4 and fmt.max_value == 1.0 and not fmt.has_nan
    np.testing.assert_array_equal(_bits(formats.values(fmt)), _bits(want))
    np.testing.assert_array_equal(_bits(formats.decode(fmt, jnp.arange(16, dtype=jnp.uint8))), _bits(want))
    np.testing.assert_array_equal(np.asarray(formats.encode(fmt, jnp.asarray(want))), np.arange(16))


@pytest.mark.parametrize("name", ["nf4", "af4", "fp4_e2m1_codebook"])
def test_registered_codebooks_pass_the_property_suite(name):
    testing.check_format(name, examples=3)


def _float32s():
    """Any float32: drawn as a float, or as raw bits (NaN payloads, subnormals, inf)."""
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True).map(np.float32),
        st.integers(0, 2**32 - 1).map(lambda b: np.uint32(b).view(np.float32)),
    )


FP4 = formats.get("float4_e2m1fn")
FP4_TABLE = formats.get("fp4_e2m1_codebook")


@given(x=st.lists(_float32s(), min_size=1, max_size=64), rounding=st.sampled_from(["nearest", "toward_zero"]))
@settings(max_examples=40)
def test_fp4_codebook_equals_the_minifloat_kernel_and_ml_dtypes(x, rounding):
    x = np.pad(np.array(x, np.float32), (0, 64 - len(x)))  # one shape: one compilation
    got = np.asarray(formats.quantize(FP4_TABLE, jnp.asarray(x), rounding=rounding))
    want = np.asarray(formats.quantize(FP4, jnp.asarray(x), rounding=rounding))
    same = (got == want) | (np.isnan(got) & np.isnan(want))  # == ignores the sign of zero: one zero in a table
    assert same.all(), (x[~same], got[~same], want[~same])
    if rounding == "nearest":
        finite = ~np.isnan(x)
        cast = x.astype(ml_dtypes.float4_e2m1fn)
        np.testing.assert_array_equal(got[finite], cast.astype(np.float32)[finite])
        # Codes are float4_e2m1fn's own, except that the table has one zero (+0, code 0).
        codes = np.asarray(formats.encode(FP4_TABLE, jnp.asarray(x)))
        nonzero = finite & (got != 0)
        np.testing.assert_array_equal(codes[nonzero], cast.view(np.uint8)[nonzero])


def test_ties_go_to_the_even_code_and_inputs_saturate():
    fmt = CodebookFormat(values=[-1.0, 0.0, 1.0, 3.0])
    x = jnp.array([0.5, 2.0, -0.5, -7.0, 9.0, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    # Ties: 0.5 -> 1.0 (code 2), 2.0 -> 1.0 (code 2), -0.5 -> -1.0 (code 0).
    np.testing.assert_array_equal(np.asarray(formats.quantize(fmt, x)), [1, 1, -1, -1, 3, 3, -1, np.nan])
    np.testing.assert_array_equal(np.asarray(formats.encode(fmt, x)), [2, 2, 0, 0, 3, 3, 0, 1])  # NaN: 0's code
    # With codes given, the tie at 0.5 goes to 0.0, now the even code.
    swapped = CodebookFormat(values=[-1.0, 0.0, 1.0, 3.0], codes=[0, 2, 1, 3])
    assert float(formats.quantize(swapped, jnp.float32(0.5))) == 0.0
    assert swapped.bits == 2 and not swapped.has_nan
    sparse = CodebookFormat(values=[-1.0, 0.0, 1.0, 3.0], codes=[0, 1, 2, 5])
    assert sparse.bits == 3 and sparse.has_nan
    assert np.isnan(np.asarray(formats.decode(sparse, jnp.array([3, 4, 6, 7], jnp.uint8)))).all()
    assert int(formats.encode(sparse, jnp.float32(jnp.nan))) == 3  # the smallest unused code


def test_a_codebook_scaled_by_a_power_of_two_keeps_float32_ties_exact():
    # 1 and 1 + 2^-23 have a midpoint float32 cannot hold: no input is a tie, each rounds to its side.
    fmt = CodebookFormat(values=[1.0, float(np.nextafter(np.float32(1), np.float32(2)))])
    x = np.array([1.0, np.nextafter(np.float32(1), np.float32(2))], np.float32)
    np.testing.assert_array_equal(np.asarray(formats.quantize(fmt, jnp.asarray(x))), x)


@st.composite
def codebooks(draw):
    """Tables of 2..40 distinct float32 values (any signs, zero or not, scales 2^-20..2^20), optional codes."""
    n = draw(st.integers(2, 40))
    scale = 2.0 ** draw(st.integers(-20, 20))
    entry = st.floats(-8, 8, width=32).filter(lambda e: e == 0 or abs(e) >= 2.0**-60)
    raw = draw(st.lists(entry, min_size=n, max_size=n, unique=True))
    table = np.unique(np.array(raw, np.float32) * np.float32(scale))
    if table.size < 2:
        table = np.array([0.0, scale], np.float32)
    codes = None
    if draw(st.booleans()):
        codes = draw(st.permutations(range(table.size + draw(st.integers(0, 8)))))[: table.size]
    return CodebookFormat(values=table.tolist(), codes=codes)


@given(fmt=codebooks(), data=st.data())
@settings(max_examples=5)  # each drawn table compiles the suite's kernel once
def test_property_suite_on_drawn_codebooks(fmt, data):
    testing.check_grid(fmt)
    testing.check_array(fmt, data.draw(testing.hard_arrays(fmt), label="x"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(values=[1.0, 0.0]), "strictly ascending"),
        (dict(values=[0.0, 0.0]), "strictly ascending"),
        (dict(values=[1.0, 1.0 + 2.0**-30]), "distinct in float32"),
        (dict(values=[0.0, float("nan")]), "finite"),
        (dict(values=[0.0, 1e39]), "finite"),
        (dict(values=[0.0, 1e-31]), "2\\^-100"),
        (dict(values=[1.0]), "2..256"),
        (dict(values=list(range(257))), "2..256"),
        (dict(values="ab"), "2..256"),
        (dict(values=[False, True]), "real numbers"),
        (dict(values=[0.0, 1.0], codes=[0]), "codes"),
        (dict(values=[0.0, 1.0], codes=[1, 1]), "codes"),
        (dict(values=[0.0, 1.0], codes=[0, 256]), "codes"),
        (dict(values=[0.0, 1.0], name=3), "name"),
    ],
)
def test_invalid_tables_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookFormat(**kwargs)


def test_nf4_blockwise_absmax_as_qlora_stores_weights():
    q = quant.Quantizer(format="nf4", granularity=quant.Group(size=64, axis=-1))
    w = jax.random.normal(jax.random.key(0), (8, 256), jnp.float32)
    y = quant.fake_quant(q, w)
    # QLoRA: per block of 64, x / absmax onto the nearest table entry, times absmax.
    table = np.array(NF4_PUBLISHED, np.float32)
    blocks = np.asarray(w).reshape(8, 4, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / absmax
    idx = np.abs(normed[..., None].astype(np.float64) - table).argmin(-1)
    np.testing.assert_array_equal(np.asarray(y), (table[idx] * absmax).reshape(8, 256))
    qt = quant.quantize(q, w)
    assert qt.codes.dtype == np.uint8 and qt.codes.size == w.size // 2  # two 4-bit codes per byte
    assert qt.nbytes == w.size // 2 + 4 * w.size // 64  # codes + one float32 absmax per block
    low_nibbles = np.asarray(qt.codes) & 0xF
    np.testing.assert_array_equal(low_nibbles, idx.reshape(-1)[::2])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qt)), np.asarray(y))
