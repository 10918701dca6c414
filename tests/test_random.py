"""The one random source: ``formats.random_bits`` and ``formats.split_key`` (integer hashes, no Threefry)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import formats, quant
from lowbit.recipes import op
from lowbit.training import DotQuantConfig, quantized_dot_general

KEYS = 4096  # enough draws that a 16-bin histogram of uniform words stays well inside its bound
BINS = 16
CHI2_BOUND = 45.0  # chi-square, 15 degrees of freedom: P(> 45) < 1e-4 for uniform words


def _chi2(words):
    """Chi-square of the top 4 bits of uint32 ``words`` against uniform."""
    counts = np.bincount(np.asarray(words, np.uint32).ravel() >> 28, minlength=BINS)
    expected = counts.sum() / BINS
    return float(((counts - expected) ** 2 / expected).sum())


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _data(keys):
    return np.asarray(jax.random.key_data(jnp.stack(keys)))


def test_split_key_is_deterministic_and_jits_the_same():
    key = jax.random.key(7)
    eager = _data(formats.split_key(key, 3))
    jitted = _data(jax.jit(lambda k: formats.split_key(k, 3))(key))
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, _data(formats.split_key(jax.random.key(7), 3)))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_split_key_children_are_distinct_keys_of_the_parents_impl(impl):
    key = jax.random.key(3, impl=impl)
    children = formats.split_key(key, 5)
    assert all(jax.random.key_impl(c) == jax.random.key_impl(key) and c.shape == () for c in children)
    words = {tuple(d) for d in _data(children)} | {tuple(np.asarray(jax.random.key_data(key)))}
    assert len(words) == 6  # five children, none equal to each other or to the parent


def test_split_key_takes_legacy_key_data_and_returns_key_data():
    legacy = jax.random.PRNGKey(11)
    children = formats.split_key(legacy, 2)
    typed = formats.split_key(jax.random.wrap_key_data(legacy), 2)
    assert all(c.dtype == jnp.uint32 and c.shape == (2,) for c in children)
    np.testing.assert_array_equal(np.stack(children), _data(typed))


def test_split_key_words_are_uniform_over_parents():
    # Every child word, over many parents, must look uniform: random_bits relies on it.
    words = jax.vmap(lambda k: jax.random.key_data(jnp.stack(formats.split_key(k, 3))))(_keys(KEYS))
    words = np.asarray(words)  # (KEYS, 3, 2)
    for child in range(3):
        for w in range(2):
            assert _chi2(words[:, child, w]) < CHI2_BOUND, (child, w)


def test_next_key_chain_does_not_repeat():
    data = jax.random.key_data(jax.random.key(0))
    seen = set()
    for _ in range(256):
        this, data = op.next_key(data)
        seen.add(tuple(np.asarray(jax.random.key_data(this))))
        seen.add(tuple(np.asarray(data)))
    assert len(seen) == 512


def test_random_bits_uniform_over_keys_and_over_elements():
    per_key = jax.vmap(lambda k: formats.random_bits(k, (3, 5)))(_keys(KEYS))  # (KEYS, 3, 5)
    per_key = np.asarray(per_key)
    for i, j in ((0, 0), (1, 2), (2, 4)):
        assert _chi2(per_key[:, i, j]) < CHI2_BOUND, (i, j)
    one_key = np.asarray(formats.random_bits(jax.random.key(5), (64, 64)))
    assert _chi2(one_key) < CHI2_BOUND
    # Neighbours are unrelated: adjacent words' top bits agree about half the time.
    top = one_key >> 31
    assert 0.45 < float(np.mean(top[:, 1:] == top[:, :-1])) < 0.55
    assert 0.45 < float(np.mean(top[1:] == top[:-1])) < 0.55


def test_random_bits_differ_between_split_children():
    a, b = formats.split_key(jax.random.key(1), 2)
    wa, wb = (np.asarray(formats.random_bits(k, (1024,))) for k in (a, b))
    assert np.mean(wa == wb) < 0.01


def test_stochastic_product_step_runs_no_threefry_loop():
    # XLA:CPU lowers Threefry as a rolled while loop; the SR step derives all its keys by hashing.
    sr = quant.Quantizer(format="int8", rounding="stochastic")
    config = DotQuantConfig(lhs=sr, rhs=sr, dlhs_grad=sr, drhs_grad=sr)
    lhs, rhs = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 4), jnp.float32)

    def step(lhs, rhs, key_data):
        key, nxt = op.next_key(key_data)
        loss = lambda a, b: jnp.sum(quantized_dot_general(a, b, (((1,), (0,)), ((), ())), config, key=key))
        return jax.grad(loss, argnums=(0, 1))(lhs, rhs), nxt

    hlo = jax.jit(step).lower(lhs, rhs, jax.random.key_data(jax.random.key(0))).as_text()
    assert "threefry" not in hlo.lower() and "while" not in hlo
    # The check can fail: the same step with jax.random.split does contain the loop.
    split = (
        jax.jit(lambda d: jax.random.split(jax.random.wrap_key_data(d)))
        .lower(jax.random.key_data(jax.random.key(0)))
        .as_text()
    )
    assert "threefry" in split.lower()


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: formats.split_key(jax.random.key(0), True), ValueError),
        (lambda: formats.split_key(jax.random.key(0), 0), ValueError),
        (lambda: formats.split_key(jnp.zeros(3), 2), TypeError),
        (lambda: formats.split_key(jax.random.split(jax.random.key(0)), 2), ValueError),
        (lambda: formats.random_bits(jax.random.key(0), [3]), TypeError),
        (lambda: formats.random_bits(jax.random.key(0), (3, -1)), ValueError),
        (lambda: formats.random_bits(jax.random.key(0), (2.0,)), ValueError),
    ],
)
def test_bad_input_is_refused(call, error):
    with pytest.raises(error):
        call()
