"""E8M0 scale modes of the MX formats (floor, rceil, ceil, even) against an independent reference.

The reference computes each block's shared exponent from the definitions in
``lowbit/formats/block.py``'s docstring with exact rational arithmetic
(``fractions.Fraction``) on a table of element parameters written here, and
its elements with ``test_block_formats``' numpy + ml_dtypes element reference;
it calls nothing in lowbit. ``rceil`` is also checked against JAX's own MX
quantizer, the one ``jax.nn.scaled_dot_general`` uses.

Element values are compared where inputs and outputs are float32 normals;
blocks of subnormals compare their scale codes only, since XLA:CPU flushes
subnormal floats (lowbit's scales come from integer bit patterns, so they are
platform independent).
"""

import dataclasses
import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax._src.cudnn import scaled_matmul_stablehlo as jax_mx
from test_block_formats import MX_SPEC, assert_bits_equal, blocked, ref_mx_elements

from lowbit import formats
from lowbit.formats import BlockFormat

MODES = ("floor", "rceil", "ceil", "even")
# Fraction bits of each element format's significand (MXINT8: k/64 with k < 128 has 6).
MBITS = {"mxfp8_e4m3": 3, "mxfp8_e5m2": 2, "mxfp6_e3m2": 2, "mxfp6_e2m3": 3, "mxfp4_e2m1": 1, "mxint8": 6}
SHAPES = ((3, 96), (2, 2, 40))  # the second pads its last block
F32_MAX = float(np.finfo(np.float32).max)


@functools.partial(jax.jit, static_argnums=0)
def run(fmt, x):
    enc = formats.encode(fmt, x, saturate=True)
    return formats.quantize(fmt, x), enc, formats.decode(fmt, enc)


def fmt_of(name, mode):
    return formats.with_scale_mode(name, mode)


def up(v):
    """The next float32 above ``v``."""
    return np.nextafter(np.float32(v), np.float32(np.inf))


def down(v):
    """The next float32 toward zero from ``v`` > 0."""
    return np.nextafter(np.float32(v), np.float32(0))


# ----- the reference ---------------------------------------------------------------------------
def _floor_log2(q: Fraction) -> int:
    k = q.numerator.bit_length() - q.denominator.bit_length()  # floor(log2 q) is k or k - 1
    return k if Fraction(2) ** k <= q else k - 1


def _ceil_log2(q: Fraction) -> int:
    k = _floor_log2(q)
    return k if Fraction(2) ** k == q else k + 1


def spec(name):
    """(emax_elem, max_elem, mbits) of a registered MX format, from this file's tables."""
    return MX_SPEC[name][1], MX_SPEC[name][2], MBITS[name]


def ref_exponent(element, mode, amax) -> int:
    """The shared exponent k of a block with largest magnitude ``amax``, clamped to E8M0's [-127, 127].

    ``element`` is ``(emax_elem, max_elem, mbits)``.
    """
    if amax == 0:
        return -127
    emax, vmax, mbits = element
    a = Fraction(float(amax))
    if mode == "floor":
        k = _floor_log2(a) - emax
    elif mode == "ceil":
        k = _ceil_log2(a) - emax
    elif mode == "rceil":
        k = _ceil_log2(a / Fraction(vmax))
    else:  # even: amax rounded to MBITS fraction bits, ties away from zero
        step = Fraction(2) ** (_floor_log2(a) - mbits)
        k = _floor_log2(math.floor(a / step + Fraction(1, 2)) * step) - emax
    return min(max(k, -127), 127)


def reference(name, mode, x):
    """(dequantized values, E8M0 scale codes) of finite float32 ``x``."""
    amax = np.abs(blocked(x, 32)).max(axis=-1)
    shared = np.vectorize(lambda a: ref_exponent(spec(name), mode, a), otypes=[np.int64])(amax)
    with np.errstate(over="ignore"):  # a round-up scale can put a decoded float32-max block at 2^128
        values = ref_mx_elements(name, x, shared)
    return values, (shared + 127).astype(np.uint8)


# ----- inputs ----------------------------------------------------------------------------------
def thresholds(name):
    """Significands in [1, 2) where some mode's exponent steps: powers of two, max_elem's, even's, just below 2."""
    _, emax, vmax = MX_SPEC[name]
    return [1.0, vmax / 2.0**emax, 2 - 2.0 ** -(MBITS[name] + 1), float(down(2))]


@st.composite
def mode_tensors(draw, name):
    """float32 tensors of a fixed shape whose blocks are random, zero, outliers, or have amax at a
    mode's threshold (up to 2 ulps either side), at scales 2^-60..2^60 (inputs and outputs stay normal)."""
    shape = draw(st.sampled_from(SHAPES))
    x = np.zeros(shape, np.float32)
    xb = blocked(x, 32)  # a copy: blocks are filled here and cut back to shape at the end
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for idx in np.ndindex(xb.shape[:-1]):
        kind = draw(st.sampled_from(["random", "zero", "outlier", "edge"]))
        e = draw(st.integers(-60, 60))
        if kind == "zero":
            continue
        b = rng.standard_normal(32)
        if kind == "outlier":
            b[rng.integers(32)] *= 2.0**12
        elif kind == "edge":
            amax = np.float32(draw(st.sampled_from(thresholds(name))))
            ulps = draw(st.integers(-2, 2))
            for _ in range(abs(ulps)):
                amax = up(amax) if ulps > 0 else down(amax)
            b = np.clip(b / 4, -1, 1) * amax  # below amax ...
            b[rng.integers(32)] = amax * rng.choice([-1.0, 1.0])  # ... which one element holds
        xb[idx] = (b * 2.0**e).astype(np.float32)
    n = shape[-1]
    return xb.reshape(*shape[:-1], -1)[..., :n].copy()


# ----- against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MX_SPEC))
def test_matches_reference(name, mode):
    fmt = fmt_of(name, mode)

    @given(mode_tensors(name))
    def check(x):
        want, codes = reference(name, mode, x)
        q, enc, dec = run(fmt, jnp.asarray(x))
        np.testing.assert_array_equal(enc[1], codes)
        assert_bits_equal(q, want)
        assert_bits_equal(dec, want)

    check()


def edge_rows(name):
    """One block per row: amax at powers of two, max_elem, the even threshold, their neighbours, the
    E8M0 range ends; the rest of the row is a ramp below amax."""
    vmax = MX_SPEC[name][2]
    pts = []
    for k in (-20, 0, 9, 100):
        for t in thresholds(name):
            v = np.float32(t * 2.0**k)
            pts += [down(v), v, up(v)]
    pts += [0.0, F32_MAX, down(F32_MAX), 2.0**127, up(2.0**127), down(2.0**127)]
    normal = np.asarray(pts, np.float32)
    tiny = np.asarray(
        [
            2.0**-149,
            2.0**-140,
            down(2.0**-126),
            2.0**-127,
            up(2.0**-127),
            2.0**-126,
            up(2.0**-126),
            vmax * 2.0**-127,
            up(vmax * 2.0**-127),
            down(vmax * 2.0**-127),
            vmax * 2.0**-126,
            up(vmax * 2.0**-126),
            (2 - 2.0 ** -(MBITS[name] + 1)) * 2.0**-127,
            up((2 - 2.0 ** -(MBITS[name] + 1)) * 2.0**-127),
        ],
        np.float32,
    )
    ramp = np.linspace(1, -0.5, 32, dtype=np.float32)
    return normal[:, None] * ramp, tiny[:, None] * ramp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MX_SPEC))
def test_edge_cases_match_reference(name, mode):
    fmt = fmt_of(name, mode)
    normal, tiny = edge_rows(name)
    want, codes = reference(name, mode, normal)
    q, enc, dec = run(fmt, jnp.asarray(normal))
    np.testing.assert_array_equal(enc[1], codes)
    assert_bits_equal(q, want)
    assert_bits_equal(dec, want)
    enc = formats.encode(fmt, jnp.asarray(tiny))  # subnormals: scale codes only (see the module docstring)
    np.testing.assert_array_equal(enc[1], reference(name, mode, tiny)[1])


# Hand-computed shared exponents k (code - 127): amax -> (floor, rceil, ceil, even).
E4M3_TABLE = {  # emax 8, max 448 = 1.75 * 2^8, mbits 3: even steps up from 1.9375 * 2^e
    1.0: (-8, -8, -8, -8),
    448.0: (0, 0, 1, 0),
    up(448): (0, 1, 1, 0),
    down(448): (0, 0, 1, 0),
    256.0: (0, 0, 0, 0),
    down(256): (-1, 0, 0, 0),
    up(256): (0, 0, 1, 0),
    496.0: (0, 1, 1, 1),
    down(496): (0, 1, 1, 0),
    0.0: (-127, -127, -127, -127),
    2.0**-149: (-127, -127, -127, -127),
    down(2.0**-126): (-127, -127, -127, -127),
    448 * 2.0**-127: (-127, -127, -126, -127),
    up(448 * 2.0**-127): (-127, -126, -126, -127),  # float32's quotient would be the subnormal 2^-127
    2.0**127: (119, 119, 119, 119),
    F32_MAX: (119, 120, 120, 120),
}
MXINT8_TABLE = {  # emax 0, max 127/64, mbits 6: even steps up from 1.9921875 * 2^e
    1.0: (0, 0, 0, 0),
    127 / 64: (0, 0, 1, 0),
    up(127 / 64): (0, 1, 1, 0),
    1.9921875: (0, 1, 1, 1),
    down(1.9921875): (0, 1, 1, 0),
    F32_MAX: (127, 127, 127, 127),  # ceil, rceil, even: 128, clamped
    2.0**-127: (-127, -127, -127, -127),
    up(2.0**-127): (-127, -127, -126, -127),  # a subnormal amax, exact: 2^-127 (1 + 2^-22)
    (1 - 2.0**-8) * 2.0**-126: (-127, -126, -126, -126),  # subnormal, significand 2 - 2^-7
}


@pytest.mark.parametrize(("name", "table"), [("mxfp8_e4m3", E4M3_TABLE), ("mxint8", MXINT8_TABLE)])
def test_hand_computed_exponents(name, table):
    amax = np.asarray(list(table), np.float32)
    x = np.zeros((amax.size, 32), np.float32)
    x[:, 5] = amax
    for i, mode in enumerate(MODES):
        codes = np.asarray(formats.encode(fmt_of(name, mode), jnp.asarray(x))[1])[:, 0]
        want = np.asarray([ks[i] for ks in table.values()]) + 127
        np.testing.assert_array_equal(codes, want, err_msg=f"{name} {mode}: amax {amax}")
        np.testing.assert_array_equal([ref_exponent(spec(name), mode, a) + 127 for a in amax], want)


@pytest.mark.parametrize("mode", MODES)
def test_element_with_negative_emax(mode):
    """An element format whose max is far below 1 (e4m3 with bias 40: max 448 * 2^-33, emax_elem -25):
    a zero block still gets 2^-127, and subnormal and huge amax follow the definitions exactly."""
    element = formats.FloatFormat(ebits=4, mbits=3, bias=40, specials="fn")
    fmt = BlockFormat(element=element, scale_mode=mode)
    amax = np.asarray(
        [0, 2.0**-149, 2.0**-140, 5 * 2.0**-130, 2.0**-127, 1.0, 448 * 2.0**-33, 2.0**100, F32_MAX], np.float32
    )
    x = np.zeros((amax.size, 32), np.float32)
    x[:, 7] = -amax
    codes = np.asarray(formats.encode(fmt, jnp.asarray(x))[1])[:, 0]
    want = [ref_exponent((-25, 448 * 2.0**-33, 3), mode, a) + 127 for a in amax]
    np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize("mode", ["rceil", "ceil"])
@pytest.mark.parametrize("name", list(MX_SPEC))
def test_round_up_modes_never_saturate(name, mode):
    """rceil's promise (amax / X <= max_elem) and ceil's (amax / X < 2^emax_elem <= max_elem)."""
    x = (np.random.default_rng(3).standard_normal((64, 32)) * np.exp2(np.arange(-32, 32))[:, None]).astype(np.float32)
    codes = np.asarray(formats.encode(fmt_of(name, mode), jnp.asarray(x))[1]).astype(np.float64)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    assert np.all(amax / np.exp2(codes - 127) <= MX_SPEC[name][2])


# ----- rceil equals JAX's MX quantizer ---------------------------------------------------------
_JAX_MXFP8 = jax_mx.BlockScaleConfig(
    mode="mxfp8",
    block_size=32,
    data_type=jnp.float8_e4m3fn,
    scale_type=jnp.float8_e8m0fnu,
    global_scale=None,
    infer_only=False,
)
jax_quantize = jax.jit(lambda x: jax_mx.quantize(x, _JAX_MXFP8))


@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(4, 64), (2, 3, 96)]))
def test_rceil_equals_jax_mx_quantizer(seed, shape):
    """Same E8M0 scales, same E4M3 element codes as ``jax._src.cudnn.scaled_matmul_stablehlo.quantize``.

    Blocks are random at scales 2^-40..2^40, some with amax at 448 * 2^k or one ulp either side.
    (Zero blocks are left out: JAX's elements there are 0 / 2^-127, NaN on a backend that flushes the
    subnormal divisor, as JAX's eager CPU path does.)
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-40, 41, (*shape[:-1], shape[-1] // 32, 1))).repeat(
        32, axis=-1
    ).reshape(shape)
    x = x.astype(np.float32)
    xb = x.reshape(-1, 32)
    for i in rng.choice(xb.shape[0], xb.shape[0] // 2, replace=False):
        amax = np.float32(448 * 2.0 ** rng.integers(-40, 41))
        amax = np.nextafter(amax, np.float32(rng.choice([0, np.inf]))) if rng.random() < 2 / 3 else amax
        xb[i] = np.clip(xb[i] / np.abs(xb[i]).max(), -1, 1).astype(np.float32) * amax
    x = xb.reshape(shape)
    codes, scales = formats.encode(fmt_of("mxfp8_e4m3", "rceil"), jnp.asarray(x))
    jq, js = jax_quantize(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(js).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(jq).view(np.uint8))


# ----- NaN and inf: every mode follows floor's policy ------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1"])
def test_nan_and_inf(name, mode):
    """The scale comes from the largest finite magnitude; NaN stays NaN; -inf saturates to -max_elem * X;
    an element format without a NaN code marks a NaN block by the E8M0 NaN scale 0xFF."""
    fmt = fmt_of(name, mode)
    x = (np.random.default_rng(4).standard_normal((1, 64)) * 5).astype(np.float32)
    clean = x.copy()
    x[0, 3], x[0, 33], clean[0, 3], clean[0, 33] = np.nan, -np.inf, 0, 0
    want, codes = reference(name, mode, clean)
    q, enc, _ = run(fmt, jnp.asarray(x))
    q = np.asarray(q)
    keep = np.ones(x.shape, bool)
    keep[0, [3, 33]] = False
    assert_bits_equal(q[keep], want[keep])
    assert np.isnan(q[0, 3])
    assert q[0, 33] == np.float32(-MX_SPEC[name][2] * 2.0 ** (int(codes[0, 1]) - 127))
    nan_scale = 0xFF if name == "mxfp4_e2m1" else codes[0, 0]
    np.testing.assert_array_equal(np.asarray(enc[1])[0], [nan_scale, codes[0, 1]])


# ----- the option ------------------------------------------------------------------------------
def test_default_is_floor_and_registered_formats_keep_it():
    e4m3 = formats.get("float8_e4m3fn")
    assert BlockFormat(element=e4m3).scale_mode == "floor"
    assert BlockFormat(element=e4m3) == BlockFormat(element=e4m3, scale_mode="floor")
    assert hash(BlockFormat(element=e4m3)) == hash(BlockFormat(element=e4m3, scale_mode="floor"))
    assert all(formats.get(n).scale_mode == "floor" for n in MX_SPEC)
    assert formats.get("nvfp4").scale_mode is None
    assert formats.SCALE_MODES == MODES


def test_modes_are_distinct_static_arguments():
    """Formats differing only in mode are unequal, so jit never reuses one mode's compiled kernel for another."""
    x = jnp.zeros((1, 32), jnp.float32).at[0, 0].set(448.0)
    got = {
        mode: int(jax.jit(formats.encode, static_argnums=0)(fmt_of("mxfp8_e4m3", mode), x)[1][0, 0]) for mode in MODES
    }
    assert got == {"floor": 127, "rceil": 127, "ceil": 128, "even": 127}
    assert len({fmt_of("mxfp8_e4m3", m) for m in MODES}) == 4


def test_with_scale_mode_names():
    rceil = formats.with_scale_mode("mxfp8_e4m3", "rceil")
    assert rceil.name == "mxfp8_e4m3_rceil" and rceil.scale_mode == "rceil"
    assert rceil == dataclasses.replace(formats.get("mxfp8_e4m3"), scale_mode="rceil")
    assert formats.with_scale_mode(rceil, "even").name == "mxfp8_e4m3_even"
    back = formats.with_scale_mode(rceil, "floor")
    assert back == formats.get("mxfp8_e4m3") and back.name == "mxfp8_e4m3"
    own = BlockFormat(element=formats.get("float6_e2m3fn"), block_size=16, scale_mode="ceil")
    assert own.name == "mx_float6_e2m3fn_b16_ceil"
    assert formats.quantize(rceil, jnp.ones((2, 32), jnp.float32)).shape == (2, 32)


def test_invalid_modes_name_the_field_value_and_allowed():
    e2m1 = formats.get("float4_e2m1fn")
    for bad in ("round", "FLOOR", 1, ""):
        with pytest.raises(ValueError, match=r"BlockFormat\.scale_mode=.*allowed: floor, rceil, ceil, even"):
            BlockFormat(element=e2m1, scale_mode=bad)
    with pytest.raises(ValueError, match=r"scale_mode='rceil'.*allowed: None for kind='nvfp4'"):
        formats.with_scale_mode("nvfp4", "rceil")
    with pytest.raises(ValueError, match=r"scale_mode='up'"):
        formats.with_scale_mode("mxfp4_e2m1", "up")
    with pytest.raises(TypeError, match="with_scale_mode fmt="):
        formats.with_scale_mode("float8_e4m3fn", "rceil")


def test_ml_dtypes_e8m0_reads_the_codes():
    """The scale codes are E8M0 bit patterns: ml_dtypes decodes them to the block scale."""
    x = np.zeros((2, 32), np.float32)
    x[:, 0] = [449.0, 3.0 * 2.0**-100]
    codes = np.asarray(formats.encode(fmt_of("mxfp8_e4m3", "rceil"), jnp.asarray(x))[1]).astype(np.uint8)
    scales = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)[:, 0]
    np.testing.assert_array_equal(scales, [2.0, 2.0 ** math.ceil(math.log2(3.0 * 2.0**-100 / 448))])
