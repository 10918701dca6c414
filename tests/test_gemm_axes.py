"""Per-GEMM placement: each of the three products quantizes both operands along its own contraction.

The references are built by hand: each operand is quantized in blocks along
the axes the test names for the product's contraction (adjacent axes merged
where they lie, others transposed last for ``lowbit.formats.quantize`` and
back), and fed to the plain product; the backward references are the VJPs of
the plain product at those operands, so the float operations are the ones
``quantized_dot_general`` runs and the comparison is bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lowbit import formats, quant
from lowbit.training import DotQuantConfig, quantized_dot_general
from lowbit.training.qdot import quantized_conv

# Small shapes and cheap formats: a test's time is XLA compiling its two programs.
MX = "mxfp4_e2m1"  # blocks of 32, power-of-two scales: an identity matrix quantizes to itself
NV = "nvfp4"  # blocks of 16 under an E4M3 block scale and an FP32 tensor scale
DN_LINEAR = (((1,), (0,)), ((), ()))


def _normal(seed, shape):
    # numpy's generator: jax.random would compile a sampler per shape, which costs more than the test
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _along(fmt, x, *axes):
    """``x`` quantized in blocks along ``axes`` (flattened in that order, the last fastest)."""
    return _quantize_along(fmt, x, axes)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _quantize_along(fmt, x, axes):
    d, n = axes[0], len(axes)
    if axes == tuple(range(d, d + n)):
        # Adjacent axes in order merge where they lie, and the blocks are cut there (test_block_formats checks
        # that this equals quantizing them moved last): a transposed operand would give XLA's dots another
        # layout, and their sums other last bits.
        merged = x.reshape(*x.shape[:d], -1, *x.shape[d + n :])
        return quant.fake_quant(quant.Quantizer(format=fmt, granularity=quant.Group(axis=d)), merged).reshape(x.shape)
    rest = [d for d in range(x.ndim) if d not in axes]
    perm = rest + list(axes)
    moved = jnp.transpose(x, perm)
    y = formats.quantize(fmt, moved.reshape(*moved.shape[: len(rest)], -1))
    return jnp.transpose(y.reshape(moved.shape), np.argsort(perm))


def _by(fmt, *axes):
    """A reference quantizer: ``x -> x`` in blocks of ``fmt`` along ``axes``."""
    return lambda x: _along(fmt, x, *axes)


def _config(fmt, **kw):
    q = quant.Quantizer(format=fmt)  # axis left at its default: the product places the blocks
    return DotQuantConfig(lhs=q, rhs=q, dlhs_grad=q, drhs_grad=q, **kw)


def _vjp(product, lhs, rhs, g):
    out, vjp = jax.vjp(product, lhs, rhs)
    return (out, *vjp(g))


def _ours(product, lhs, rhs, g):
    """``(out, dlhs, drhs)`` of a quantized product at ``(lhs, rhs)`` with cotangent ``g``."""
    return jax.jit(functools.partial(_vjp, product))(lhs, rhs, g)  # one compiled program: fast


def _reference(product, lhs, rhs, g, *, fwd, dlhs, drhs):
    """The plain product on operands quantized by hand (each a function ``x -> Q(x)``).

    ``fwd = (Q_lhs, Q_rhs)``, ``dlhs = (Q_g, Q_rhs)``, ``drhs = (Q_lhs, Q_g)``:
    the backward results are the VJPs of the plain product at those operands.
    """

    def run(lhs, rhs, g):
        _, vjp_l = jax.vjp(lambda a: product(a, dlhs[1](rhs)), lhs)
        _, vjp_r = jax.vjp(lambda b: product(drhs[0](lhs), b), rhs)
        return product(fwd[0](lhs), fwd[1](rhs)), vjp_l(dlhs[0](g))[0], vjp_r(drhs[1](g))[0]

    return jax.jit(run)(lhs, rhs, g)


def _assert_equal(ours, ref):
    for name, a, b in zip(("forward", "dlhs", "drhs"), ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ----- each quantized operand, made visible by identity operands -------------------------------
def test_identity_operands_show_each_product_quantizes_along_its_contraction():
    """``M = K = N``: with an identity on one side, a product returns the other quantized operand exactly."""
    n = 64
    eye, x, g = jnp.eye(n, dtype=jnp.float32), _normal(0, (n, n)), _normal(1, (n, n))
    run = jax.jit(lambda a, b, c: _vjp(lambda lo, ro: quantized_dot_general(lo, ro, DN_LINEAR, _config(MX)), a, b, c))
    along_rows, along_cols = _along(MX, x, 0), _along(MX, x, 1)
    assert not np.array_equal(along_rows, along_cols)  # the two placements differ on this draw
    # Forward: lhs along K (its columns), rhs along K (its rows).
    out, dlhs, _ = run(x, eye, g)
    np.testing.assert_array_equal(out, along_cols)
    np.testing.assert_array_equal(run(eye, x, g)[0], along_rows)
    # dlhs = Q(g) Q(rhs)^T contracts N: g along its columns (rhs = I) ...
    np.testing.assert_array_equal(dlhs, _along(MX, g, 1))
    # ... and rhs along its columns (g = I: dlhs = Q(rhs)^T).
    np.testing.assert_array_equal(run(eye, x, eye)[1], along_cols.T)
    # drhs = Q(lhs)^T Q(g) contracts M: g along its rows (lhs = I) and lhs along its rows (g = I).
    np.testing.assert_array_equal(run(eye, x, g)[2], _along(MX, g, 0))
    np.testing.assert_array_equal(run(x, eye, eye)[2], along_rows.T)


# ----- against hand-built references -----------------------------------------------------------
def _dot(dn):
    return lambda a, b: lax.dot_general(a, b, dn)


def test_linear():
    lhs, rhs, g = _normal(0, (32, 48)), _normal(1, (48, 64)), _normal(2, (32, 64))
    ours = _ours(lambda a, b: quantized_dot_general(a, b, DN_LINEAR, _config(NV)), lhs, rhs, g)
    ref = _reference(
        _dot(DN_LINEAR),
        lhs,
        rhs,
        g,
        fwd=(_by(NV, 1), _by(NV, 0)),  # both along K
        dlhs=(_by(NV, 1), _by(NV, 1)),  # g and rhs along N
        drhs=(_by(NV, 0), _by(NV, 0)),
    )  # lhs and g along M
    _assert_equal(ours, ref)


def test_batched_activation_flattens_batch_and_tokens_in_the_weight_gradient():
    """'btd,df->btf': the weight gradient contracts (b, t), blocked as one b*t axis (t fastest).

    t = 48 is not a multiple of the block (32): a block straddles two sequences,
    as in the (b*t, d) matrix a GEMM library sees.
    """
    lhs, rhs, g = _normal(3, (2, 48, 32)), _normal(4, (32, 64)), _normal(5, (2, 48, 64))
    dn = (((2,), (0,)), ((), ()))
    ours = _ours(lambda a, b: quantized_dot_general(a, b, dn, _config(MX)), lhs, rhs, g)
    fwd, dlhs = (_by(MX, 2), _by(MX, 0)), (_by(MX, 2), _by(MX, 1))
    ref = _reference(_dot(dn), lhs, rhs, g, fwd=fwd, dlhs=dlhs, drhs=(_by(MX, 0, 1), _by(MX, 0, 1)))
    _assert_equal(ours, ref)
    # Blocking along t alone (blocks restart with every sequence) gives another weight gradient.
    per_sequence = _reference(_dot(dn), lhs, rhs, g, fwd=fwd, dlhs=dlhs, drhs=(_by(MX, 1), _by(MX, 1)))
    assert not np.array_equal(ours[2], per_sequence[2])


def test_attention_scores():
    """'bhqd,bhkd->bhqk': forward along d, dlhs along k, drhs along q; batch dims untouched."""
    lhs, rhs, g = _normal(6, (2, 2, 32, 32)), _normal(7, (2, 2, 64, 32)), _normal(8, (2, 2, 32, 64))
    dn = (((3,), (3,)), ((0, 1), (0, 1)))
    ours = _ours(lambda a, b: quantized_dot_general(a, b, dn, _config(MX)), lhs, rhs, g)
    ref = _reference(
        _dot(dn),
        lhs,
        rhs,
        g,
        fwd=(_by(MX, 3), _by(MX, 3)),
        dlhs=(_by(MX, 3), _by(MX, 2)),
        drhs=(_by(MX, 2), _by(MX, 2)),
    )
    _assert_equal(ours, ref)


def test_conv_nhwc():
    """Forward along input features, dgrad along output features, wgrad along batch x spatial."""
    x, w, g = _normal(9, (2, 6, 6, 32)), _normal(10, (3, 3, 32, 64)), _normal(11, (2, 6, 6, 64))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = _ours(lambda a, b: quantized_conv(a, b, _config(MX), **kw), x, w, g)
    ref = _reference(
        lambda a, b: lax.conv_general_dilated(a, b, **kw),
        x,
        w,
        g,
        fwd=(_by(MX, 3), _by(MX, 2)),  # C and I
        dlhs=(_by(MX, 3), _by(MX, 3)),  # C_out and O
        drhs=(_by(MX, 0, 1, 2), _by(MX, 0, 1, 2)),
    )  # N x H x W
    _assert_equal(ours, ref)


def test_groups_and_channels_follow_each_product():
    """Groups run along each contraction like blocks; channel scales along each operand's free dim."""
    lhs, rhs, g = _normal(12, (16, 32)), _normal(13, (32, 24)), _normal(14, (16, 24))
    group = quant.Quantizer(format="int8", granularity=quant.Group(size=8))
    channel = quant.Quantizer(format="float8_e4m3fn", granularity=quant.Channel())
    by = lambda q, axis: lambda x: quant.fake_quant(q.along(axis), x)
    cfg = DotQuantConfig(lhs=group, rhs=channel, dlhs_grad=group, drhs_grad=group)
    ours = _ours(lambda a, b: quantized_dot_general(a, b, DN_LINEAR, cfg), lhs, rhs, g)
    ref = _reference(
        _dot(DN_LINEAR),
        lhs,
        rhs,
        g,
        fwd=(by(group, 1), by(channel, 1)),  # rhs: one scale per output feature N
        dlhs=(by(group, 1), by(channel, 0)),  # dlhs contracts N: rhs gets one scale per K
        drhs=(by(group, 0), by(group, 0)),
    )
    _assert_equal(ours, ref)


# ----- reuse of the forward's copy -------------------------------------------------------------
def test_float_backward_products_take_the_forward_copy():
    """No gradient quantizer: the backward is the exact derivative of the quantized forward (STE).

    An identity cotangent makes the copies the backward products take visible exactly: with
    a random one, the reference's transposes gave XLA another operand layout for its dots,
    and other last bits in their sums.
    """
    lhs, rhs, g = _normal(15, (48, 32)), _normal(16, (32, 48)), jnp.eye(48, dtype=jnp.float32)
    q = quant.Quantizer(format=MX)
    ours = _ours(lambda a, b: quantized_dot_general(a, b, DN_LINEAR, DotQuantConfig(lhs=q, rhs=q)), lhs, rhs, g)
    ident = lambda x: x
    ref = _reference(
        _dot(DN_LINEAR), lhs, rhs, g, fwd=(_by(MX, 1), _by(MX, 0)), dlhs=(ident, _by(MX, 0)), drhs=(_by(MX, 1), ident)
    )
    _assert_equal(ours, ref)


def test_quantizer_placement_keeps_the_old_numerics():
    """``placement='quantizer'``: every quantizer on its own axis, the backward reusing the forward's copies."""
    lhs, rhs, g = _normal(18, (16, 32)), _normal(19, (32, 48)), _normal(20, (16, 48))
    fwd, w = quant.Quantizer(format=MX), quant.Quantizer(format=MX, granularity=quant.Group(axis=0))
    cfg = DotQuantConfig(lhs=fwd, rhs=w, dlhs_grad=fwd, drhs_grad=fwd, placement="quantizer")
    ours = _ours(lambda a, b: quantized_dot_general(a, b, DN_LINEAR, cfg), lhs, rhs, g)
    ref = _reference(
        _dot(DN_LINEAR),
        lhs,
        rhs,
        g,
        fwd=(_by(MX, 1), _by(MX, 0)),
        dlhs=(_by(MX, 1), _by(MX, 0)),
        drhs=(_by(MX, 1), _by(MX, 1)),
    )  # g along its last axis (N) in both products
    _assert_equal(ours, ref)


def _fprop_and_dgrad_weights(weight_quantizer, w):
    """The weight the forward used (lhs = I) and the one the input gradient used (g = I), both as ``w``'s shape."""
    eye = jnp.eye(w.shape[0], dtype=jnp.float32)
    mx = quant.Quantizer(format=MX)  # quantizes an identity exactly
    cfg = DotQuantConfig(lhs=mx, rhs=weight_quantizer, dlhs_grad=mx, drhs_grad=mx)
    out, dlhs, _ = _ours(lambda a, b: quantized_dot_general(a, b, DN_LINEAR, cfg), eye, w, eye)
    return out, dlhs.T


@pytest.mark.parametrize("fmt,tile", [(NV, (16, 16)), ("float8_e4m3fn", (128, 128))])
def test_2d_blocks_give_one_weight_to_fprop_and_dgrad(fmt, tile):
    """NVFP4's 16x16 and DeepSeek-V3's 128x128 weight blocks: the forward's copy is the input gradient's."""
    w = _normal(21, (256, 256))
    w2d = quant.Quantizer(format=fmt, granularity=quant.Block(shape=tile))
    fprop, dgrad = _fprop_and_dgrad_weights(w2d, w)
    np.testing.assert_array_equal(fprop, dgrad)
    np.testing.assert_array_equal(fprop, quant.fake_quant(w2d, w))


def test_1d_weight_blocks_differ_between_fprop_and_dgrad():
    """1-D blocks are placed per product: along K for the forward, along N for the input gradient."""
    w = _normal(21, (64, 64))
    fprop, dgrad = _fprop_and_dgrad_weights(quant.Quantizer(format=NV), w)
    np.testing.assert_array_equal(fprop, _along(NV, w, 0))
    np.testing.assert_array_equal(dgrad, _along(NV, w, 1))
    assert not np.array_equal(fprop, dgrad)


def test_2d_blocks_must_tile_a_contracted_axis():
    """2-D tiles span the last two axes; an operand contracted elsewhere is refused, naming the field."""
    x, w = _normal(22, (16, 4, 4)), _normal(23, (16, 8))
    w2d = quant.Quantizer(format="int8", granularity=quant.Block(shape=(4, 4)))
    with pytest.raises(ValueError, match=r"Block\(shape=\(4, 4\)\).*contracts its dims \(0,\)"):
        quantized_dot_general(x, w, (((0,), (0,)), ((), ())), DotQuantConfig(lhs=w2d))


def test_placement_is_checked():
    with pytest.raises(ValueError, match="placement='rows'.*allowed: gemm, quantizer"):
        DotQuantConfig(placement="rows")
