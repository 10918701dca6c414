"""The random Hadamard transform: definition, orthogonality, inverse, product invariance, keys, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lowbit.training import rht, rht_dot_operands, rht_inverse, rht_signs

KEY = jax.random.key(0)
H4 = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float64)


def _ints(shape, seed, high=8):
    return np.random.default_rng(seed).integers(-high, high + 1, shape).astype(np.float32)


def _normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_definition_blocks_times_signs_then_hadamard():
    # Every 4-block b along the last axis becomes b @ (D H) / 2, i.e. H D b / 2 as a column (TE's apply_rht).
    x = _normal((3, 12), 0)
    signs = np.asarray(rht_signs(KEY, 4), np.float64)
    m = np.diag(signs) @ H4 / 2
    want = (x.astype(np.float64).reshape(3, 3, 4) @ m).reshape(3, 12)
    np.testing.assert_allclose(rht(x, -1, KEY, block=4), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(want.reshape(3, 3, 4), np.einsum("ij,j,abj->abi", H4, signs, x.reshape(3, 3, 4)) / 2)


def test_key_none_is_the_plain_hadamard_transform():
    got = rht(np.eye(16, dtype=np.float32), 1, None)
    h = np.asarray(got) * 4
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h[0], np.ones(16))
    np.testing.assert_array_equal(h @ h.T, 16 * np.eye(16))


@pytest.mark.parametrize("block", [2, 16, 32, 64])
def test_orthogonal(block):
    # Rows of the identity come out as the rows of M; M M^T = I (exactly when 1/sqrt(block) is a power of two).
    m = np.asarray(rht(np.eye(block, dtype=np.float32), 1, KEY, block=block), np.float64)
    assert set(np.unique(np.abs(m))) == {np.float32(1 / np.sqrt(block))}
    if block in (16, 64):
        np.testing.assert_array_equal(m @ m.T, np.eye(block))
    else:
        np.testing.assert_allclose(m @ m.T, np.eye(block), atol=1e-6)
    x = _normal((5, 4 * block), 1)
    norms = np.linalg.norm(np.asarray(rht(x, 1, KEY, block=block)).reshape(5, 4, block), axis=-1)
    np.testing.assert_allclose(norms, np.linalg.norm(x.reshape(5, 4, block), axis=-1), rtol=1e-6)


def test_inverse():
    x = _normal((4, 6, 64), 2)
    for axis in (2, -1):
        np.testing.assert_allclose(rht_inverse(rht(x, axis, KEY), axis, KEY), x, rtol=1e-6, atol=1e-6)
    y = _ints((4, 64), 3)
    np.testing.assert_array_equal(rht_inverse(rht(y, 1, KEY), 1, KEY), y)
    np.testing.assert_array_equal(rht(rht_inverse(y, 1, KEY), 1, KEY), y)


def test_axis_and_independent_blocks():
    x = _normal((32, 5), 4)
    np.testing.assert_array_equal(rht(x, 0, KEY), rht(x.T, 1, KEY).T)
    # Blocks cut where the axis lies give the sums of the axis moved last, bit for bit (a middle axis too).
    x3 = _normal((3, 32, 5), 10)
    moved = np.moveaxis(np.asarray(rht(np.moveaxis(x3, 1, -1), -1, KEY)), -1, 1)
    np.testing.assert_array_equal(rht(x3, 1, KEY), moved)
    changed = x.copy()
    changed[20] += 1  # only the second block of axis 0
    before, after = np.asarray(rht(x, 0, KEY)), np.asarray(rht(changed, 0, KEY))
    np.testing.assert_array_equal(before[:16], after[:16])
    assert np.all(before[16:] != after[16:])


def test_product_invariance_f32():
    x, w = _normal((8, 64), 5), _normal((5, 64), 6)
    got = rht(x, 1, KEY) @ rht(w, 1, KEY).T
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [16, 64])
def test_product_invariance_exact_for_small_integers(block):
    # 1/sqrt(block) is a power of two and every sum is an integer multiple of it under 2^24: no rounding at all.
    x, w = _ints((8, 128), 7), _ints((5, 128), 8)
    xt, wt = rht(x, 1, KEY, block=block), rht(w, 1, KEY, block=block)
    np.testing.assert_array_equal(lax.dot_general(xt, wt, (((1,), (1,)), ((), ()))), x @ w.T)


def test_same_key_same_transform_other_keys_other_signs():
    x = _normal((2, 32), 9)
    f = jax.jit(rht, static_argnums=(1, 3))
    np.testing.assert_array_equal(rht(x, 1, KEY), f(x, 1, KEY, 16))
    np.testing.assert_array_equal(rht(x, 1, jax.random.key(0)), rht(x, 1, KEY))
    signs = np.asarray(jax.vmap(rht_signs)(jax.random.split(KEY, 32)))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert len({tuple(s) for s in signs}) == 32  # 2^16 sign vectors: 32 keys collide with probability < 1 %
    assert abs(signs.mean()) < 0.1
    assert np.any(np.asarray(rht(x, 1, jax.random.key(1))) != np.asarray(rht(x, 1, KEY)))
    legacy = jax.random.PRNGKey(0)  # legacy uint32[2] keys work too
    np.testing.assert_array_equal(rht_signs(legacy), rht_signs(legacy))


def test_dtype_kept_and_gradient_is_the_inverse():
    x = _normal((3, 32), 10)
    assert rht(jnp.asarray(x, jnp.bfloat16), 1, KEY).dtype == jnp.bfloat16
    g = _normal((3, 32), 11)
    grad = jax.grad(lambda v: jnp.sum(rht(v, 1, KEY) * g))(x)
    np.testing.assert_allclose(grad, rht_inverse(g, 1, KEY), rtol=1e-6, atol=1e-6)


DN_MATMUL = (((1,), (0,)), ((), ()))
DN_QK = (((3,), (3,)), ((0, 1), (0, 1)))  # bhqd,bhkd->bhqk
DN_WGRAD = (((0, 1), (0, 1)), ((), ()))  # dW = x^T g over (batch, tokens)


@pytest.mark.parametrize(
    "dn,shape_l,shape_r",
    [
        (DN_MATMUL, (6, 32), (32, 5)),
        (DN_QK, (2, 3, 4, 32), (2, 3, 5, 32)),
        (DN_WGRAD, (3, 48, 7), (3, 48, 4)),  # blocks along the 48 tokens (the last contracting pair)
    ],
)
def test_dot_operands_leave_dot_general_unchanged(dn, shape_l, shape_r):
    lhs, rhs = _normal(shape_l, 12), _normal(shape_r, 13)
    lt, rt = rht_dot_operands(lhs, rhs, dn, KEY)
    assert lt.shape == lhs.shape and rt.shape == rhs.shape
    assert np.all(np.asarray(lt) != lhs)
    np.testing.assert_allclose(lax.dot_general(lt, rt, dn), lax.dot_general(lhs, rhs, dn), rtol=1e-5, atol=1e-5)
    li, ri = _ints(shape_l, 14), _ints(shape_r, 15)
    np.testing.assert_array_equal(lax.dot_general(*rht_dot_operands(li, ri, dn, KEY), dn), lax.dot_general(li, ri, dn))


def test_dot_operands_pair():
    lhs, rhs = _normal((16, 48, 7), 16), _normal((16, 48, 4), 17)
    lt, _ = rht_dot_operands(lhs, rhs, DN_WGRAD, KEY, pair=0)  # blocks along the first contracting dim
    np.testing.assert_array_equal(lt, rht(lhs, 0, KEY))
    with pytest.raises(ValueError, match=r"rht_dot_operands\.pair=2 .*\[-2, 1\]"):
        rht_dot_operands(lhs, rhs, DN_WGRAD, KEY, pair=2)
    with pytest.raises(ValueError, match="contracts no dims"):
        rht_dot_operands(lhs, rhs, (((), ()), ((), ())), KEY)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: rht(np.zeros((4, 24), np.float32), 1, KEY),
            ValueError,
            r"rht\.axis=1 .*multiple of block=16 .*length 24",
        ),
        (lambda: rht(np.zeros((4, 24), np.float32), 1, KEY, block=12), ValueError, r"rht\.block=12 .*power of two"),
        (lambda: rht(np.zeros((4, 24), np.float32), 1, KEY, block=1), ValueError, r"rht\.block=1 .*>= 2"),
        (lambda: rht(np.zeros((4, 24), np.float32), 1, KEY, block=True), ValueError, r"rht\.block=True"),
        (lambda: rht(np.zeros((4, 32), np.float32), 2, KEY), ValueError, r"rht\.axis=2 .*\[-2, 1\]"),
        (lambda: rht(np.zeros((4, 32), np.int32), 1, KEY), TypeError, r"rht: x has dtype int32"),
        (lambda: rht(np.zeros((4, 32), np.float32), 1, 0), TypeError, r"key"),
        (lambda: rht_inverse(np.zeros((4, 32), np.float32), 1, KEY, block=6), ValueError, r"rht_inverse\.block=6"),
        (lambda: rht_signs(KEY, 3), ValueError, r"rht_signs\.block=3"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
