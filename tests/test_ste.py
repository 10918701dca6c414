"""Tests for lowbit.training.ste: forwards against numpy, backwards against the papers.

Data come from a Hypothesis-drawn seed at a few fixed shapes (so JAX compiles each
op once), and are built on the quantization grid: exact grid points, exact
rounding ties and exact clip boundaries are where the rules differ, so random
normals alone would rarely reach them.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.training.ste import (
    SAWB_COEFFICIENTS,
    binary_weight,
    clipped_ste,
    lsq,
    lsq_init_step,
    pact,
    sawb_clip,
    sawb_quantize,
    ste,
    ternary_weight,
)

SHAPES = [(7,), (4, 6), (2, 3, 5)]
BITS = [2, 3, 4, 8]

seeds = st.integers(0, 2**32 - 1)
shapes = st.sampled_from(SHAPES)


def _rng(seed):
    return np.random.default_rng(seed)


def _grid_values(rng, shape, lo, hi):
    """Mix of integers, half-integers and uniforms on [lo - 2, hi + 2] (grid units)."""
    k = rng.integers(int(np.floor(lo)) - 2, int(np.ceil(hi)) + 3, size=shape)
    frac = rng.choice([0.0, 0.5, -0.5], size=shape)
    noise = rng.uniform(lo - 2, hi + 2, size=shape)
    return np.where(rng.random(shape) < 0.6, k + frac, noise).astype(np.float32)


def _sum_to_shape(a, shape):
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True).reshape(shape)


def _vjp(fn, *args):
    out, pullback = jax.vjp(fn, *args)
    ct = np.asarray(_rng(7).normal(size=out.shape), np.float32).astype(out.dtype)
    return out, ct, pullback(ct)


def _levels(bits, signed):
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _quarter_grid(y):
    return jnp.round(y * jnp.asarray(4, y.dtype)) / jnp.asarray(4, y.dtype)


# ----------------------------------------------------------------------------- STE


@given(seed=seeds, shape=shapes)
def test_ste_forward_is_quantizer_and_gradient_is_identity(seed, shape):
    x = _grid_values(_rng(seed), shape, -3, 3)
    out, ct, (dx,) = _vjp(lambda x: ste(x, _quarter_grid), jnp.asarray(x))
    np.testing.assert_array_equal(out, np.round(x * 4) / 4)
    np.testing.assert_array_equal(dx, ct)


@given(
    seed=seeds,
    shape=shapes,
    lo=st.sampled_from([-2.0, -0.75, 0.0]),
    hi=st.sampled_from([0.5, 1.0, 2.5]),
)
def test_clipped_ste_zero_gradient_outside_range(seed, shape, lo, hi):
    x = _grid_values(_rng(seed), shape, lo * 2, hi * 2) / 2  # halves hit lo and hi exactly
    out, ct, (dx,) = _vjp(lambda x: clipped_ste(x, _quarter_grid, lo, hi), jnp.asarray(x))
    np.testing.assert_array_equal(out, np.round(x * 4) / 4)
    np.testing.assert_array_equal(dx, np.where((x >= lo) & (x <= hi), ct, 0))


def test_ste_quantizer_is_not_differentiated_and_dtype_is_restored():
    x = jnp.asarray([0.1, -3.3, 300.0], jnp.bfloat16)
    out, ct, (dx,) = _vjp(lambda x: ste(x, lambda y: y.astype(jnp.float8_e4m3fn)), x)
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, np.asarray(x).astype(ml_dtypes.float8_e4m3fn).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(dx, ct)

    def truncate_mantissa(y):  # bit casts have no derivative; the STE must not ask for one
        bits = jax.lax.bitcast_convert_type(y, jnp.uint32) & jnp.uint32(0xFFFF0000)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    x32 = jnp.asarray([1.2345, -6.789], jnp.float32)
    np.testing.assert_array_equal(jax.grad(lambda x: ste(x, truncate_mantissa).sum())(x32), [1.0, 1.0])


# ----------------------------------------------------------------------------- LSQ / LSQ+


def _lsq_reference(x, s, beta, bits, signed, ct, g):
    q_n, q_p = _levels(bits, signed)
    v = (x - beta) / s
    q = np.round(np.clip(v, np.float32(-q_n), np.float32(q_p))) * s + beta
    low, high = v <= -q_n, v >= q_p
    inside = ~(low | high)
    dq_ds = np.where(low, np.float32(-q_n), np.where(high, np.float32(q_p), np.round(v) - v))
    dx = np.where(inside, ct, np.float32(0))
    ds = _sum_to_shape(ct * dq_ds, np.shape(s)) * np.float32(g)
    dbeta = _sum_to_shape(np.where(inside, np.float32(0), ct), np.shape(beta)) * np.float32(g)
    return q, dx, ds, dbeta


lsq_cases = dict(
    seed=seeds,
    shape=shapes,
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    per_channel=st.booleans(),
)


def _lsq_params(rng, shape, per_channel):
    pshape = (1,) * (len(shape) - 1) + (shape[-1],) if per_channel else ()
    # Powers of two keep x/s exact, so grid points and ties in the data stay exact;
    # the other mantissas check that numpy and XLA still agree when they are not.
    mantissa = rng.choice([1.0, 0.75, 1.37], size=pshape)
    step = (mantissa * 2.0 ** rng.integers(-3, 3, size=pshape)).astype(np.float32)
    return step, pshape


@given(**lsq_cases, grad_scale=st.sampled_from([None, 0.25]))
def test_lsq_forward_and_gradients_match_esser(seed, shape, bits, signed, per_channel, grad_scale):
    rng = _rng(seed)
    q_n, q_p = _levels(bits, signed)
    step, _ = _lsq_params(rng, shape, per_channel)
    x = _grid_values(rng, shape, -q_n, q_p) * step

    def fn(x, s):
        return lsq(x, s, bits=bits, signed=signed, grad_scale=grad_scale)

    out, ct, (dx, ds) = _vjp(fn, jnp.asarray(x), jnp.asarray(step))

    g = grad_scale if grad_scale is not None else 1 / np.sqrt(x.size * q_p)
    q, ref_dx, ref_ds, _ = _lsq_reference(x, step, np.float32(0), bits, signed, np.asarray(ct), g)
    np.testing.assert_array_equal(out, q)
    np.testing.assert_array_equal(dx, ref_dx)
    assert ds.shape == step.shape
    np.testing.assert_allclose(ds, ref_ds, rtol=1e-5, atol=1e-5 * g * np.abs(ct).sum() * q_p)


@given(**lsq_cases)
def test_lsq_plus_offset_gradient_matches_bhalgat(seed, shape, bits, signed, per_channel):
    rng = _rng(seed)
    q_n, q_p = _levels(bits, signed)
    step, pshape = _lsq_params(rng, shape, per_channel)
    beta = (rng.integers(-4, 5, size=pshape) * 0.25).astype(np.float32)
    x = _grid_values(rng, shape, -q_n, q_p) * step + beta

    def fn(x, s, b):
        return lsq(x, s, bits=bits, signed=signed, offset=b)

    out, ct, (dx, ds, dbeta) = _vjp(fn, jnp.asarray(x), jnp.asarray(step), jnp.asarray(beta))

    g = 1 / np.sqrt(x.size * q_p)
    q, ref_dx, ref_ds, ref_dbeta = _lsq_reference(x, step, beta, bits, signed, np.asarray(ct), g)
    np.testing.assert_array_equal(out, q)
    np.testing.assert_array_equal(dx, ref_dx)
    tol = 1e-5 * g * np.abs(ct).sum() * q_p
    np.testing.assert_allclose(ds, ref_ds, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_boundaries_and_ties(signed):
    bits = 3
    q_n, q_p = _levels(bits, signed)
    x = jnp.asarray([-q_n, q_p, 0.5, 1.5, 2.5, 0.0], jnp.float32)
    out = lsq(x, 1.0, bits=bits, signed=signed, grad_scale=1.0)
    np.testing.assert_array_equal(out[2:5], [0.0, 2.0, 2.0])  # round half to even
    dx, ds = jax.jacrev(lambda x, s: lsq(x, s, bits=bits, signed=signed, grad_scale=1.0), argnums=(0, 1))(
        x, jnp.float32(1.0)
    )
    # The clip values themselves are clipped (Esser eq. 3): no x-gradient, ±Q as step-gradient.
    assert dx[0, 0] == 0 and dx[1, 1] == 0
    assert ds[0] == -q_n and ds[1] == q_p
    np.testing.assert_array_equal(ds[2:5], [-0.5, 0.5, -0.5])


@given(seed=seeds, shape=shapes, bits=st.sampled_from(BITS), signed=st.booleans())
def test_lsq_init_step(seed, shape, bits, signed):
    x = _rng(seed).normal(size=shape).astype(np.float32)
    q_p = _levels(bits, signed)[1]
    np.testing.assert_allclose(
        lsq_init_step(jnp.asarray(x), bits, signed), 2 * np.abs(x).mean() / np.sqrt(q_p), rtol=1e-6
    )


# ----------------------------------------------------------------------------- PACT


@given(
    seed=seeds,
    shape=shapes,
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    per_channel=st.booleans(),
)
def test_pact_forward_and_alpha_gradient(seed, shape, bits, signed, per_channel):
    rng = _rng(seed)
    ashape = (shape[-1],) if per_channel else ()
    alpha = rng.uniform(0.5, 4.0, size=ashape).astype(np.float32)
    x = (alpha * rng.uniform(-1.5, 1.5, size=shape)).astype(np.float32)
    special = rng.random(shape)  # land exactly on the clip points and on 0
    x = np.where(special < 0.1, alpha, np.where(special < 0.2, -alpha, np.where(special < 0.3, 0, x)))
    x = x.astype(np.float32)
    out, ct, (dx, dalpha) = _vjp(lambda x, a: pact(x, a, bits=bits, signed=signed), jnp.asarray(x), jnp.asarray(alpha))

    n = np.float32(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    y = np.clip(x, -alpha if signed else np.float32(0), alpha)
    # XLA turns "/ n" into "* (1/n)", so the level values may differ from numpy by an ulp.
    np.testing.assert_allclose(out, np.round(y * n / alpha) * alpha / n, rtol=1e-6, atol=0)
    ct = np.asarray(ct)
    inside = (x > -alpha if signed else x >= 0) & (x < alpha)
    np.testing.assert_array_equal(dx, np.where(inside, ct, np.float32(0)))
    ref_dalpha = np.where(x >= alpha, ct, np.float32(0))
    if signed:
        ref_dalpha = ref_dalpha - np.where(x <= -alpha, ct, np.float32(0))
    assert dalpha.shape == alpha.shape
    np.testing.assert_allclose(dalpha, _sum_to_shape(ref_dalpha, ashape), rtol=1e-5, atol=1e-5 * np.abs(ct).sum())


# ----------------------------------------------------------------------------- SAWB


@given(seed=seeds, shape=shapes, bits=st.sampled_from(sorted(SAWB_COEFFICIENTS)))
def test_sawb_clip_and_quantize(seed, shape, bits):
    rng = _rng(seed)
    w = (rng.standard_t(df=4, size=shape) * rng.uniform(0.01, 1.0)).astype(np.float32)
    c1, c2 = SAWB_COEFFICIENTS[bits]
    alpha = np.float32(c1) * np.sqrt(np.mean(w * w)) + np.float32(c2) * np.mean(np.abs(w))
    scale = abs(c1) * np.sqrt(np.mean(w * w)) + abs(c2) * np.mean(np.abs(w))  # c1·rms and c2·mean cancel
    np.testing.assert_allclose(sawb_clip(jnp.asarray(w), bits), alpha, rtol=0, atol=1e-6 * scale)

    out, ct, (dw,) = _vjp(lambda w: sawb_quantize(w, bits), jnp.asarray(w))
    a = np.float32(sawb_clip(jnp.asarray(w), bits))  # reuse JAX's α: the sums differ in the last ulp
    a = a if a > 0 else np.abs(w).max()
    n = np.float32(2**bits - 1)
    k = np.round((np.clip(w, -a, a) / a + np.float32(1)) * (n / np.float32(2)))
    q = (np.float32(2) * k - n) * (a / n)
    np.testing.assert_allclose(out, q, rtol=1e-6, atol=1e-6 * a)
    assert len(np.unique(np.asarray(out))) <= 2**bits
    np.testing.assert_array_equal(dw, np.where(np.abs(w) <= a, ct, np.float32(0)))


def test_sawb_quantize_two_bit_levels_and_degenerate_alpha():
    w = jnp.asarray(np.random.default_rng(0).normal(size=256), jnp.float32)
    a = float(sawb_clip(w, 2))
    np.testing.assert_allclose(np.unique(np.asarray(sawb_quantize(w, 2))), [-a, -a / 3, a / 3, a], rtol=1e-6)
    # For 8 bits c1 + c2 < 0, so ±1 weights give α < 0; the quantizer falls back to max|w|.
    pm1 = jnp.asarray([1.0, -1.0, 1.0, -1.0], jnp.float32)
    assert float(sawb_clip(pm1, 8)) < 0
    np.testing.assert_array_equal(sawb_quantize(pm1, 8), pm1)
    np.testing.assert_array_equal(sawb_quantize(jnp.zeros(4, jnp.float32), 4), np.zeros(4))


# ----------------------------------------------------------------------------- ternary / binary


def _keep_axis_reduce(ndim, axis):
    return tuple(range(ndim)) if axis is None else tuple(i for i in range(ndim) if i != axis % ndim)


@given(seed=seeds, shape=shapes, axis=st.sampled_from([None, -1, 0]))
def test_ternary_weight_matches_twn(seed, shape, axis):
    w = _rng(seed).normal(size=shape).astype(np.float32)
    out, ct, (dw,) = _vjp(lambda w: ternary_weight(w, axis=axis), jnp.asarray(w))
    axes = _keep_axis_reduce(w.ndim, axis)
    delta = np.float32(0.7) * np.abs(w).mean(axis=axes, keepdims=True)
    keep = np.abs(w) > delta
    alpha = np.where(keep, np.abs(w), 0).sum(axis=axes, keepdims=True) / np.maximum(
        keep.sum(axis=axes, keepdims=True), 1
    )
    np.testing.assert_allclose(out, np.where(keep, alpha * np.sign(w), 0), rtol=1e-6)
    np.testing.assert_array_equal(dw, ct)


@given(seed=seeds, shape=shapes, axis=st.sampled_from([None, -1, 0]), clip=st.booleans())
def test_binary_weight_matches_xnor(seed, shape, axis, clip):
    w = (_rng(seed).normal(size=shape) * 1.5).astype(np.float32)
    w.reshape(-1)[0] = 0.0  # sign(0) must be +1
    out, ct, (dw,) = _vjp(lambda w: binary_weight(w, axis=axis, clip=clip), jnp.asarray(w))
    alpha = np.abs(w).mean(axis=_keep_axis_reduce(w.ndim, axis), keepdims=True)
    np.testing.assert_allclose(out, np.where(w >= 0, alpha, -alpha), rtol=1e-6)
    np.testing.assert_array_equal(dw, np.where(np.abs(w) <= 1, ct, 0) if clip else ct)


def test_ternary_all_zero_channel_is_zero_not_nan():
    w = jnp.asarray([[0.0, 2.0], [0.0, -2.0]], jnp.float32)
    np.testing.assert_array_equal(ternary_weight(w, axis=-1), [[0.0, 2.0], [0.0, -2.0]])


# ----------------------------------------------------------------------------- jit, vmap, dtypes

# name -> (rule, values of its learned parameters, passed as float32 after x).
RULES = {
    "ste": (lambda x: ste(x, _quarter_grid), ()),
    "clipped_ste": (lambda x: clipped_ste(x, _quarter_grid, -1.0, 1.0), ()),
    "lsq": (lambda x, s: lsq(x, s, bits=4), (0.25,)),
    "lsq_plus": (lambda x, s, b: lsq(x, s, bits=4, signed=False, offset=b), (0.25, -0.5)),
    "pact": (lambda x, a: pact(x, a, bits=3), (1.0,)),
    "pact_signed": (lambda x, a: pact(x, a, bits=3, signed=True), (1.0,)),
    "sawb": (lambda x: sawb_quantize(x, 4), ()),
    "ternary": (lambda x: ternary_weight(x, axis=-1), ()),
    "binary": (lambda x: binary_weight(x, clip=True), ()),
}


def _rule_inputs(name, dtype=jnp.float32, batch=()):
    rng = _rng(sum(map(ord, name)))
    x = jnp.asarray(rng.normal(size=(*batch, 4, 6)) * 1.5, jnp.float32).astype(dtype)
    return x, tuple(jnp.asarray(p, jnp.float32) for p in RULES[name][1])


@pytest.mark.parametrize("name", RULES)
def test_grad_and_jit_grad_agree(name):
    fn, _ = RULES[name]
    x, params = _rule_inputs(name)
    c = jnp.asarray(_rng(1).normal(size=x.shape), jnp.float32)

    def loss(*args):
        return jnp.sum(fn(*args) * c)

    argnums = tuple(range(1 + len(params)))
    eager = jax.grad(loss, argnums)(x, *params)
    jitted = jax.jit(jax.grad(loss, argnums))(x, *params)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Not bit for bit: SAWB's scale is a reduction, which XLA may compute in another order
    # op by op than fused (seen at LLVM -O0: 1 ulp).
    np.testing.assert_allclose(jax.jit(fn)(x, *params), fn(x, *params), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", RULES)
def test_vmap_matches_per_example_calls(name):
    fn, _ = RULES[name]
    xs, params = _rule_inputs(name, batch=(3,))
    batched = jax.vmap(lambda x: fn(x, *params))(xs)
    for i in range(xs.shape[0]):  # batched reductions may sum in another order
        np.testing.assert_allclose(batched[i], fn(xs[i], *params), rtol=1e-6, atol=1e-6)
    per_example = jax.vmap(jax.grad(lambda x: jnp.sum(fn(x, *params))))(xs)
    for i in range(xs.shape[0]):
        np.testing.assert_array_equal(per_example[i], jax.grad(lambda x: jnp.sum(fn(x, *params)))(xs[i]))
    if params:  # a shared parameter's gradient through vmap is the sum over examples
        argnums = tuple(range(len(params)))
        shared = jax.grad(lambda *p: jnp.sum(jax.vmap(lambda x: fn(x, *p))(xs)), argnums)(*params)
        summed = [jax.grad(lambda *p, x=x: jnp.sum(fn(x, *p)), argnums)(*params) for x in xs]
        np.testing.assert_allclose(shared, np.sum(summed, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", RULES)
def test_half_precision_input_keeps_dtype(name, dtype):
    fn, _ = RULES[name]
    x, params = _rule_inputs(name, dtype)
    out, pullback = jax.vjp(fn, x, *params)
    assert out.dtype == dtype
    grads = pullback(jnp.ones_like(out))
    assert grads[0].dtype == dtype
    assert all(g.dtype == jnp.float32 for g in grads[1:])
    # Same result as quantizing the exactly upcast input in float32, then casting back.
    np.testing.assert_array_equal(out, fn(x.astype(jnp.float32), *params).astype(dtype))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("step", [0.0, -0.5, np.float32(0.0), np.array([0.5, 0.0])])
def test_lsq_rejects_non_positive_step(step):
    with pytest.raises(ValueError, match="step"):
        lsq(jnp.ones((3, 2), jnp.float32), step, bits=4)


@pytest.mark.parametrize("bits", [0, 1, 17, 2.5, True])
def test_bits_outside_2_to_16_rejected(bits):
    x = jnp.ones(3, jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        lsq(x, 0.5, bits=bits)
    with pytest.raises(ValueError, match="bits"):
        lsq_init_step(x, bits)
    with pytest.raises(ValueError, match="bits"):
        pact(x, 1.0, bits=bits)


@pytest.mark.parametrize("bits", [1, 6, 7, 16])
def test_sawb_unsupported_bits_lists_supported(bits):
    w = jnp.ones(3, jnp.float32)
    for fn in (sawb_clip, sawb_quantize):
        with pytest.raises(ValueError, match=r"\[2, 3, 4, 5, 8\]"):
            fn(w, bits)


def test_other_bad_inputs():
    x = jnp.ones((3, 2), jnp.float32)
    with pytest.raises(ValueError, match="alpha"):
        pact(x, 0.0, bits=4)
    with pytest.raises(ValueError, match="grad_scale"):
        lsq(x, 0.5, bits=4, grad_scale=0.0)
    with pytest.raises(ValueError, match="broadcast"):
        lsq(x, jnp.ones(3, jnp.float32), bits=4)
    with pytest.raises(ValueError, match="broadcast"):
        pact(x, jnp.ones((2, 3, 2), jnp.float32), bits=4)
    with pytest.raises(ValueError, match="lo < hi"):
        clipped_ste(x, _quarter_grid, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        ste(x, lambda y: y[0])
    with pytest.raises(ValueError, match="axis"):
        binary_weight(x, axis=2)
    with pytest.raises(TypeError, match="floating"):
        ternary_weight(jnp.ones(3, jnp.int32))
