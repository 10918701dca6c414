"""Accumulator emulation against a numpy loop written out element by element of K, and hand-built tables."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from lowbit.formats import FloatFormat
from lowbit.training import Accumulator, accumulated_dot_general

DN_MATMUL = (((1,), (0,)), ((), ()))


def _e8_rounding(mbits, toward_zero=False):
    """float32 -> the IEEE grid with 8 exponent bits and ``mbits`` fraction bits (numpy, on the bit pattern).

    Such a grid shares float32's exponent range, subnormals included, so rounding
    is clearing the low ``23 - mbits`` bits of the magnitude, after adding half a
    step less one plus the kept lowest bit (ties to even) for round to nearest;
    a carry past the largest finite value lands on inf's pattern.
    """
    shift = 23 - mbits
    low = (1 << shift) - 1

    def rnd(x):
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        mag = bits & np.uint32(0x7FFFFFFF)
        if not toward_zero:
            mag = mag + np.uint32(low >> 1) + ((mag >> np.uint32(shift)) & np.uint32(1))
        mag = mag & np.uint32(~low & 0xFFFFFFFF)
        return (mag | (bits & np.uint32(0x80000000))).view(np.float32)

    return rnd


def _cast(dtype):
    """Rounding to ``dtype`` by its numpy cast (ml_dtypes for bfloat16), back in float32."""
    return lambda x: np.asarray(x, np.float32).astype(dtype).astype(np.float32)


F32, BF16, F16 = _cast(np.float32), _cast(ml_dtypes.bfloat16), _cast(np.float16)


def _reference(a, b, *, chunk=1, promote_every=None, narrow=F32, wide=F32):
    """The accumulator model for ``a @ b`` (float32 (M, K) and (K, N)), one chunk of K at a time.

    A chunk's products are summed in float64 and rounded once to float32: the
    exact chunk sum wherever float32 holds it (the tests keep it so).
    """
    m, k = a.shape
    total = np.zeros((m, b.shape[1]), np.float32)
    s = np.zeros_like(total)
    for start in range(0, k, chunk):
        c = np.zeros(total.shape, np.float64)
        for j in range(start, min(start + chunk, k)):
            c += a[:, j, None].astype(np.float64) * b[None, j, :].astype(np.float64)
        s = narrow(s + c.astype(np.float32))  # a float32 addition, then rounded to the narrow format
        end = start + chunk
        if end >= k or (promote_every is not None and end % promote_every == 0):
            total = wide(total + s)
            s = np.zeros_like(total)
    return total


def test_reference_rounding_matches_ml_dtypes():
    # The test's own e8 rounding is the bf16 cast for mbits=7 (large, tiny, subnormal and overflowing values).
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    x = np.concatenate([x, x * np.float32(1e37), x * np.float32(1e-39), np.float32([3.4e38, -3.39e38, 0, -0.0])])
    np.testing.assert_array_equal(_e8_rounding(7)(x), BF16(x))


def _normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dyadic(shape, seed):
    """Multiples of 1/8 in [-8, 8): chunk sums of their products are exact in float32."""
    return (np.random.default_rng(seed).integers(-64, 64, shape) / 8).astype(np.float32)


E8M7 = FloatFormat(ebits=8, mbits=7)

# (Accumulator kwargs, reference kwargs, inputs): chunk > 1 takes dyadic inputs, whose chunk sums are exact.
CASES = {
    "bf16": (dict(fmt="bfloat16"), dict(narrow=BF16), _normal),
    "fp16_promote8": (dict(fmt=jnp.float16, promote_every=8), dict(promote_every=8, narrow=F16), _normal),
    "e8m7_toward_zero_promote16": (
        dict(fmt=E8M7, rounding="toward_zero", promote_every=16),
        dict(promote_every=16, narrow=_e8_rounding(7, toward_zero=True)),
        _normal,
    ),
    "fp16_chunk4_promote16": (
        dict(fmt="float16", chunk=4, promote_every=16),
        dict(chunk=4, promote_every=16, narrow=F16),
        _dyadic,
    ),
    "fp16_into_bf16": (
        dict(fmt="float16", promote_every=6, promote_fmt="bfloat16"),
        dict(promote_every=6, narrow=F16, wide=BF16),
        _normal,
    ),
    "f32_chunk3": (dict(chunk=3), dict(chunk=3), _dyadic),
    # A 22-bit e8m13 ("FP22") level: FloatFormat past 16 bits, truncating adds.
    "fp22_toward_zero_promote16": (
        dict(fmt=FloatFormat(ebits=8, mbits=13), rounding="toward_zero", promote_every=16),
        dict(promote_every=16, narrow=_e8_rounding(13, toward_zero=True)),
        _normal,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_matmul_bit_exact_against_numpy_loop(name):
    kwargs, ref_kwargs, draw = CASES[name]
    a, b = draw((5, 45), 1), draw((45, 3), 2)
    got = accumulated_dot_general(a, b, DN_MATMUL, Accumulator(**kwargs))
    want = _reference(a, b, **ref_kwargs)
    assert got.dtype == jnp.float32 and got.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", ["bf16", "fp16_chunk4_promote16"])
def test_batched_dot_general_with_two_contracting_dims(name):
    # lhs (B, K1, M, K2), rhs (K2, B, N, K1); contracting (K2, K1) in that order: K2 varies slowest.
    kwargs, ref_kwargs, draw = CASES[name]
    lhs, rhs = draw((2, 3, 4, 5), 3), draw((5, 2, 6, 3), 4)
    dn = (((3, 1), (0, 3)), ((0,), (1,)))
    f = jax.jit(accumulated_dot_general, static_argnums=(2, 3))
    got = np.asarray(f(lhs, rhs, dn, Accumulator(**kwargs)))
    a = lhs.transpose(0, 2, 3, 1).reshape(2, 4, 15)  # (B, M, K2*K1)
    b = rhs.transpose(1, 0, 3, 2).reshape(2, 15, 6)  # (B, K2*K1, N)
    assert got.shape == lax.dot_general(lhs, rhs, dn).shape == (2, 4, 6)
    for i in range(2):
        np.testing.assert_array_equal(got[i], _reference(a[i], b[i], **ref_kwargs))


def test_float32_default_is_dot_general():
    a, b = _normal((6, 300), 5), _normal((300, 4), 6)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = accumulated_dot_general(a, b, DN_MATMUL, Accumulator())
    np.testing.assert_allclose(got, lax.dot_general(a, b, DN_MATMUL), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    # Where no summation order can change the sum (exact sums), it is lax's result bit for bit; any chunk.
    d, e = _dyadic((6, 300), 7), _dyadic((300, 4), 8)
    for chunk in (1, 7, 300):
        np.testing.assert_array_equal(
            accumulated_dot_general(d, e, DN_MATMUL, Accumulator(chunk=chunk)), lax.dot_general(d, e, DN_MATMUL)
        )


def test_gradient_is_the_exact_products():
    # Straight through the rounding: d/dlhs and d/drhs are lax.dot_general's (rounding's own derivative is 0).
    lhs, rhs = _normal((2, 3, 8), 20), _normal((2, 8, 4), 21)
    dn = (((2,), (1,)), ((0,), (0,)))
    cot = _normal((2, 3, 4), 22)
    acc = Accumulator(fmt="bfloat16", chunk=2, promote_every=4)
    got = jax.grad(lambda a, b: jnp.sum(accumulated_dot_general(a, b, dn, acc) * cot), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(lambda a, b: jnp.sum(lax.dot_general(a, b, dn) * cot), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_result_dtype_follows_dot_general():
    a, b = jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16)
    acc = Accumulator(fmt="bfloat16")
    assert accumulated_dot_general(a, b, DN_MATMUL, acc).dtype == jnp.bfloat16
    out = accumulated_dot_general(a, b, DN_MATMUL, acc, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and np.all(np.asarray(out) == 4)


@pytest.mark.parametrize(
    "fmt,promote_every,want",
    [
        ("bfloat16", None, 256.0),  # 256 + 1 is a tie between 256 and 258: it stays at 256
        ("float16", None, 2048.0),
        ("bfloat16", 128, 4096.0),  # DeepSeek-V3's promotion interval: each 128 is exact, and f32 holds 4096
        ("float32", None, 4096.0),
    ],
)
def test_summing_ones_stalls_at_the_format_precision(fmt, promote_every, want):
    ones = jnp.ones((1, 4096), jnp.float32)
    out = accumulated_dot_general(ones, ones.T, DN_MATMUL, Accumulator(fmt=fmt, promote_every=promote_every))
    assert float(out[0, 0]) == want


def test_bf16_error_grows_with_k_and_promotion_bounds_it():
    # Row i of lhs holds K_i random values and then zeros (which add nothing): one call covers every K.
    ks = (64, 512, 4096)
    rng = np.random.default_rng(9)
    a = np.stack([np.where(np.arange(4096) < k, rng.random(4096, np.float32), 0) for k in ks]).astype(np.float32)
    b = rng.random((4096, 8), np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for promote_every in (None, 32):
        got = accumulated_dot_general(a, b, DN_MATMUL, Accumulator(fmt="bfloat16", promote_every=promote_every))
        errors[promote_every] = np.median(np.abs(np.asarray(got, np.float64) - exact) / exact, axis=1)
    assert errors[None][0] < errors[None][1] < errors[None][2]
    assert errors[None][2] > 0.5  # partial sums near 1000 have an ulp of 8: products below 4 no longer count
    assert errors[32].max() < 2.0**-7  # each 32-long partial sum carries bf16's error once


def test_float_overflow_follows_the_format_or_saturates():
    a, b = jnp.full((1, 2), 250.0, jnp.float32), jnp.full((2, 1), 200.0, jnp.float32)  # 50000 + 50000
    assert float(accumulated_dot_general(a, b, DN_MATMUL, Accumulator(fmt="float16"))[0, 0]) == np.inf
    sat = Accumulator(fmt="float16", overflow="saturate")
    assert float(accumulated_dot_general(a, b, DN_MATMUL, sat)[0, 0]) == 65504.0


# Rows of lhs are the product sequences (rhs is ones); 8-bit accumulators. Worked by hand:
#   saturate, chunk 1:  r0 100,127,127,-1   r1 100,127,27,-73    r2 -128,-128,-1,126
#   wrap:               the exact sums 172, 0, -2 modulo 256, read signed
#   saturate, chunk 2:  chunk sums (200,-28) (200,-200) (-256,254) -> 127,99 | 127,-73 | -128,126
#   saturate, promote every 2 into int32: r0 127 + (100-28) | r1 127 + (-100-128) | r2 -128 + 127(254)
#   wrap, promote every 2 into int32: r0 -56 + -28 | r1 -56 + 56 | r2 0 + -2
INT_ROWS = np.array([[100, 100, 100, -128], [100, 100, -100, -100], [-128, -128, 127, 127]], np.int8)
INT_TABLE = [
    (dict(overflow="saturate"), [-1, -73, 126]),
    (dict(overflow="wrap"), [-84, 0, -2]),
    (dict(overflow="saturate", chunk=2), [99, -73, 126]),
    (dict(overflow="saturate", promote_every=2), [99, -1, -1]),
    (dict(overflow="wrap", promote_every=2), [-84, 0, -2]),
    (dict(overflow="saturate", promote_every=1), [172, 0, -2]),  # every product promoted: exact
]


@pytest.mark.parametrize("kwargs,want", INT_TABLE)
def test_int8_accumulator_table(kwargs, want):
    ones = jnp.ones((4, 1), jnp.int8)
    out = accumulated_dot_general(
        INT_ROWS, ones, DN_MATMUL, Accumulator(fmt=8, **kwargs), preferred_element_type=jnp.int32
    )
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out)[:, 0], want)


@pytest.mark.parametrize("overflow,want", [("saturate", [2**31 - 1, -(2**31)]), ("wrap", [0, 0])])
def test_int32_accumulator_saturates_past_int32_or_wraps(overflow, want):
    # Products of +-2^30: running sums 2^30, 2^31 (past int32), 3 * 2^30, 2^32.
    lhs = jnp.array([[2**15] * 4, [-(2**15)] * 4], jnp.int32)
    rhs = jnp.full((4, 1), 2**15, jnp.int32)
    out = accumulated_dot_general(lhs, rhs, DN_MATMUL, Accumulator(fmt=32, overflow=overflow))
    np.testing.assert_array_equal(np.asarray(out)[:, 0], want)


def test_accumulator_is_normalised_and_hashable():
    by_name, by_dtype = Accumulator(fmt="bfloat16"), Accumulator(fmt=jnp.bfloat16)
    assert by_name == by_dtype == Accumulator(fmt=E8M7, promote_fmt=jnp.float32)
    assert hash(by_name) == hash(by_dtype)
    assert Accumulator(fmt=16, overflow="wrap").promote_fmt == 32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(chunk=0), ValueError, r"Accumulator\.chunk=0 .*allowed: an integer >= 1"),
        (dict(chunk=2.0), ValueError, r"Accumulator\.chunk=2\.0 .*an integer"),
        (dict(chunk=4, promote_every=6), ValueError, r"Accumulator\.promote_every=6 .*multiple of chunk=4"),
        (dict(chunk=4, promote_every=2), ValueError, r"Accumulator\.promote_every=2 .*>= 4"),
        (dict(fmt="nope"), ValueError, r"Accumulator\.fmt='nope' .*FloatFormat"),
        (dict(fmt="int8"), ValueError, r"Accumulator\.fmt=IntFormat.*FloatFormat"),
        (dict(fmt=FloatFormat(ebits=4, mbits=3, signed=False)), ValueError, r"Accumulator\.fmt=.*signed"),
        (dict(fmt=None), TypeError, r"Accumulator\.fmt=None .*FloatFormat"),
        (dict(fmt=np.float64), TypeError, r"Accumulator\.fmt=.*float64.*bfloat16"),
        (dict(fmt=1, overflow="wrap"), ValueError, r"Accumulator\.fmt=1 .*\[2, 32\]"),
        (dict(fmt=33, overflow="wrap"), ValueError, r"Accumulator\.fmt=33 .*\[2, 32\]"),
        (dict(fmt=16), ValueError, r"Accumulator\.overflow=None .*'saturate' or 'wrap'"),
        (dict(fmt=16, overflow="wrap", promote_fmt="float32"), ValueError, r"Accumulator\.promote_fmt='float32'"),
        (dict(fmt=16, overflow="wrap", rounding="toward_zero"), ValueError, r"Accumulator\.rounding="),
        (dict(fmt="bfloat16", overflow="wrap"), ValueError, r"Accumulator\.overflow='wrap' .*'saturate'"),
        (dict(fmt="bfloat16", rounding="stochastic"), ValueError, r"Accumulator\.rounding='stochastic' .*toward_zero"),
        (dict(overflow="saturate"), ValueError, r"Accumulator\.overflow='saturate' .*float32"),
        (dict(rounding="toward_zero"), ValueError, r"Accumulator\.rounding='toward_zero' .*float32"),
        (dict(fmt="bfloat16", promote_fmt="int8"), ValueError, r"Accumulator\.promote_fmt=IntFormat"),
    ],
)
def test_accumulator_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        Accumulator(**kwargs)


def test_operands_must_suit_the_accumulator():
    f, i = jnp.ones((2, 3), jnp.float32), jnp.ones((3, 2), jnp.int8)
    with pytest.raises(TypeError, match="rhs has dtype int8"):
        accumulated_dot_general(f, i, DN_MATMUL, Accumulator())
    with pytest.raises(TypeError, match="lhs has dtype float32"):
        accumulated_dot_general(f, i, DN_MATMUL, Accumulator(fmt=8, overflow="wrap"))
    with pytest.raises(TypeError, match="lhs has dtype float64"):
        accumulated_dot_general(np.ones((2, 3)), f.T, DN_MATMUL, Accumulator())
    with pytest.raises(TypeError, match="acc="):
        accumulated_dot_general(f, f.T, DN_MATMUL, "bfloat16")
    with pytest.raises(TypeError):  # lax's own check of the dimension numbers
        accumulated_dot_general(f, f, DN_MATMUL, Accumulator())


def test_fp22_accumulator():
    fp22 = FloatFormat(ebits=8, mbits=13)  # DeepSeek-V3's ~14 bits of accumulation precision
    a, b = _normal((5, 300), 10), _normal((300, 3), 11)
    got = accumulated_dot_general(a, b, DN_MATMUL, Accumulator(fmt=fp22, promote_every=128))
    np.testing.assert_array_equal(np.asarray(got), _reference(a, b, promote_every=128, narrow=_e8_rounding(13)))
