"""quantized_dot_general: identity equivalence, hand-written fwd/bwd, gradient quantizers, GradScale, TPR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lowbit import formats, quant
from lowbit.training import DotQuantConfig, gradscale_update, quantized_dot_general

DN_MATMUL = (((1,), (0,)), ((), ()))
DN_QK = (((3,), (3,)), ((0, 1), (0, 1)))  # bhqd,bhkd->bhqk
DN_AV = (((3,), (2,)), ((0, 1), (0, 1)))  # bhqk,bhkd->bhqd

CASES = [
    (DN_MATMUL, (6, 8), (8, 5)),
    (DN_QK, (2, 3, 4, 8), (2, 3, 5, 8)),
    (DN_AV, (2, 3, 4, 5), (2, 3, 5, 8)),
]


def _operands(shape_l, shape_r, seed=0):
    kl, kr = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kl, shape_l, jnp.float32), jax.random.normal(kr, shape_r, jnp.float32)


def _loss(f):
    # A fixed random projection makes the cotangent non-trivial.
    def loss(lhs, rhs):
        out = f(lhs, rhs)
        w = jax.random.normal(jax.random.key(42), out.shape, out.dtype)
        return jnp.sum(out * w)

    return loss


@pytest.mark.parametrize("dn,shape_l,shape_r", CASES)
def test_identity_config_equals_dot_general(dn, shape_l, shape_r):
    lhs, rhs = _operands(shape_l, shape_r)
    cfg = DotQuantConfig()
    ours = lambda a, b: quantized_dot_general(a, b, dn, cfg)
    ref = lambda a, b: lax.dot_general(a, b, dn)
    np.testing.assert_array_equal(ours(lhs, rhs), ref(lhs, rhs))
    g_ours = jax.grad(_loss(ours), argnums=(0, 1))(lhs, rhs)
    g_ref = jax.grad(_loss(ref), argnums=(0, 1))(lhs, rhs)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dn,shape_l,shape_r", CASES)
def test_quantized_matches_hand_written_forward_and_backward(dn, shape_l, shape_r):
    lhs, rhs = _operands(shape_l, shape_r, seed=1)
    fwd = quant.Quantizer(format="int8")
    grad = quant.Quantizer(format="float8_e5m2")
    cfg = DotQuantConfig(lhs=fwd, rhs=fwd, dlhs_grad=grad, drhs_grad=grad)
    f = lambda a, b: quantized_dot_general(a, b, dn, cfg)

    lq, rq = quant.fake_quant(fwd, lhs), quant.fake_quant(fwd, rhs)
    out_ref = lax.dot_general(lq, rq, dn)
    np.testing.assert_allclose(f(lhs, rhs), out_ref, rtol=1e-6, atol=1e-6)

    g = jax.random.normal(jax.random.key(42), out_ref.shape, jnp.float32)
    gq = quant.fake_quant(grad, g)
    _, vjp_l = jax.vjp(lambda a: lax.dot_general(a, rq, dn), lq)
    _, vjp_r = jax.vjp(lambda b: lax.dot_general(lq, b, dn), rq)
    dl_ref, dr_ref = vjp_l(gq)[0], vjp_r(gq)[0]
    dl, dr = jax.grad(_loss(f), argnums=(0, 1))(lhs, rhs)
    np.testing.assert_allclose(dl, dl_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dr, dr_ref, rtol=1e-5, atol=1e-5)
    # jit(grad) agrees with grad.
    dl_j, dr_j = jax.jit(jax.grad(_loss(f), argnums=(0, 1)))(lhs, rhs)
    np.testing.assert_allclose(dl_j, dl, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dr_j, dr, rtol=1e-6, atol=1e-6)


def test_gradient_quantizer_touches_the_gradient():
    # With rhs = I, dlhs = Q(g) exactly: every entry must lie on the scaled e5m2 grid.
    grad = quant.Quantizer(format="float8_e5m2", scale=quant.Fixed(step=1.0))
    cfg = DotQuantConfig(dlhs_grad=grad, drhs_grad=grad)
    lhs, eye = jnp.ones((4, 16), jnp.float32), jnp.eye(16, dtype=jnp.float32)
    g = jax.random.normal(jax.random.key(3), (4, 16), jnp.float32) * 0.37
    _, vjp = jax.vjp(lambda a: quantized_dot_general(a, eye, DN_MATMUL, cfg), lhs)
    (dl,) = vjp(g)
    grid = set(formats.values("float8_e5m2").tolist())
    assert all(v in grid for v in np.asarray(dl).ravel().tolist())
    assert not np.array_equal(np.asarray(dl), np.asarray(g))


def test_stochastic_gradient_is_unbiased_over_keys():
    grad = quant.Quantizer(format="int4", rounding="stochastic")
    cfg = DotQuantConfig(dlhs_grad=grad, drhs_grad=grad)
    lhs, rhs = _operands((3, 8), (8, 4), seed=5)
    g = jax.random.normal(jax.random.key(9), (3, 4), jnp.float32)

    def dlhs(key):
        _, vjp = jax.vjp(lambda a: quantized_dot_general(a, rhs, DN_MATMUL, cfg, key=key), lhs)
        return vjp(g)[0]

    keys = jax.random.split(jax.random.key(0), 4000)
    mean = jnp.mean(jax.jit(jax.vmap(dlhs))(keys), axis=0)
    exact = g @ rhs.T
    np.testing.assert_allclose(mean, exact, atol=0.08)
    assert not np.allclose(dlhs(keys[0]), dlhs(keys[1]))  # the key really drives the rounding


def test_preferred_element_type_sets_result_dtype():
    lhs, rhs = _operands((4, 8), (8, 2))
    cfg = DotQuantConfig(lhs=quant.Quantizer(format="float8_e4m3fn"), rhs=quant.Quantizer(format="float8_e4m3fn"))
    out = quantized_dot_general(
        lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), DN_MATMUL, cfg, preferred_element_type=jnp.float32
    )
    assert out.dtype == jnp.float32
    out16 = quantized_dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), DN_MATMUL, cfg)
    assert out16.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "gmax,scale,expected",
    [
        (1.0, 1.0, 2.0),
        (32.0, 1.0, 2.0),
        (33.0, 1.0, 1.0),
        (64.0, 1.0, 1.0),
        (65.0, 1.0, 0.5),
        (0.0, 4.0, 8.0),
        (1e3, 1.0, 0.5),
        (jnp.inf, 2.0, 2.0),
    ],
)
def test_gradscale_rule(gmax, scale, expected):
    # fp4_radix4's max is 64: keep in (32, 64], double at or below 32, halve above 64.
    new = gradscale_update(jnp.float32(scale), jnp.float32(gmax), 64.0)
    assert float(new) == expected


def _r4_config():
    r4 = quant.Quantizer(format="fp4_radix4", scale=quant.Learned())
    return DotQuantConfig(dlhs_grad=r4, drhs_grad=r4, grad_scale=True, tpr=True)


def test_gradscale_state_leaves_as_the_cotangent():
    cfg = _r4_config()
    lhs, rhs = _operands((4, 8), (8, 3))
    g = jnp.full((4, 3), 0.01, jnp.float32)
    _, vjp = jax.vjp(
        lambda a, b, s: quantized_dot_general(a, b, DN_MATMUL, cfg, grad_scale=s), lhs, rhs, jnp.float32(1.0)
    )
    _, _, new_scale = vjp(g)
    assert float(new_scale) == 2.0  # max|g s| = 0.01 <= 32: doubled


def test_two_phase_rounding_uses_even_and_odd_grids():
    cfg = _r4_config()
    n = 64
    eye = jnp.eye(n, dtype=jnp.float32)
    g = jax.random.normal(jax.random.key(11), (n, n), jnp.float32) * 10
    s = jnp.float32(1.0)  # max|g| ~ 40 keeps s at 1 (in (32, 64]) for this draw
    _, vjp = jax.vjp(lambda a, b: quantized_dot_general(a, b, DN_MATMUL, cfg, grad_scale=s), eye, eye)
    dl, dr = vjp(g)
    new_s = float(gradscale_update(s, jnp.max(jnp.abs(g)), 64.0))
    even = {0.0} | {4.0**k / new_s for k in range(-3, 4)}
    odd = {0.0} | {2 * 4.0**k / new_s for k in range(-3, 4)}
    assert set(np.abs(np.asarray(dl)).ravel().tolist()) <= even
    assert set(np.abs(np.asarray(dr)).ravel().tolist()) <= odd
    # TPR's point: averaging the two phases cancels part of the rounding error.
    err = lambda q: float(jnp.mean(jnp.abs(q - g)))
    assert err((dl + dr) / 2) < min(err(dl), err(dr))


def test_bad_input_errors():
    lhs, rhs = _operands((4, 8), (7, 3))
    with pytest.raises(ValueError, match="does not match"):
        quantized_dot_general(lhs, rhs, DN_MATMUL, DotQuantConfig())
    with pytest.raises(ValueError, match="out of range"):
        quantized_dot_general(lhs, rhs, (((2,), (0,)), ((), ())), DotQuantConfig())
    with pytest.raises(ValueError, match="dimension_numbers"):
        quantized_dot_general(lhs, rhs, ((1,), (0,)), DotQuantConfig())
    with pytest.raises(ValueError, match="grad_scale"):
        DotQuantConfig(tpr=True)
    sr = quant.Quantizer(format="int8", rounding="stochastic")
    ok_lhs, ok_rhs = _operands((4, 8), (8, 3))
    with pytest.raises(ValueError, match="key"):
        quantized_dot_general(ok_lhs, ok_rhs, DN_MATMUL, DotQuantConfig(lhs=sr))


@pytest.mark.parametrize(
    "fmt,granularity",
    [("int8", quant.Tensor()), ("int8", quant.Channel()), ("int4", quant.Channel()), ("float8_e4m3fn", quant.Tensor())],
)
@pytest.mark.parametrize("dn,shape_l,shape_r", CASES[:2])
def test_real_matmul_matches_fake(fmt, granularity, dn, shape_l, shape_r):
    lhs, rhs = _operands(shape_l, shape_r, seed=7)
    lq = quant.Quantizer(format=fmt)
    # per output channel: the rhs's last (free) axis
    rq = quant.Quantizer(format=fmt, granularity=granularity) if dn == DN_MATMUL else lq
    grad = quant.Quantizer(format="float8_e5m2")
    fake = DotQuantConfig(lhs=lq, rhs=rq, dlhs_grad=grad, drhs_grad=grad, matmul="fake")
    real = DotQuantConfig(lhs=lq, rhs=rq, dlhs_grad=grad, drhs_grad=grad, matmul="real")
    f = lambda c: lambda a, b: quantized_dot_general(a, b, dn, c)
    np.testing.assert_allclose(f(real)(lhs, rhs), f(fake)(lhs, rhs), rtol=1e-5, atol=1e-5)
    g_real = jax.grad(_loss(f(real)), argnums=(0, 1))(lhs, rhs)
    g_fake = jax.grad(_loss(f(fake)), argnums=(0, 1))(lhs, rhs)
    for a, b in zip(g_real, g_fake):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_real_matmul_really_feeds_narrow_operands():
    lhs, rhs = _operands((8, 16), (16, 4))
    cfg8 = DotQuantConfig(lhs=quant.Quantizer(format="int8"), rhs=quant.Quantizer(format="int8"), matmul="real")
    jaxpr = str(jax.make_jaxpr(lambda a, b: quantized_dot_general(a, b, DN_MATMUL, cfg8))(lhs, rhs))
    assert "dot_general" in jaxpr and "i8[8,16]" in jaxpr and "preferred_element_type=int32" in jaxpr
    fp8 = quant.Quantizer(format="float8_e4m3fn")
    cfg_f8 = DotQuantConfig(lhs=fp8, rhs=fp8, matmul="real")
    lowered = jax.jit(lambda a, b: quantized_dot_general(a, b, DN_MATMUL, cfg_f8)).lower(lhs, rhs).as_text()
    dots = [ln for ln in lowered.splitlines() if "dot_general" in ln]
    assert dots and all("f8E4M3FN" in ln for ln in dots), dots


def test_auto_matmul_rule():
    from lowbit.training.qdot import uses_real_matmul

    i8, f8 = quant.Quantizer(format="int8"), quant.Quantizer(format="float8_e4m3fn")
    assert uses_real_matmul(DotQuantConfig(lhs=i8, rhs=i8))
    assert uses_real_matmul(DotQuantConfig(lhs=f8, rhs=f8)) == (jax.default_backend() != "cpu")
    assert not uses_real_matmul(DotQuantConfig(lhs=i8, rhs=i8, matmul="fake"))
    assert not uses_real_matmul(DotQuantConfig())
    with pytest.raises(ValueError, match="matmul='real'"):
        DotQuantConfig(lhs=quant.Quantizer(format="float6_e2m3fn"), rhs=i8, matmul="real")
