"""Exact float32 bit helpers shared by the format kernels.

Every kernel rounds on the float32 bit pattern: integer adds and masks on the
mantissa are exact and vectorise, where ``log2``/``exp2`` are neither.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.formats._checks import check_int, check_key

SIGN = 0x80000000
ABS = 0x7FFFFFFF
INF_BITS = 0x7F800000
MANT = 23  # float32 mantissa bits


@functools.cache
def u32(v: int) -> jax.Array:
    """A uint32 scalar constant (keeps strict dtype promotion happy).

    Cached: the kernels use a few dozen constants thousands of times per traced
    step, and creating a device scalar costs a dispatch each time (measured: a
    third of a millisecond, seconds per model trace).
    """
    with jax.ensure_compile_time_eval():  # a concrete array even when first asked for inside a trace
        c: jax.Array = jnp.uint32(v)
    return c


def to_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 bit pattern."""
    return lax.bitcast_convert_type(x, jnp.uint32)


def from_bits(b: jax.Array) -> jax.Array:
    """uint32 bit pattern -> float32."""
    return lax.bitcast_convert_type(b, jnp.float32)


def pow2(k: jax.Array) -> jax.Array:
    """Exact 2^k as float32 for integer k in [-126, 127] (int32 array).

    Built from the exponent field, so it is exact and costs one shift; callers
    keep k inside the normal range.
    """
    return from_bits(lax.shift_left((k + 127).astype(jnp.uint32), u32(MANT)))


def exponent(x: jax.Array) -> jax.Array:
    """floor(log2|x|) as int32 for finite nonzero float32 x (subnormals included)."""
    b = to_bits(x) & u32(ABS)
    field = lax.shift_right_logical(b, u32(MANT)).astype(jnp.int32)
    # Subnormals: b is the integer mantissa m, |x| = m * 2^-149.
    return jnp.where(field == 0, -118 - lax.clz(b).astype(jnp.int32), field - 127)


def _triple32(h: jax.Array) -> jax.Array:
    """Wellons' ``triple32`` integer hash of uint32 words (a bijection with full avalanche)."""
    for shift, mult in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        h = (h ^ lax.shift_right_logical(h, u32(shift))) * u32(mult)
    return h ^ lax.shift_right_logical(h, u32(14))


def _key_words(key: jax.Array) -> jax.Array:
    """A key's data as a flat uint32 vector (typed keys and legacy uint32 keys alike)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return data.reshape(-1).astype(jnp.uint32)


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint32 words of ``shape`` for stochastic rounding, reproducible for ``key``.

    ``jax.random.bits`` spends about 20 Threefry rounds per word, several times the
    cost of the rounding it feeds, and on XLA:CPU even a 2-word draw runs as a
    rolled loop of ~10 kernels. Rounding needs each element's word uniform and
    unrelated to its neighbours', so the words are an integer hash (``triple32``,
    a bijection) of the element's flat index under an affine map ``i -> a i + b``
    taken from the key's own two data words (hashed, so that ``key(0)``,
    ``key(1)``... do not give shifted copies of one stream): no Threefry here at
    all. Keys from ``jax.random.split`` or ``split_key`` have uniform data words, so for any fixed
    element the word is uniform over keys, which keeps stochastic rounding
    unbiased. The index is built from per-axis iotas so the words stay the same
    under sharding.

    Args:
      key: one typed ``jax.random`` key or one legacy uint32[2] key.
      shape: the words' shape (a tuple of non-negative ints).

    Returns:
      uint32 array of ``shape``.
    """
    check_key(key)
    if not isinstance(shape, tuple):
        raise TypeError(f"random_bits: shape={shape!r} is invalid; allowed: a tuple of non-negative ints")
    for i, n in enumerate(shape):
        check_int("random_bits", f"shape[{i}]", n, 0)
    data = _key_words(key)
    b = _triple32(data[1] ^ u32(0x9E3779B9))
    a = _triple32(data[0] ^ b) | u32(1)  # odd: the map is a bijection of the indices
    h = jnp.zeros(shape, jnp.uint32)
    for axis, n in enumerate(shape):
        h = h * u32(n) + lax.broadcasted_iota(jnp.uint32, shape, axis)
    return _triple32(h * a + b)


def split_key(key: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """``n`` keys derived from ``key`` for stochastic rounding, by hashing its data words.

    ``jax.random.split`` runs Threefry, which XLA:CPU lowers as a rolled loop of
    about ten kernels per call; a quantized training step splits every
    stochastic op's key, so those loops were a large part of its kernel count.
    Here child ``i``'s words are ``triple32`` of a seed that folds every parent
    word with ``i``: one small fused kernel, uniform words (``random_bits``
    relies on that), distinct children for distinct ``i``.

    Args:
      key: one typed ``jax.random`` key or one legacy uint32[2] key.
      n: how many keys (an int >= 1).

    Returns:
      A tuple of ``n`` keys of ``key``'s kind (typed keys keep their impl).
    """
    check_key(key)
    check_int("split_key", "n", n, 1)
    keys: tuple[jax.Array, ...] = _split_key(key, n)  # (jax.jit drops the return type)
    return keys


# One compiled (or, inside a trace, one cached) computation per key kind and n: called for every stochastic
# op of every traced step, its dozen integer ops cost more to trace one by one than to run.
@functools.partial(jax.jit, static_argnums=1)
def _split_key(key: jax.Array, n: int) -> tuple[jax.Array, ...]:
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    words = _key_words(key)
    seed = _triple32(jnp.arange(1, n + 1, dtype=jnp.uint32) * u32(0x9E3779B9))
    for w in range(words.shape[0]):
        seed = _triple32(seed ^ words[w])
    salt = jnp.arange(1, words.shape[0] + 1, dtype=jnp.uint32) * u32(0x85EBCA6B)
    children = _triple32(seed[:, None] ^ salt[None, :]).reshape((n,) + data.shape).astype(data.dtype)
    if typed:
        children = jax.random.wrap_key_data(children, impl=jax.random.key_impl(key))
    return tuple(children[i] for i in range(n))
