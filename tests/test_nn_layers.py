"""lowbit.nn explicit layers: float equivalence, drop-ins for Flax, learned state; every recipe trains a step."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPRESENTATIVE_RECIPES
from flax import linen, nnx
from jax import lax

import lowbit
from lowbit import quant, recipes
from lowbit.nn import OverwriteWithGradient, QConv, QDotGeneral, QEinsum, QEinsumOp, QLinear, einsum_dimension_numbers
from lowbit.recipes import Rule
from lowbit.training import DotQuantConfig

INT8 = DotQuantConfig(lhs=quant.Quantizer(format="int8"), rhs=quant.Quantizer(format="int8"))


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_qlinear_fp32_equals_float_linear():
    layer = QLinear(8, 5, rule=Rule(), rngs=nnx.Rngs(0))
    x = _x((3, 4, 8))
    ref = x @ layer.kernel[...] + layer.bias[...]
    np.testing.assert_allclose(layer(x), ref, rtol=1e-6, atol=1e-6)


def test_qeinsum_fp32_equals_einsum():
    layer = QEinsum("bhqd,bhkd->bhqk", rule=Rule(), rngs=nnx.Rngs(0))
    a, b = _x((2, 3, 4, 8)), _x((2, 3, 5, 8), 1)
    np.testing.assert_allclose(layer(a, b), jnp.einsum("bhqd,bhkd->bhqk", a, b), rtol=1e-6, atol=1e-6)


def test_qconv_fp32_equals_conv():
    layer = QConv(3, 4, (3, 3), (1, 1), "SAME", rule=Rule(), rngs=nnx.Rngs(0))
    x = _x((2, 6, 6, 3))
    ref = lax.conv_general_dilated(x, layer.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer(x), ref + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_drop_in_nnx_linear_and_linen_dense():
    x = _x((4, 8))
    lin = nnx.Linear(8, 3, dot_general=QDotGeneral(INT8), rngs=nnx.Rngs(0))
    fq = lambda v: quant.fake_quant(quant.Quantizer(format="int8"), v)
    expected = fq(x) @ fq(lin.kernel[...]) + lin.bias[...]
    np.testing.assert_allclose(lin(x), expected, rtol=1e-6, atol=1e-6)

    dense = linen.Dense(3, dot_general=QDotGeneral(INT8))
    params = dense.init(jax.random.key(0), x)
    kernel = params["params"]["kernel"]
    np.testing.assert_allclose(
        dense.apply(params, x), fq(x) @ fq(kernel) + params["params"]["bias"], rtol=1e-6, atol=1e-6
    )
    # and gradients flow through it
    g = jax.grad(lambda p: jnp.sum(dense.apply(p, x) ** 2))(params)
    assert np.all(np.isfinite(g["params"]["kernel"]))


def test_drop_in_nnx_einsum():
    layer = nnx.Einsum("bd,df->bf", (8, 3), einsum_op=QEinsumOp(INT8), rngs=nnx.Rngs(0))
    x = _x((4, 8))
    fq = lambda v: quant.fake_quant(quant.Quantizer(format="int8"), v)
    np.testing.assert_allclose(layer(x), fq(x) @ fq(layer.kernel[...]), rtol=1e-6, atol=1e-6)


def test_stateless_drop_in_refuses_stateful_configs():
    sr = DotQuantConfig(lhs=quant.Quantizer(format="int8", rounding="stochastic"))
    with pytest.raises(ValueError, match="stateless"):
        QDotGeneral(sr)


@pytest.mark.parametrize(
    "spec,dn,perm",
    [
        ("bhqd,bhkd->bhqk", (((3,), (3,)), ((0, 1), (0, 1))), None),
        ("bhqk,bhkd->bhqd", (((3,), (2,)), ((0, 1), (0, 1))), None),
        ("ij,jk->ki", (((1,), (0,)), ((), ())), (1, 0)),
    ],
)
def test_einsum_dimension_numbers(spec, dn, perm):
    assert einsum_dimension_numbers(spec) == (dn, perm)


@pytest.mark.parametrize("spec", ["ij,jk", "ij,jk,kl->il", "ii,ij->j", "ij,kl->iz", "ij,jk->k"])
def test_einsum_spec_errors(spec):
    with pytest.raises(ValueError, match="einsum spec"):
        einsum_dimension_numbers(spec)


class _Tiny(nnx.Module):
    """A stock model with two linears around an attention-style product: every state kind appears."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.mid = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", h, h), axis=-1)
        h = jnp.einsum("bts,bsd->btd", a, h)
        h = jax.nn.gelu(self.mid(h))
        return self.out(h).mean(axis=1)


def _step(model, x, y):
    """One SGD step on Params; OverwriteWithGradient state replaced by its gradient."""
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, OverwriteWithGradient))

    def loss_fn(m):
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
    params = nnx.state(model, nnx.Param)
    new = jax.tree.map(lambda p, g: p - 0.05 * g, params, nnx.state(grads, nnx.Param))
    nnx.update(model, new, nnx.state(grads, OverwriteWithGradient))
    return loss, grads


@pytest.mark.parametrize("name", REPRESENTATIVE_RECIPES)
def test_every_recipe_trains_a_step(name):
    x, y = _x((4, 6, 8)), jnp.array([0, 1, 2, 3])
    model = lowbit.quantize(_Tiny(nnx.Rngs(0)), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recipes with rules this model does not use
        lowbit.describe(model, x)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    loss, grads = _step(model, x, y)
    assert np.isfinite(float(loss))
    after = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(after)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), leaves))
    # learned quantizer parameters receive gradients
    state = getattr(model.mid, "lowbit_dot_general0", None)
    for attr in ("act_alpha", "act_step", "weight_step"):
        if hasattr(state, attr):
            gval = getattr(grads.mid.lowbit_dot_general0, attr)[...]
            assert float(jnp.abs(gval)) > 0, f"{name}: no gradient reached {attr}"
    # GradScale state was overwritten by the backward pass
    if hasattr(state, "grad_scale"):
        assert float(state.grad_scale[...]) != 1.0


def test_lsq_layer_real_int8_path_matches_fake():
    x = _x((4, 6, 8))
    lsq = recipes.get("int8_lsq").rules[-1]
    fake = QLinear(8, 5, rule=lsq.with_matmul("fake"), rngs=nnx.Rngs(0))
    real = QLinear(8, 5, rule=lsq.with_matmul("real"), rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda v: real(v))(x))
    assert "preferred_element_type=int32" in jaxpr  # the int8 dot really runs
    np.testing.assert_allclose(real(x), fake(x), rtol=1e-5, atol=1e-5)

    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    g_real, g_fake = grads(real), grads(fake)
    np.testing.assert_allclose(g_real.kernel[...], g_fake.kernel[...], rtol=1e-4, atol=1e-5)
    for name in ("act_step", "weight_step"):
        np.testing.assert_allclose(
            getattr(g_real.quant, name)[...], getattr(g_fake.quant, name)[...], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("mode", ["fake", "real", "auto"])
def test_with_matmul_builds_every_recipe(mode):
    for name in recipes.names():
        r = recipes.get(name).with_matmul(mode)
        assert {rule.dot.matmul for rule in r.rules} <= ({mode} if mode != "real" else {"fake", "real"})
    with pytest.raises(ValueError, match="matmul"):
        recipes.get("fp8").with_matmul("fast")
