"""Accumulator emulation and the random Hadamard transform inside ``quantized_dot_general``; the block recipes.

References are built by hand as in ``test_gemm_axes``: each operand quantized
along the product's contraction with ``lowbit.formats.quantize``, rotated with
``lowbit.training.rht`` and summed with ``accumulated_dot_general`` where the
config asks for it, so the comparisons are bit for bit.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax._src.cudnn import scaled_matmul_stablehlo as jax_mx
from test_gemm_axes import (
    DN_LINEAR,
    NV,
    _along,
    _assert_equal,
    _by,
    _config,
    _normal,
    _ours,
    _reference,
)

import lowbit
from lowbit import formats, quant, recipes
from lowbit.recipes.rules import OpInfo
from lowbit.training import (
    Accumulator,
    DotQuantConfig,
    accumulated_dot_general,
    quantized_dot_general,
    rht,
)
from lowbit.training.hadamard import RHT
from lowbit.training.qdot import N_KEYS, quantized_conv, uses_block_kernel

# bfloat16 partial sums of 4-element chunks, promoted to float32 every 16 elements of K.
ACC = Accumulator(fmt=jnp.bfloat16, chunk=4, promote_every=16)
CONV = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _qdot(dn, config, key=None):
    return lambda a, b: quantized_dot_general(a, b, dn, config, key=key)


def _plain(dn):
    return lambda a, b: lax.dot_general(a, b, dn)


def _ints(seed, shape):
    """Small integers: every float32 or bfloat16 sum of a few of their products is exact."""
    return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32))


# ----- accumulator ------------------------------------------------------------------------------
def test_accumulator_runs_every_product_of_a_linear():
    """Forward, dlhs = Q(g) Q(W)^T over N and dW = Q(x)^T Q(g) over M, each summed by the accumulator."""
    lhs, rhs, g = _normal(0, (16, 48)), _normal(1, (48, 32)), _normal(2, (16, 32))
    ours = _ours(_qdot(DN_LINEAR, _config(NV, accumulator=ACC)), lhs, rhs, g)

    @jax.jit
    def reference(lhs, rhs, g):
        acc = functools.partial(accumulated_dot_general, acc=ACC)
        return (
            acc(_along(NV, lhs, 1), _along(NV, rhs, 0), DN_LINEAR),
            acc(_along(NV, g, 1), _along(NV, rhs, 1), (((1,), (1,)), ((), ()))),
            acc(_along(NV, lhs, 0), _along(NV, g, 0), (((0,), (0,)), ((), ()))),
        )

    _assert_equal(ours, reference(lhs, rhs, g))
    exact = _ours(_qdot(DN_LINEAR, _config(NV)), lhs, rhs, g)
    for name, a, b in zip(("forward", "dlhs", "drhs"), ours, exact):
        assert not np.array_equal(a, b), f"{name} was summed exactly"


@pytest.mark.parametrize(
    "dn,shapes",
    [
        ((((2,), (0,)), ((), ())), ((2, 8, 16), (16, 12), (2, 8, 12))),  # 'btd,df->btf'
        ((((3,), (3,)), ((0, 1), (0, 1))), ((2, 2, 8, 16), (2, 2, 12, 16), (2, 2, 8, 12))),  # attention scores
        ((((1, 2), (1, 0)), ((), ())), ((4, 3, 8), (8, 3, 5), (4, 5))),  # two contracted dims, paired out of order
    ],
)
def test_accumulated_backward_products_have_the_operands_layouts(dn, shapes):
    """On small integers every sum is exact: the emulated products equal JAX's own VJP bit for bit."""
    lhs, rhs, g = (_ints(i, s) for i, s in enumerate(shapes))
    _assert_equal(_ours(_qdot(dn, DotQuantConfig(accumulator=ACC)), lhs, rhs, g), _ours(_plain(dn), lhs, rhs, g))


def test_accumulator_config_is_checked():
    with pytest.raises(TypeError, match="accumulator='bf16'.*allowed: None or a lowbit.training.Accumulator"):
        DotQuantConfig(accumulator="bf16")
    with pytest.raises(ValueError, match="accumulator=.*allowed: a float Accumulator"):
        DotQuantConfig(accumulator=Accumulator(fmt=16, overflow="wrap"))
    with pytest.raises(ValueError, match="matmul='real' is invalid with an accumulator"):
        DotQuantConfig(
            lhs=quant.Quantizer(format="int8"), rhs=quant.Quantizer(format="int8"), matmul="real", accumulator=ACC
        )
    x, w = _normal(3, (1, 4, 4, 8)), _normal(4, (3, 3, 8, 8))
    with pytest.raises(ValueError, match="accumulator=.*not supported for convolutions"):
        quantized_conv(x, w, DotQuantConfig(accumulator=ACC), **CONV)


# ----- random Hadamard transform ----------------------------------------------------------------
ALL = RHT(products=("fwd", "dlhs", "drhs"))


@pytest.mark.parametrize(
    "dn,shapes",
    [
        (DN_LINEAR, ((32, 48), (48, 16), (32, 16))),
        (DN_LINEAR, ((20, 24), (24, 40), (20, 40))),  # partial last blocks along M, K and N stay unrotated
        ((((2,), (0,)), ((), ())), ((2, 24, 32), (32, 16), (2, 24, 16))),  # dW contracts b x t, flattened
    ],
)
def test_rht_in_float_changes_nothing_but_rounding(dn, shapes):
    lhs, rhs, g = (_normal(10 + i, s) for i, s in enumerate(shapes))
    ours = _ours(_qdot(dn, DotQuantConfig(rht=ALL), key=jax.random.key(5)), lhs, rhs, g)
    for name, a, b in zip(("forward", "dlhs", "drhs"), ours, _ours(_plain(dn), lhs, rhs, g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_rht_of_a_convolution_rotates_its_feature_contractions():
    """fwd and dlhs contract features, which each window offset pairs alone: the rotation cancels."""
    x, w, g = _normal(15, (2, 4, 4, 32)), _normal(16, (3, 3, 32, 16)), _normal(17, (2, 4, 4, 16))
    conv = lambda a, b: lax.conv_general_dilated(a, b, **CONV)
    cfg = DotQuantConfig(rht=RHT(products=("fwd", "dlhs")))
    ours = _ours(lambda a, b: quantized_conv(a, b, cfg, key=jax.random.key(6), **CONV), x, w, g)
    for name, a, b in zip(("forward", "dlhs", "drhs"), ours, _ours(conv, x, w, g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def _rotated(fmt, key, axis):
    """A reference operand: rotated in 16-blocks along ``axis`` with ``key``'s signs, then quantized along it."""
    return lambda x: _along(fmt, rht(x, axis, key), axis)


@pytest.mark.parametrize("products", [("drhs",), ("fwd", "dlhs", "drhs")])
def test_rht_rotates_both_operands_before_their_quantizers(products):
    """Each rotated product uses its own key from the call's split: keys 6, 7, 8 for fwd, dlhs, drhs."""
    lhs, rhs, g = _normal(20, (32, 48)), _normal(21, (48, 64)), _normal(22, (32, 64))
    key = jax.random.key(7)
    keys = dict(zip(("fwd", "dlhs", "drhs"), formats.split_key(key, N_KEYS)[6:]))
    ours = _ours(_qdot(DN_LINEAR, _config(NV, rht=RHT(products=products)), key=key), lhs, rhs, g)

    def by(product, axis):  # an operand of ``product`` quantized along ``axis``, rotated first if it rotates
        return _rotated(NV, keys[product], axis) if product in products else _by(NV, axis)

    ref = _reference(
        _plain(DN_LINEAR),
        lhs,
        rhs,
        g,
        fwd=(by("fwd", 1), by("fwd", 0)),
        dlhs=(by("dlhs", 1), by("dlhs", 1)),
        drhs=(by("drhs", 0), by("drhs", 0)),
    )
    _assert_equal(ours, ref)
    assert not np.array_equal(ours[2], _ours(_qdot(DN_LINEAR, _config(NV)), lhs, rhs, g)[2])


def test_rotated_dgrad_requantizes_a_2d_weight():
    """2-D weight blocks are reused in dgrad, unless dgrad rotates: then it quantizes the rotated weight."""
    lhs, rhs, g = _normal(23, (32, 32)), _normal(24, (32, 32)), _normal(25, (32, 32))
    w2d = quant.Quantizer(format=NV, granularity=quant.Block(shape=(16, 16)))
    nv = quant.Quantizer(format=NV)
    key = jax.random.key(8)
    k_dlhs = formats.split_key(key, N_KEYS)[7]
    cfg = DotQuantConfig(lhs=nv, rhs=w2d, dlhs_grad=nv, drhs_grad=nv, rht=RHT(products=("dlhs",)))
    ours = _ours(_qdot(DN_LINEAR, cfg, key=key), lhs, rhs, g)
    q2d = lambda x: quant.fake_quant(w2d, x)
    ref = _reference(
        _plain(DN_LINEAR),
        lhs,
        rhs,
        g,
        fwd=(_by(NV, 1), q2d),
        dlhs=(_rotated(NV, k_dlhs, 1), lambda x: q2d(rht(x, 1, k_dlhs))),
        drhs=(_by(NV, 0), _by(NV, 0)),
    )
    _assert_equal(ours, ref)


def test_rht_config_is_checked():
    with pytest.raises(ValueError, match=r"RHT.products=\('wgrad',\) is invalid; allowed: .*fwd, dlhs, drhs"):
        RHT(products=("wgrad",))
    with pytest.raises(ValueError, match="RHT.block=24 is invalid"):
        RHT(block=24)
    with pytest.raises(TypeError, match="rht='drhs' is invalid; allowed: None or a"):
        DotQuantConfig(rht="drhs")
    with pytest.raises(ValueError, match="placement='quantizer'; allowed: placement='gemm'"):
        DotQuantConfig(rht=RHT(), placement="quantizer")
    x, w = _normal(26, (1, 4, 4, 16)), _normal(27, (3, 3, 16, 16))
    with pytest.raises(ValueError, match="not supported for convolutions.*allowed there: 'fwd', 'dlhs'"):
        quantized_conv(x, w, DotQuantConfig(rht=RHT()), **CONV)


# ----- recipes ----------------------------------------------------------------------------------
_JAX_MXFP8 = jax_mx.BlockScaleConfig(
    mode="mxfp8",
    block_size=32,
    data_type=jnp.float8_e4m3fn,
    scale_type=jnp.float8_e8m0fnu,
    global_scale=None,
    infer_only=False,
)


@jax.jit
def _jax_mx(x):
    """JAX's MXFP8 quantization of ``x`` along its last axis (as ``jax.nn.scaled_dot_general``), dequantized."""
    q, s = jax_mx.quantize(x, _JAX_MXFP8)
    return q.astype(jnp.float32) * jnp.repeat(s.astype(jnp.float32), 32, axis=-1)


@pytest.mark.filterwarnings("ignore:recipe .* is unused")  # a Linear alone: no attention
def test_mxfp8_linear_forward_operands_equal_jax_mx_quantizer():
    """Identity operands show the quantized x (along K) and W (along K, its rows) of an nnx.Linear under mxfp8."""
    rng = np.random.default_rng(30)
    # 32-blocks along the last axis at scales 2^-20..2^20: each block's exponent matters.
    x, w_t = (
        jnp.asarray(
            (rng.standard_normal((64, 2, 32)) * np.exp2(rng.integers(-20, 21, (64, 2, 1))))
            .reshape(64, 64)
            .astype(np.float32)
        )
        for _ in range(2)
    )
    w = w_t.T  # its blocks run along K, down its columns
    eye = jnp.eye(64, dtype=jnp.float32)  # quantizes to itself
    model = lowbit.quantize(nnx.Linear(64, 64, use_bias=False, rngs=nnx.Rngs(0)), "mxfp8")

    def forward(kernel, inputs):
        model.kernel[...] = kernel
        return model(inputs)

    np.testing.assert_array_equal(forward(eye, x), _jax_mx(x))
    np.testing.assert_array_equal(forward(w, eye), _jax_mx(w.T).T)


def _op(position, count=5, weighted=True, kind="dot_general"):
    return OpInfo(path="m", kind=kind, weighted=weighted, position=position if weighted else None, count=count)


def test_nvfp4_recipe_is_nvidias_pretraining_recipe():
    r = recipes.get("nvfp4")
    first, last, attention, linear, conv = (
        r.rules[r.match(op)].dot
        for op in (_op(0), _op(4), _op(None, weighted=False, kind="einsum"), _op(2), _op(2, kind="conv"))
    )
    bf16 = {q.format.name for q in (last.lhs, last.rhs, last.dlhs_grad, last.drhs_grad)}
    assert bf16 == {"bfloat16"} and attention == last == first  # embedding, head and attention in BF16
    assert r.rules[r.match(_op(3))].dot == r.rules[r.match(_op(1))].dot == linear  # inner layers are NVFP4
    assert linear.lhs == quant.Quantizer(format="nvfp4")
    assert linear.rhs == quant.Quantizer(format="nvfp4", granularity=quant.Block(shape=(16, 16)))
    assert linear.dlhs_grad == linear.drhs_grad == quant.Quantizer(format="nvfp4", rounding="stochastic")
    assert linear.rht == RHT(products=("drhs",), block=16) and linear.placement == "gemm"
    assert conv == dataclasses.replace(linear, rht=None)  # a conv's weight gradient is not rotated


def test_mxfp8_recipe_is_te_mxfp8_block_scaling():
    """E4M3 in 32-blocks with rceil scales, round to nearest, in all three GEMMs of every weighted op, the first
    and last included; attention's products in BF16, as TE's DotProductAttention under MXFP8BlockScaling."""
    r = recipes.get("mxfp8")
    first, last, inner, conv, attention = (
        r.rules[r.match(op)].dot
        for op in (_op(0), _op(4), _op(2), _op(2, kind="conv"), _op(None, weighted=False, kind="einsum"))
    )
    assert first == last == inner == conv and inner.placement == "gemm" and inner.rht is None
    mx = quant.Quantizer(format=formats.with_scale_mode("mxfp8_e4m3", "rceil"))
    assert (inner.lhs, inner.rhs, inner.dlhs_grad, inner.drhs_grad) == (mx, mx, mx, mx)
    assert {q.format.name for q in (attention.lhs, attention.rhs, attention.dlhs_grad, attention.drhs_grad)} == {
        "bfloat16"
    }


def test_mxfp4_recipe_rounds_scales_up_and_rotates_the_weight_gradient():
    r = recipes.get("mxfp4")
    linear, conv, attention = (
        r.rules[r.match(op)].dot for op in (_op(0), _op(0, kind="conv"), _op(None, weighted=False, kind="einsum"))
    )
    assert linear.rht == RHT(products=("drhs",), block=32) and conv.rht is None and attention == conv
    for q in (linear.lhs, linear.rhs, linear.dlhs_grad, linear.drhs_grad):
        assert q.format == formats.with_scale_mode("mxfp4_e2m1", "rceil")
    assert (linear.lhs.rounding, linear.dlhs_grad.rounding, linear.drhs_grad.rounding) == (
        "nearest",
        "stochastic",
        "stochastic",
    )


def test_nvfp4_linear_op_against_hand_built_gemms():
    """x 1x16 along K, W in 16x16 tiles (one copy in fprop and dgrad), SR gradients; dW on RHT'd x and g along M.

    Shapes that are not whole tiles (24 x 40 weight) pad the edge tiles with zeros.
    """
    x, w, g = _normal(40, (32, 24)), _normal(41, (24, 40)), _normal(42, (32, 40))
    key = jax.random.key(9)
    keys = formats.split_key(key, N_KEYS)
    dot = recipes.get("nvfp4").rules[recipes.get("nvfp4").match(_op(2))].dot
    ours = _ours(_qdot(DN_LINEAR, dot, key=key), x, w, g)
    w2d = dot.rhs

    def tiles(v):  # zero-padded to whole 16x16 tiles, quantized, cut back
        return quant.fake_quant(w2d, jnp.pad(v, ((0, 8), (0, 8))))[:24, :40]

    def sr(k, axis):  # stochastic rounding along ``axis`` with key ``k``
        return lambda v: quant.fake_quant(
            quant.Quantizer(format=NV, granularity=quant.Group(axis=axis), rounding="stochastic"), v, k
        )

    k_dgrad, k_wgrad, k_rot = keys[2], keys[3], keys[8]
    ref = _reference(
        _plain(DN_LINEAR),
        x,
        w,
        g,
        fwd=(_by(NV, 1), tiles),
        dlhs=(sr(k_dgrad, 1), tiles),
        drhs=(lambda v: _along(NV, rht(v, 0, k_rot), 0), lambda v: sr(k_wgrad, 0)(rht(v, 0, k_rot))),
    )
    _assert_equal(ours, ref)


@pytest.mark.filterwarnings("ignore:recipe .* is unused")  # no attention or conv in this model
def test_block_recipes_train_a_small_mlp():
    """Every block recipe through lowbit.quantize: a forward and a gradient step, finite."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b, self.c = (nnx.Linear(i, o, rngs=rngs) for i, o in ((20, 32), (32, 32), (32, 10)))

        def __call__(self, x):
            return self.c(jax.nn.relu(self.b(jax.nn.relu(self.a(x)))))

    x = _normal(50, (24, 20))
    for name in ("mxfp8", "mxfp4", "nvfp4"):
        model = lowbit.quantize(MLP(nnx.Rngs(0)), name)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        assert np.isfinite(float(loss)), name
        assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(grads)), name


# ----- the real kernel path (issue 19 item 8): decided here, run only on a GPU ------------------
def _traced(config, lhs_shape, rhs_shape, dn=DN_LINEAR) -> str:
    return str(jax.make_jaxpr(_qdot(dn, config))(jnp.ones(lhs_shape), jnp.ones(rhs_shape)))


def test_mxfp8_forward_takes_scaled_dot_general_off_cpu(monkeypatch):
    """On CPU the forward is emulated; on a GPU/TPU backend the mxfp8 recipe's forward calls JAX's MX GEMM.

    Only the dispatch is checked (by tracing, which needs no lowering): the
    kernel itself has no CPU lowering.
    """
    mx = recipes.get("mxfp8").rules[-1].dot
    assert not uses_block_kernel(mx, (16, 64), DN_LINEAR)
    assert "scaled_matmul" not in _traced(mx, (16, 64), (64, 32))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert uses_block_kernel(mx, (16, 64), DN_LINEAR)
    assert "scaled_matmul_wrapper" in _traced(mx, (16, 64), (64, 32))
    emulated = [
        dataclasses.replace(mx, matmul="fake"),
        dataclasses.replace(mx, lhs=quant.Quantizer(format="mxfp8_e4m3")),  # floor scales: not JAX's
        dataclasses.replace(mx, lhs=quant.Quantizer(format=mx.lhs.format, rounding="stochastic")),
        dataclasses.replace(mx, accumulator=ACC),
        dataclasses.replace(mx, rht=RHT(products=("fwd",))),
        dataclasses.replace(mx, rhs=quant.Quantizer(format="nvfp4")),  # JAX's NVFP4 takes a given global scale
    ]
    for config in emulated:
        assert not uses_block_kernel(config, (16, 64), DN_LINEAR), config
    assert not uses_block_kernel(mx, (16, 48), DN_LINEAR)  # K not whole 32-blocks
    assert not uses_block_kernel(mx, (4, 2, 32), (((1, 2), (0, 1)), ((), ())))  # two contracted dims
