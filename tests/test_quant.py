"""lowbit.quant: Quantizer validation, fake_quant / quantize / dequantize properties, ViT kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats, quant
from lowbit.quant import (
    KL,
    MSE,
    PTF,
    Absmax,
    Block,
    Channel,
    Delayed,
    Fixed,
    Group,
    Learned,
    Log2,
    Percentile,
    Quantizer,
    Tensor,
    Twin,
    Uniform,
)

SHAPE = (16, 32)


def _x(seed, shape=SHAPE, dtype=jnp.float32):
    """Gaussian data whose channels (last axis) span 2^-4 .. 2^4 in magnitude."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.integers(-4, 5, shape[-1]))
    return jnp.asarray((rng.standard_normal(shape) * mag).astype(np.float32)).astype(dtype)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _mse(a, b):
    return float(jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))))


# ----- construction ------------------------------------------------------------------------
# Each part checks its own fields, then what it needs of the rest of the quantizer: the message names
# the owner and field (``Group.size``, ``Quantizer.scale``), the value and what is allowed.
@pytest.mark.parametrize(
    "make,owner_field",
    [
        (lambda: Group(size=0), "Group.size"),
        (lambda: Group(size=-4), "Group.size"),
        (lambda: Quantizer(format="int8", granularity=Group()), "Group.size"),
        (lambda: Channel(axis=99), "Channel.axis"),
        (lambda: Percentile(q=0), "Percentile.q"),
        (lambda: Percentile(q=100.5), "Percentile.q"),
        (lambda: Percentile(q=True), "Percentile.q"),
        (lambda: Quantizer(format="int9000"), "Quantizer.format"),
        (lambda: Quantizer(format="int8", scale_format="bf16"), "Quantizer.scale_format"),
        (lambda: Quantizer(format="int8", rounding="up"), "Quantizer.rounding"),
        (lambda: Fixed(step=-1.0), "Fixed.step"),
        (lambda: Fixed(step=float("inf")), "Fixed.step"),
        (lambda: Delayed(history=0), "Delayed.history"),
        (lambda: Delayed(reduction="mean"), "Delayed.reduction"),
        (lambda: Quantizer(format="int8", granularity=Channel(), scale=Delayed()), "Quantizer.scale"),
        (lambda: Quantizer(format="float8_e4m3fn", kind=Uniform(symmetric=False)), "Uniform.symmetric"),
        (lambda: Uniform(zero_point_range="half"), "Uniform.zero_point_range"),
        (lambda: Quantizer(format="uint8", kind=Uniform(zero_point_range="restricted")), "Uniform.zero_point_range"),
        (lambda: Quantizer(format="int8", scale=KL(), granularity=Channel()), "Quantizer.scale"),
        (lambda: Quantizer(format=formats.IntFormat(bits=12), scale=KL()), "Quantizer.scale"),
        (lambda: Quantizer(format="float8_e4m3fn", kind=Log2()), "Quantizer.format"),
        (lambda: Quantizer(format="int8", kind=Log2(), rounding="stochastic"), "Quantizer.rounding"),
        (lambda: Quantizer(format="uint4", kind=Twin(split="sign")), "Quantizer.format"),
        (lambda: Twin(split="both"), "Twin.split"),
        (lambda: Twin(shift=0), "Twin.shift"),
        (lambda: PTF(max_power=9), "PTF.max_power"),
        (lambda: Quantizer(format="int8", kind=PTF()), "Quantizer.granularity"),
        (lambda: Quantizer(format="int8", kind=PTF(), granularity=Channel(), scale=MSE()), "Quantizer.scale"),
        (lambda: Block(shape=(16,)), "Block.shape"),
        (lambda: Block(shape=[16, 16]), "Block.shape"),
        (lambda: Block(shape=(0, 16)), "Block.shape"),
        (lambda: Block(shape=(True, 16)), "Block.shape"),
        (lambda: Quantizer(format="nvfp4", granularity=Channel()), "Quantizer.granularity"),
        (lambda: Quantizer(format="nvfp4", granularity=Tensor()), "Quantizer.granularity"),
        (lambda: Quantizer(format="mxfp8_e4m3", granularity=Group(size=16)), "Group.size"),
        (lambda: Quantizer(format="mxfp8_e4m3", scale=Percentile()), "Quantizer.scale"),
        (lambda: Quantizer(format="mxfp8_e4m3", scale_format="e8m0"), "Quantizer.scale_format"),
    ],
)
def test_invalid_quantizer_names_field_and_allowed(make, owner_field):
    with pytest.raises(ValueError, match=rf"{owner_field}=.*allowed"):
        make()


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(granularity="channel"), "granularity"),
        (dict(scale="absmax"), "scale"),
        (dict(kind=Absmax()), "kind"),
        (dict(granularity=Uniform()), "granularity"),
    ],
)
def test_parts_of_the_wrong_type_are_type_errors(kw, field):
    """The flat strings of before (granularity="channel") are refused with the typed parts named."""
    with pytest.raises(TypeError, match=rf"Quantizer\.{field}=.*allowed: .*\(\)"):
        Quantizer(format="int8", **kw)


def test_bool_flags_and_numpy_integers():
    with pytest.raises(TypeError, match=r"Absmax\.static"):
        Absmax(static=1)
    with pytest.raises(TypeError, match=r"Uniform\.symmetric"):
        Uniform(symmetric="no")
    g = Group(size=np.int64(32), axis=np.int64(0))
    assert (type(g.size), type(g.axis)) == (int, int) and g == Group(size=32, axis=0)
    assert Block(shape=(np.int32(16), 16)).shape == (16, 16)


def test_block_formats_default_to_their_own_blocks():
    q = Quantizer(format="mxfp8_e4m3")
    assert q.granularity == Group(size=32, axis=-1)
    assert Quantizer(format="mxfp8_e4m3", granularity=Group(axis=0)).granularity == Group(size=32, axis=0)
    assert Quantizer(format="int8").granularity == Tensor()
    q = Quantizer(format="int8", granularity=Channel(axis=0), scale=Percentile(q=99.9, static=True))
    assert str(q) == "int8 channel(axis 0) percentile(99.9) (static)"
    assert str(Quantizer(format="mxfp8_e4m3", granularity=Group(axis=0))) == "mxfp8_e4m3 group(32, axis 0)"


def test_quantizer_is_hashable_static_and_resolves_format():
    a = Quantizer(format="int8", granularity=Channel())
    b = Quantizer(format=formats.get("int8"), granularity=Channel())
    assert a == b and hash(a) == hash(b) and a.format is formats.get("int8")
    f = jax.jit(quant.fake_quant, static_argnums=0)
    x = _x(0)
    np.testing.assert_array_equal(f(a, x), quant.fake_quant(b, x))


def test_call_errors():
    q = Quantizer(format="int8", granularity=Channel(axis=2))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quant.fake_quant(q, _x(0))
    with pytest.raises(TypeError, match="int32"):
        quant.fake_quant(Quantizer(format="int8"), jnp.arange(8, dtype=jnp.int32))
    with pytest.raises(ValueError, match="Group.size=5 does not divide"):
        quant.fake_quant(Quantizer(format="int8", granularity=Group(size=5)), _x(0))
    with pytest.raises(ValueError, match="key"):
        quant.fake_quant(Quantizer(format="int8", rounding="stochastic"), _x(0))
    with pytest.raises(ValueError, match="scale="):
        quant.fake_quant(Quantizer(format="int8", scale=Learned()), _x(0))
    with pytest.raises(ValueError, match="scale="):
        quant.fake_quant(Quantizer(format="int8"), _x(0), scale=jnp.float32(1))
    with pytest.raises(ValueError, match="state="):
        quant.fake_quant(Quantizer(format="int8", scale=Absmax(static=True)), _x(0))


# ----- core properties ---------------------------------------------------------------------
EQUIVARIANT = [
    dict(format="int8"),
    dict(format="int4", granularity=Channel(axis=-1), scale_format="e8m0"),
    dict(format="float8_e4m3fn", granularity=Channel(axis=0), scale_format="e4m3"),
    dict(format="float4_e2m1fn", granularity=Group(size=8, axis=1)),
    dict(format="uint4", granularity=Channel(), kind=Uniform(symmetric=False)),
]


@pytest.mark.parametrize("kw", EQUIVARIANT, ids=lambda kw: "-".join(map(str, kw.values())))
@given(k=st.integers(-20, 20), seed=st.integers(0, 2**16))
def test_power_of_two_scale_equivariance(kw, k, seed):
    """Absmax scales move with the data: fake_quant(2^k x) = 2^k fake_quant(x), bit for bit."""
    q = Quantizer(**kw)
    x = _x(seed)
    f = jax.jit(quant.fake_quant, static_argnums=0)
    s = jnp.float32(2.0**k)
    np.testing.assert_array_equal(_bits(f(q, x * s)), _bits(f(q, x) * s))


@given(st.sampled_from(["int8", "int4", "float4_e2m1fn"]), st.integers(0, 5))
def test_per_channel_error_at_most_per_tensor(fmt, seed):
    # Uniform grids (and FP4's, whose range is narrow): a float grid's relative
    # error hardly depends on the step, so there per-channel only ties.
    x = _x(seed)
    f = jax.jit(quant.fake_quant, static_argnums=0)
    per_tensor = _mse(f(Quantizer(format=fmt), x), x)
    per_channel = _mse(f(Quantizer(format=fmt, granularity=Channel()), x), x)
    assert per_channel <= per_tensor


@pytest.mark.parametrize("fmt,zpr", [("uint8", "full"), ("uint4", "full"), ("int4", "restricted")])
@given(offset=st.floats(-3, 3), width=st.floats(0.1, 4), seed=st.integers(0, 3))
def test_asymmetric_maps_min_max_within_half_step(fmt, zpr, offset, width, seed):
    q = Quantizer(format=fmt, kind=Uniform(symmetric=False, zero_point_range=zpr))
    x = jnp.asarray((np.random.default_rng(seed).random(SHAPE) * width + offset).astype(np.float32))
    y = jax.jit(quant.fake_quant, static_argnums=0)(q, x)
    p = quant.qparams(q, x)
    step, zp = float(p.step().item()), float(p.zero_point.item())
    half = step / 2 * (1 + 1e-6)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert abs(float(y.reshape(-1)[jnp.argmin(x)]) - float(x.min())) <= half or float(x.min()) > 0
    assert abs(float(y.reshape(-1)[jnp.argmax(x)]) - float(x.max())) <= half or float(x.max()) < 0
    qmin, qmax = q.int_range
    assert zp == round(zp) and qmin <= zp <= qmax
    assert (hi - lo) / (qmax - qmin) == pytest.approx(step, rel=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(format="int8"),
        dict(format="uint8", kind=Uniform(symmetric=False)),
        dict(format="int4", granularity=Channel(), kind=Uniform(symmetric=False)),
        dict(format="float8_e4m3fn", granularity=Channel()),
        dict(format="uint4", kind=Twin()),
        dict(format="uint4", kind=Log2()),
    ],
)
def test_zero_is_exact(kw):
    x = jnp.abs(_x(1)) + jnp.float32(0.5)  # all positive: zero is not even inside the data range
    x = x.at[3, 5].set(0.0)
    y = quant.fake_quant(Quantizer(**kw), x)
    assert float(y[3, 5]) == 0.0


CONFIGS = [
    dict(format="int8"),
    dict(format="int4", granularity=Channel(axis=0)),
    dict(format="int2", granularity=Group(size=8, axis=-1)),
    dict(format="uint8", granularity=Channel(), kind=Uniform(symmetric=False)),
    dict(format="int4", kind=Uniform(symmetric=False, zero_point_range="restricted")),
    dict(format="int8", scale_format="e8m0", granularity=Channel()),
    dict(format="int4", scale_format="e4m3", granularity=Group(size=4, axis=0)),
    dict(format="float8_e4m3fn"),
    dict(format="float8_e5m2", granularity=Channel(), saturate=False),
    dict(format="float4_e2m1fn", granularity=Group(size=16), scale_format="e8m0"),
    dict(format="binary", granularity=Channel()),
    dict(format="int4", granularity=Channel(), scale=MSE()),
    dict(format="int4", kind=Log2()),
    dict(format="uint4", kind=Twin(shift=2)),
    dict(format="int6", granularity=Channel(), kind=Twin(split="sign")),
    dict(format="uint8", granularity=Channel(), kind=PTF(symmetric=False)),
    dict(format="int8", rounding="stochastic", granularity=Channel()),
]


def _quantizer(kw):
    kw = dict(kw)
    if kw["format"] == "int6":
        kw["format"] = formats.IntFormat(bits=6)
    return Quantizer(**kw)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(map(str, kw.values())))
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_dequantize_quantize_equals_fake_quant_bitwise(kw, seed):
    q = _quantizer(kw)
    x = _x(seed)
    key = jax.random.key(seed) if q.rounding == "stochastic" else None
    y = quant.fake_quant(q, x, key)
    qt = quant.quantize(q, x, key)
    np.testing.assert_array_equal(_bits(quant.dequantize(qt)), _bits(y))
    assert y.dtype == x.dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kw", [dict(format="int4", granularity=Channel()), dict(format="float8_e4m3fn")])
def test_half_precision_inputs_keep_dtype_and_bit_exactness(dtype, kw):
    q = Quantizer(**kw)
    x = _x(2, dtype=dtype)
    y = quant.fake_quant(q, x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(_bits(quant.dequantize(quant.quantize(q, x))), _bits(y))
    # Computed in float32, then cast once.
    ref = quant.fake_quant(q, x.astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(_bits(y), _bits(ref))


def test_values_lie_on_the_scaled_grid():
    q = Quantizer(format="int4", granularity=Channel())
    x = _x(3)
    p = quant.qparams(q, x)
    levels = np.asarray(quant.fake_quant(q, x)) / np.asarray(p.step())
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    assert np.round(levels).min() >= -8 and np.round(levels).max() <= 7
    np.testing.assert_allclose(
        np.asarray(p.step()), np.max(np.abs(np.asarray(x)), axis=0, keepdims=True) / 7, rtol=1e-6
    )


def test_e8m0_scale_is_a_power_of_two_rounded_up():
    q = Quantizer(format="int8", granularity=Channel(), scale_format="e8m0")
    x = _x(4)
    step = np.asarray(quant.qparams(q, x).step())
    m, _ = np.frexp(step)
    np.testing.assert_array_equal(m, 0.5)
    amax = np.max(np.abs(np.asarray(x)), axis=0, keepdims=True)
    assert np.all(amax <= 127 * step) and np.all(amax > 127 * step / 2)
    y = quant.fake_quant(q, x)
    np.testing.assert_allclose(y, x, atol=float(step.max()) / 2)  # nothing clipped


def test_non_finite_inputs_do_not_move_the_scale():
    x = _x(7)
    bad = x.at[0, 0].set(jnp.inf).at[1, 1].set(jnp.nan)
    q = Quantizer(format="int8", granularity=Channel())
    step = quant.qparams(q, bad).step()
    np.testing.assert_array_equal(step, quant.qparams(q, x.at[0, 0].set(0).at[1, 1].set(0)).step())
    y = quant.fake_quant(q, bad)
    assert y[0, 0] == step[0, 0] * jnp.float32(127) and np.isnan(float(y[1, 1]))  # inf saturates


def test_empty_and_scalar_inputs():
    q = Quantizer(format="int8", granularity=Channel())
    assert quant.fake_quant(q, jnp.zeros((0, 4), jnp.float32)).shape == (0, 4)
    assert quant.quantize(q, jnp.zeros((0, 4), jnp.float32)).nbytes == 4 * 4  # the scales only
    assert float(quant.fake_quant(Quantizer(format="int4"), jnp.float32(-3.0))) == -3.0


def test_learned_scale_equals_fixed_scale():
    x = _x(5)
    learned = quant.fake_quant(Quantizer(format="int8", scale=Learned()), x, scale=jnp.float32(0.125))
    fixed = quant.fake_quant(Quantizer(format="int8", scale=Fixed(step=0.125)), x)
    np.testing.assert_array_equal(learned, fixed)
    per_channel = jnp.full((1, SHAPE[1]), 0.125, jnp.float32)
    np.testing.assert_array_equal(
        quant.fake_quant(Quantizer(format="int8", granularity=Channel(), scale=Learned()), x, scale=per_channel), fixed
    )


def test_stochastic_rounding_is_unbiased_and_reproducible():
    q = Quantizer(format="int4", scale=Fixed(step=1.0), rounding="stochastic")
    x = jnp.linspace(-6.5, 6.5, 64, dtype=jnp.float32)
    f = jax.jit(lambda k: quant.fake_quant(q, x, k))
    ys = jax.vmap(f)(jax.random.split(jax.random.key(0), 1000))
    np.testing.assert_allclose(jnp.mean(ys, axis=0), x, atol=0.08)  # 5 sigma of a mean of 1000
    np.testing.assert_array_equal(f(jax.random.key(3)), f(jax.random.key(3)))


@pytest.mark.skipif("mxfp4_e2m1" not in formats.names(), reason="block formats not registered")
def test_block_formats_delegate_along_axis():
    fmt = formats.get("mxfp4_e2m1")
    x = _x(6, shape=(64, 32))
    y = quant.fake_quant(Quantizer(format=fmt, granularity=Group(axis=0)), x)
    np.testing.assert_array_equal(y, jax.jit(lambda v: formats.quantize(fmt, v.T).T)(x))
    qt = quant.quantize(Quantizer(format=fmt, granularity=Group(axis=0)), x)
    np.testing.assert_array_equal(_bits(quant.dequantize(qt)), _bits(y))
    assert qt.nbytes == x.size // 2 + x.size // 32  # 4-bit codes + one E8M0 byte per 32


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_2d_blocks_scale_each_tile_on_its_own(fmt):
    """One scale per (4, 8) tile of the last two axes: each tile quantizes as a tensor of its own."""
    x = _x(7, shape=(2, 8, 32))
    q = Quantizer(format=fmt, granularity=Block(shape=(4, 8)))
    y = np.asarray(quant.fake_quant(q, x))
    per_tensor = jax.jit(lambda t: quant.fake_quant(Quantizer(format=fmt), t))
    for b, i, j in np.ndindex(2, 2, 4):
        tile = np.s_[b, 4 * i : 4 * i + 4, 8 * j : 8 * j + 8]
        np.testing.assert_array_equal(y[tile], per_tensor(x[tile]))
    assert quant.qparams(q, x).scale.shape == (2, 2, 1, 4, 1)
    np.testing.assert_array_equal(_bits(quant.dequantize(quant.quantize(q, x))), _bits(y))


@pytest.mark.skipif("nvfp4" not in formats.names(), reason="block formats not registered")
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "nvfp4"])
def test_2d_blocks_of_a_block_format_make_one_block_per_tile(name):
    """A block format's 2-D tile is one block of rows * cols elements: one E8M0 / E4M3 scale per tile."""
    fmt = formats.get(name)
    x = _x(8, shape=(32, 48))
    q = Quantizer(format=fmt, granularity=Block(shape=(16, 16)))
    tiles = x.reshape(2, 16, 3, 16).transpose(0, 2, 1, 3).reshape(2, 3, 256)
    tile_fmt = formats.BlockFormat(element=fmt.element, block_size=256, scale=fmt.scale, kind=fmt.kind)
    ref = jax.jit(lambda t: formats.quantize(tile_fmt, t))(tiles).reshape(2, 3, 16, 16).transpose(0, 2, 1, 3)
    y = quant.fake_quant(q, x)
    np.testing.assert_array_equal(y, ref.reshape(32, 48))
    qt = quant.quantize(q, x)
    assert qt.scale.shape == (2, 3, 1)
    np.testing.assert_array_equal(_bits(quant.dequantize(qt)), _bits(y))


def test_2d_blocks_must_tile_the_array():
    q = Quantizer(format="int8", granularity=Block(shape=(4, 8)))
    for shape in [(32,), (6, 32), (8, 12)]:
        with pytest.raises(ValueError, match=r"Block.shape=\(4, 8\) does not tile"):
            quant.fake_quant(q, jnp.ones(shape, jnp.float32))


# ----- ViT kinds -----------------------------------------------------------------------------
def _softmax(seed, shape=(4, 16, 16)):
    z = np.random.default_rng(seed).standard_normal(shape) * 3
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return jnp.asarray((e / e.sum(axis=-1, keepdims=True)).astype(np.float32))


def test_log2_levels_are_powers_of_two_with_geometric_rounding():
    q = Quantizer(format="uint4", scale=Fixed(), kind=Log2())
    p = _softmax(0)
    y = np.asarray(quant.fake_quant(q, p))
    nz = y[y != 0]
    mant, exp = np.frexp(nz)
    assert np.all(mant == 0.5) and np.all(exp - 1 <= 0) and np.all(exp - 1 >= -14)
    # 2^-k / sqrt(2) is the rounding threshold between 2^-k and 2^-(k+1).
    pts = jnp.asarray([0.75, 0.7, 0.36, 0.35, 2.0**-14 * 0.75, 2.0**-14 * 0.7, 2.0**-15, 0.0, 3.0], jnp.float32)
    expect = [1.0, 0.5, 0.5, 0.25, 2.0**-14, 0.0, 0.0, 0.0, 1.0]
    np.testing.assert_array_equal(quant.fake_quant(q, pts), np.float32(expect))


def test_twin_uniform_magnitude_uses_fine_then_coarse_step():
    q = Quantizer(format="uint4", scale=Fixed(step=1 / 7), kind=Twin(shift=3))
    coarse, fine = 1 / 7, 1 / 56  # 3 index bits: 7 coarse steps cover [0, 1]
    p = _softmax(1)
    y = np.asarray(quant.fake_quant(q, p), np.float64)
    small = np.asarray(p) < 7 * fine
    np.testing.assert_allclose(y[small] / fine, np.round(y[small] / fine), atol=1e-5)
    assert np.all(np.abs(y[small] - np.asarray(p)[small]) <= fine / 2 + 1e-7)
    big = np.asarray(p) >= 7.5 * fine
    np.testing.assert_allclose(y[big] / coarse, np.round(y[big] / coarse), atol=1e-5)
    assert np.all(np.abs(y[big] - np.asarray(p)[big]) <= coarse / 2 + 1e-7)


def test_twin_uniform_sign_separates_negative_and_positive_steps():
    x = jax.nn.gelu(_x(2, (64, 64)))
    q = Quantizer(format="int8", kind=Twin(split="sign"))
    p = quant.qparams(q, x)
    pos = float(p.step().item())
    neg = pos * 2.0 ** -int(p.exponent.item())
    assert pos == pytest.approx(float(x.max()) / 127, rel=1e-6)
    assert 127 * neg >= -float(x.min()) > 127 * neg / 2  # the finest power-of-two step that covers min
    y, xn = np.asarray(quant.fake_quant(q, x)), np.asarray(x)
    assert np.all(np.abs(y - xn)[xn < 0] <= neg / 2 * (1 + 1e-5))
    assert np.all(np.abs(y - xn)[xn >= 0] <= pos / 2 * (1 + 1e-5))


@pytest.mark.parametrize("symmetric,fmt", [(True, "int8"), (False, "uint8")])
def test_ptf_factor_picks_the_power_of_each_channel(symmetric, fmt):
    k = 3
    powers = np.array([0, 1, 2, 3, 3, 1, 0, 2])
    # Channel c spans 0.9 * 2^p units (channel 3 the full 2^3: it sets the layer range).
    span = np.where(np.arange(8) == 3, 1.0, 0.9) * 2.0**powers * 0.37
    u = np.random.default_rng(3).uniform(-1, 1, (256, 8))
    u[0], u[1] = 1.0, -1.0
    x = jnp.asarray((u * span).astype(np.float32))
    q = Quantizer(format=fmt, granularity=Channel(), kind=PTF(max_power=k, symmetric=symmetric))
    p = quant.qparams(q, x)
    np.testing.assert_array_equal(np.asarray(p.exponent).ravel(), powers)
    # Static calibration keeps no data: the no-clipping rule agrees here.
    qs = Quantizer(format=fmt, granularity=Channel(), scale=Absmax(static=True), kind=PTF(symmetric=symmetric))
    state = quant.calibrate(qs, lambda b: b, [x[:128], x[128:]])
    np.testing.assert_array_equal(np.asarray(quant.observer(qs).scale(state).exponent).ravel(), powers)
