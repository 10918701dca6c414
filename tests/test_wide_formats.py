"""FloatFormats wider than 16 bits (up to e8m23, 32 bits), against oracles that do not use lowbit.

The oracle here rounds float32 onto any radix-2 grid with a zero by integer
arithmetic on the float32 bit pattern (numpy int64): ``|x| = sig * 2^exp`` with
``sig < 2^24``, the grid step at ``x`` is ``2^s`` with ``s = max(floor(log2|x|),
emin) - mbits``, and round half to even is a shift plus a comparison of the
remainder with half a step. It is checked against ml_dtypes on narrow formats of
every special-value policy first (bfloat16, float16, E4M3FN, E5M2FNUZ, E2M3FN),
then lowbit's wide formats are checked against it bit for bit: ties, one float32
ulp either side of every tie, float32 subnormals, overflow to inf / NaN / max,
saturation, NaN and random bit patterns. e8m7 is additionally bfloat16 itself and
e8m23 float32 itself.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lowbit import formats
from lowbit.formats import FloatFormat

N_RANDOM = 2**17  # random float32 bit patterns per format (plus the structured inputs)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _bits32(x) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


# ----- the oracle ------------------------------------------------------------------------------


class Grid:
    """A radix-2 format with a zero, described by its fields alone (the oracle's own arithmetic)."""

    def __init__(self, ebits, mbits, bias=None, specials="ieee", signed=True):
        self.ebits, self.mbits, self.specials, self.signed = ebits, mbits, specials, signed
        self.bias = 2 ** (ebits - 1) - 1 if bias is None else bias
        self.bits = int(signed) + ebits + mbits
        self.emin = 1 - self.bias
        self.sign_bit = 1 << (self.bits - 1) if signed else 0
        all_ones = (1 << (ebits + mbits)) - 1
        self.max_code = all_ones - {"ieee": 1 << mbits, "fn": 1}.get(specials, 0)
        self.inf_code = all_ones - (1 << mbits) + 1 if specials == "ieee" else None
        self.all_ones = all_ones

    def fmt(self) -> FloatFormat:
        return FloatFormat(
            ebits=self.ebits, mbits=self.mbits, bias=self.bias, specials=self.specials, signed=self.signed
        )

    def nan_code(self, neg):
        sign = np.where(neg, self.sign_bit, 0).astype(np.int64)
        if self.specials == "ieee":
            return self.inf_code | (1 << (self.mbits - 1)) | sign
        if self.specials == "fn":
            return self.all_ones | sign
        if self.specials == "fnuz":
            return np.full(neg.shape, self.sign_bit, np.int64)
        return self.sign_bit ^ sign  # finite: a zero of the other sign, as ml_dtypes writes NaN

    def encode(self, x, *, saturate=False, rounding="nearest"):
        """Codes (int64) of float32 ``x``: round the magnitude, then overflow, sign and NaN."""
        b = _bits32(x).astype(np.int64)
        neg = b >= 2**31
        a = b & 0x7FFFFFFF
        nan = a > 0x7F800000
        inf = a == 0x7F800000
        field, frac = a >> 23, a & 0x7FFFFF
        sig = np.where(field == 0, frac, frac | (1 << 23))
        exp = np.where(field == 0, -149, field - 150)  # |x| = sig * 2^exp
        log2 = exp + np.floor(np.log2(np.maximum(sig, 1))).astype(np.int64)  # sig < 2^24: log2 is exact
        step = np.maximum(log2, self.emin) - self.mbits  # the grid step at |x| is 2^step
        shift = np.clip(step - exp, 0, 40)  # step < exp only where |x| is already on the grid
        q = sig >> shift
        rem = sig & ((1 << shift) - 1)
        half = np.where(shift > 0, 1 << np.maximum(shift - 1, 0), 1 << 40)  # never reached at shift 0
        if rounding == "nearest":
            q = q + ((rem > half) | ((rem == half) & (q % 2 == 1)))
        q = np.where(step < exp, sig << np.clip(exp - step, 0, 40), q)  # exact (no rounding)
        # q * 2^step; a carry to 2^(mbits+1) is the next binade's first value.
        carry = q >= 1 << (self.mbits + 1)
        q, step = np.where(carry, q >> 1, q), np.where(carry, step + 1, step)
        normal = q >= 1 << self.mbits
        mag = np.where(normal, ((step + self.mbits - self.emin + 1) << self.mbits) | (q - (1 << self.mbits)), q)
        mag = np.where(inf, self.max_code + 1, mag)  # inf: past the largest value
        over = mag > self.max_code
        if saturate or self.specials == "finite":
            mag = np.where(over, self.max_code, mag)
        elif rounding == "toward_zero":  # a finite input never rounds past max
            mag = np.where(over & ~inf, self.max_code, mag)
        if not saturate and self.specials == "ieee":
            mag = np.where(mag > self.max_code, self.inf_code, mag)
        bad = nan | ((mag > self.max_code) if self.specials in ("fn", "fnuz") else False)
        sign = np.where(neg, self.sign_bit, 0)
        if self.specials == "fnuz":
            sign = np.where(mag == 0, 0, sign)
        code = mag | sign
        return np.where(bad, self.nan_code(neg), code)

    def decode(self, codes):
        """float32 values of ``codes`` (float64 arithmetic, exact, then cast)."""
        c = np.asarray(codes, np.int64)
        mag = c & self.all_ones
        e, f = mag >> self.mbits, mag & ((1 << self.mbits) - 1)
        v = np.where(
            e == 0,
            np.ldexp(f.astype(np.float64), self.emin - self.mbits),
            np.ldexp((f + (1 << self.mbits)).astype(np.float64), e - self.bias - self.mbits),
        )
        v = np.where(mag > self.max_code, np.nan, v)
        if self.inf_code is not None:
            v = np.where(mag == self.inf_code, np.inf, v)
        v = np.where(c & self.sign_bit if self.signed else False, -v, v)
        if self.specials == "fnuz":
            v = np.where(c == self.sign_bit, -np.nan, v)  # ml_dtypes reads the negative-zero code as -NaN
        return v.astype(np.float32)


def _inputs(grid: Grid, seed: int) -> np.ndarray:
    """float32 inputs: random bit patterns and subnormals, grid values, every kind of tie and its
    float32 neighbours, the overflow threshold, +-inf, NaN and zeros."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2**32, N_RANDOM, dtype=np.uint64).astype(np.uint32)
    # Random codes' values, and the midpoints above them (ties) where float32 holds them.
    codes = rng.integers(0, grid.max_code + 1, N_RANDOM // 4, dtype=np.int64)
    codes = np.concatenate([codes, np.arange(0, 64), grid.max_code - np.arange(64)])
    lo = grid.decode(codes).astype(np.float64)
    hi = grid.decode(np.minimum(codes + 1, grid.max_code)).astype(np.float64)
    top = grid.decode(np.array([grid.max_code]))[0].astype(np.float64)
    step_top = top - grid.decode(np.array([grid.max_code - 1]))[0]
    hi = np.where(codes == grid.max_code, top + step_top, hi)  # the overflow threshold's tie
    with np.errstate(over="ignore"):  # e8m23's overflow threshold is past float32
        mids = ((lo + hi) / 2).astype(np.float32)
    mids = mids[mids.astype(np.float64) == (lo + hi) / 2]
    ties = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    specials = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, 1e-45, 1.1754942e-38])
    x = np.concatenate([_f32(raw), _f32(raw & np.uint32(0x807FFFFF)), lo.astype(np.float32), ties, specials])
    x = np.concatenate([x, -x])
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x), np.copysign(np.float32(np.nan), x), x).astype(np.float32)  # one NaN each sign


def _check_codes(got, want, x):
    got, want = np.asarray(got).astype(np.int64), np.asarray(want, np.int64)
    bad = got != want
    assert not bad.any(), [
        (hex(b), hex(g), hex(w)) for b, g, w in zip(_bits32(x)[bad][:5], got[bad][:5], want[bad][:5])
    ]


def _check_values(got, want, x):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    same = (_bits32(got) == _bits32(want)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), [(hex(b), g, w) for b, g, w in zip(_bits32(x)[~same][:5], got[~same][:5], want[~same][:5])]


# The oracle against ml_dtypes, one format per special-value policy (nearest, not saturating).
ORACLE_CHECKS = [
    (Grid(8, 7), ml_dtypes.bfloat16),
    (Grid(5, 10), np.float16),
    (Grid(4, 3, 7, "fn"), ml_dtypes.float8_e4m3fn),
    (Grid(5, 2, 16, "fnuz"), ml_dtypes.float8_e5m2fnuz),
    (Grid(2, 3, 1, "finite"), ml_dtypes.float6_e2m3fn),
]


@pytest.mark.parametrize(("grid", "dtype"), ORACLE_CHECKS, ids=lambda v: getattr(v, "__name__", ""))
def test_the_oracle_is_ml_dtypes_cast(grid, dtype):
    x = _inputs(grid, 0)
    x = x[~np.isnan(x)]  # numpy keeps NaN payloads and signs its own way in float16
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(dtype)
    raw = ref.view(np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16).astype(np.int64)
    _check_codes(grid.encode(x), raw, x)
    codes = np.arange(2**grid.bits)
    table = codes.astype(np.uint8 if grid.bits <= 8 else np.uint16).view(dtype).astype(np.float32)
    _check_values(grid.decode(codes), table, codes)


def test_the_oracle_ties_go_to_even():
    g = Grid(8, 13)  # step 2^-13 on [1, 2): 1 + 2^-14 is a tie between codes of fraction 0 and 1
    x = np.float32([1 + 2.0**-14, 1 + 3 * 2.0**-14, 1 + 2.0**-14 + 2.0**-23, 2 - 2.0**-14])
    got = g.decode(g.encode(x))
    np.testing.assert_array_equal(got, np.float32([1, 1 + 2 * 2.0**-13, 1 + 2.0**-13, 2]))


# ----- lowbit's wide formats against the oracle ------------------------------------------------

WIDE = {
    "e8m10": Grid(8, 10),
    "e8m13": Grid(8, 13),  # DeepSeek-V3's ~14-bit accumulator ("FP22")
    "e8m16": Grid(8, 16),
    "e8m23": Grid(8, 23),  # float32 itself
    "e8m13_bias133": Grid(8, 13, 133),  # normals below float32's normal range
    "e5m18_fn": Grid(5, 18, 15, "fn"),  # the float32 adder's rounding path
    "e4m23_fn": Grid(4, 23, -58, "fn"),  # float32's fraction width on a range the adder path would take
    "e4m19_fnuz": Grid(4, 19, 8, "fnuz"),
    "e6m12_finite": Grid(6, 12, 31, "finite"),
    "u_e8m16": Grid(8, 16, 127, "ieee", signed=False),
}


def _kernels(fmt: FloatFormat):
    """One jitted function per format: encode and quantize, saturating and not, nearest and toward zero."""

    @jax.jit
    def run(x):
        out = {}
        for rounding in ("nearest", "toward_zero"):
            for sat in (False, True):
                out[rounding, sat, "codes"] = formats.encode(fmt, x, saturate=sat, rounding=rounding)
                out[rounding, sat, "values"] = formats.quantize(fmt, x, saturate=sat, rounding=rounding)
        return out

    return run


@pytest.mark.parametrize("name", WIDE)
def test_wide_encode_and_quantize_match_the_oracle(name):
    grid = WIDE[name]
    fmt = grid.fmt()
    assert fmt.bits == grid.bits and fmt.max_code == grid.max_code
    x = _inputs(grid, 1)
    if not grid.signed:
        x = np.abs(x)  # unsigned formats encode negatives as NaN (tested for narrow formats)
    out = _kernels(fmt)(jnp.asarray(x))
    for rounding in ("nearest", "toward_zero"):
        for sat in (False, True):
            codes = out[rounding, sat, "codes"]
            assert codes.dtype == (jnp.uint32 if grid.bits > 16 else jnp.uint16)
            want = grid.encode(x, saturate=sat, rounding=rounding)
            _check_codes(codes, want, x)
            # quantize is decode(encode), except that NaN stays NaN without a NaN code.
            want_values = grid.decode(want)
            if grid.specials == "finite":
                want_values = np.where(np.isnan(x), np.float32(np.nan), want_values)
            _check_values(out[rounding, sat, "values"], want_values, x)


@pytest.mark.parametrize("name", WIDE)
def test_wide_decode_matches_the_oracle(name):
    grid = WIDE[name]
    rng = np.random.default_rng(2)
    n = 2**grid.bits
    edges = np.concatenate([np.arange(256), grid.max_code - np.arange(256), grid.sign_bit + np.arange(256)])
    codes = np.concatenate([rng.integers(0, n, 2**17, dtype=np.int64), edges, n - 1 - np.arange(256)]) % n
    got = formats.decode(grid.fmt(), jnp.asarray(codes.astype(np.uint32)))
    _check_values(got, grid.decode(codes), codes)
    if grid.specials != "finite":  # NaN codes keep their sign bit, as decode_table's -nan does
        want_bits = _bits32(grid.decode(codes))
        got_bits = _bits32(got)
        signed_nan = np.isnan(np.asarray(got))
        assert (got_bits[signed_nan] >> 31 == want_bits[signed_nan] >> 31).all()


def test_e8m7_is_bfloat16_bit_for_bit():
    fmt = FloatFormat(ebits=8, mbits=7)
    codes = np.arange(2**16, dtype=np.uint16)
    table = codes.view(ml_dtypes.bfloat16).astype(np.float32)
    finite = table[np.isfinite(table)]
    raw = np.random.default_rng(3).integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([finite, _f32(raw), _f32(raw & np.uint32(0x807FFFFF)), np.float32([np.inf, -np.inf])])
    x = x[~np.isnan(x)]
    _check_codes(formats.encode(fmt, jnp.asarray(x)), x.astype(ml_dtypes.bfloat16).view(np.uint16), x)
    _check_values(formats.quantize(fmt, jnp.asarray(x), saturate=False), x.astype(ml_dtypes.bfloat16), x)
    _check_values(formats.decode(fmt, jnp.asarray(codes)), table, codes)


def test_e8m23_is_float32_itself():
    fmt = FloatFormat(ebits=8, mbits=23)
    assert fmt.bits == 32 and fmt.code_dtype == jnp.uint32
    raw = np.random.default_rng(4).integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([_f32(raw), _f32(raw & np.uint32(0x807FFFFF)), np.float32([np.inf, -np.inf, 0, -0.0])])
    x = x[~np.isnan(x)]
    codes = np.asarray(formats.encode(fmt, jnp.asarray(x)))
    np.testing.assert_array_equal(codes, _bits32(x))
    np.testing.assert_array_equal(_bits32(formats.decode(fmt, jnp.asarray(codes))), _bits32(x))
    for rounding in ("nearest", "toward_zero", "stochastic"):
        q = formats.quantize(fmt, jnp.asarray(x), saturate=False, rounding=rounding, key=jax.random.key(0))
        np.testing.assert_array_equal(_bits32(q), _bits32(x))


@pytest.mark.parametrize("name", ["e8m13", "e5m18_fn", "e8m13_bias133"])
def test_wide_stochastic_rounding_picks_a_neighbour_without_bias(name):
    grid = WIDE[name]
    fmt = grid.fmt()
    rng = np.random.default_rng(5)
    # Values strictly between two neighbours (and float32 subnormals where the grid reaches them).
    codes = rng.integers(1, grid.max_code, 64, dtype=np.int64)
    lo, hi = grid.decode(codes).astype(np.float64), grid.decode(codes + 1).astype(np.float64)
    x = (lo + (hi - lo) * rng.uniform(0.05, 0.95, 64)).astype(np.float32)
    x = np.concatenate([x, -x])
    down = grid.decode(grid.encode(x, rounding="toward_zero"))
    up_codes = grid.encode(x, rounding="toward_zero") + 1  # the next magnitude, same sign
    up = grid.decode(up_codes)
    keys = jax.random.split(jax.random.key(6), 2000)
    q = np.asarray(
        jax.vmap(lambda k: formats.quantize(fmt, jnp.asarray(x), rounding="stochastic", key=k))(keys), np.float64
    )
    assert ((q == down) | (q == up)).all()
    p_up = (q == up).mean(axis=0)
    want = (np.abs(x.astype(np.float64)) - np.abs(down)) / (np.abs(up) - np.abs(down))
    np.testing.assert_allclose(p_up, want, atol=0.05)  # 2000 draws: a few standard errors
    # Unbiased: the mean over draws is x, within the sampling error of one grid step.
    step = np.abs(up - down)
    assert (np.abs(q.mean(axis=0) - x) <= 0.05 * step).all()


def test_wide_codes_round_trip_without_a_zero():
    # No zero (E8M0-like binades, 27 bits): every finite code decodes to a value that encodes back to it.
    fmt = FloatFormat(ebits=6, mbits=20, bias=40, signed=False, zero=False, specials="fn")
    assert fmt.code_dtype == jnp.uint32
    rng = np.random.default_rng(7)
    codes = np.concatenate([rng.integers(0, fmt.max_code + 1, 2**14), np.arange(64), fmt.max_code - np.arange(64)])
    codes = codes.astype(np.uint32)
    values = formats.decode(fmt, jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(formats.encode(fmt, values)), codes)
    assert float(values[np.argmin(codes)]) == 2.0**-40  # code 0 is the smallest value, 2^(0 - bias)


# ----- limits ----------------------------------------------------------------------------------


def test_wide_formats_refuse_tables():
    fmt = FloatFormat(ebits=8, mbits=13)
    for call in (lambda: formats.values(fmt), fmt.values, fmt.decode_table):
        with pytest.raises(ValueError, match=r"FloatFormat\.bits=22 is invalid; allowed: at most 16 for decode_table"):
            call()
    assert FloatFormat(ebits=8, mbits=7).values().size == 2**16 - 2**8 - 1  # 16 bits: listed (one zero)


@pytest.mark.parametrize(
    ("make", "field", "allowed"),
    [
        (lambda: FloatFormat(ebits=8, mbits=24), "mbits", r"an integer in \[0, 23\]"),
        (lambda: FloatFormat(ebits=9, mbits=13), "ebits", r"an integer in \[1, 8\]"),
        (lambda: FloatFormat(ebits=5, mbits=12, radix=4), "bits", r"<= 16 for radix 4"),
    ],
)
def test_width_limits_name_the_field(make, field, allowed):
    with pytest.raises(ValueError, match=rf"FloatFormat\.{field}=.* is invalid; allowed: .*{allowed}"):
        make()


def test_wide_codes_decode_checks_their_range():
    fmt = FloatFormat(ebits=8, mbits=13)
    with pytest.raises(ValueError, match=r"codes of a 22-bit format, 0 \.\. 4194303"):
        formats.decode(fmt, np.array([2**22], np.uint32))
    np.testing.assert_array_equal(formats.decode(fmt, np.array([0x3F800000 >> 10], np.uint32)), np.float32([1.0]))


def test_registered_formats_stay_at_16_bits():
    # A registered name reaches quant's packing, lowbit.testing and the CLI, which handle 16-bit codes.
    fp22 = FloatFormat(ebits=8, mbits=13)
    with pytest.raises(ValueError, match=r"register fmt=.*: bits=22 is invalid; allowed: an integer in \[1, 16\]"):
        formats.register("test_wide_fp22", fp22)
    assert "test_wide_fp22" not in formats.names()
    x = jnp.float32([1 + 2.0**-14, 3.0])  # the object itself works everywhere else
    np.testing.assert_array_equal(formats.quantize(fp22, x), np.float32([1, 3]))
