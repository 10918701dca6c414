"""lowbit.quant.packing and QTensor storage: round trips, bit layout, honest byte counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit import formats, quant
from lowbit.quant import PTF, Channel, Group, Quantizer, Twin, Uniform, packing

SIZES = [0, 1, 5, 8, 13, 64]  # a few fixed sizes: each is one compilation


@pytest.mark.parametrize("bits", packing.WIDTHS)
@given(n=st.sampled_from(SIZES), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n)
    dtype = np.uint16 if bits == 16 else np.uint8
    packed = quant.pack(jnp.asarray(codes, dtype), bits)
    assert packed.shape == (packing.packed_size(n, bits),)
    assert packed.dtype == dtype
    np.testing.assert_array_equal(quant.unpack(packed, bits, n), codes.astype(dtype))


def test_pack_layout_is_little_endian():
    np.testing.assert_array_equal(quant.pack(jnp.asarray([1, 0, 1, 1, 0, 0, 0, 1, 1], jnp.uint8), 1), [0x8D, 0x01])
    np.testing.assert_array_equal(quant.pack(jnp.asarray([1, 2, 3], jnp.uint8), 2), [0b111001])
    np.testing.assert_array_equal(quant.pack(jnp.asarray([0x1, 0xF, 0x7], jnp.uint8), 4), [0xF1, 0x07])
    # Four 6-bit codes in three bytes: bits 0-5, 6-11, 12-17, 18-23.
    packed = quant.pack(jnp.asarray([0x3F, 0x00, 0x2A, 0x15], jnp.uint8), 6)
    word = 0x3F | 0x00 << 6 | 0x2A << 12 | 0x15 << 18
    np.testing.assert_array_equal(packed, [word & 0xFF, word >> 8 & 0xFF, word >> 16])


def test_packed_sizes_and_containers():
    assert [packing.packed_size(10, b) for b in packing.WIDTHS] == [2, 3, 5, 9, 10, 10]
    assert [packing.container_bits(b) for b in range(1, 17)] == [1, 2, 4, 4, 6, 6, 8, 8] + [16] * 8
    with pytest.raises(ValueError, match="bits=3"):
        quant.pack(jnp.zeros(4, jnp.uint8), 3)
    with pytest.raises(ValueError, match="need"):
        quant.unpack(jnp.zeros(3, jnp.uint8), 4, 8)


X = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32))
N = X.size


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(format="int4", granularity=Channel()), N // 2 + 48 * 4),
        (dict(format="int4", granularity=Channel(), scale_format="e8m0"), N // 2 + 48),
        (dict(format="int8", granularity=Group(size=16, axis=0)), N + (64 // 16) * 48 * 4),
        (dict(format="float8_e4m3fn"), N + 4),
        (dict(format="float6_e2m3fn", granularity=Channel(axis=0)), N * 6 // 8 + 64 * 4),
        (dict(format="int2", granularity=Channel(), scale_format="e4m3"), N // 4 + 48 + 4),
        (dict(format="binary", granularity=Channel()), N // 8 + 48 * 4),
        (dict(format="uint8", granularity=Channel(), kind=Uniform(symmetric=False)), N + 48 * 4 + 48),
        (dict(format=formats.IntFormat(bits=12)), N * 2 + 4),
        (dict(format="uint8", granularity=Channel(), kind=PTF(symmetric=False)), N + 4 + 1 + 48),
        (dict(format="uint4", kind=Twin()), N // 2 + 4 + 1),
    ],
)
def test_qtensor_nbytes_is_true_storage(kw, expected):
    qt = quant.quantize(Quantizer(**kw), X)
    assert qt.nbytes == expected


def test_qtensor_is_a_pytree_with_static_metadata():
    q = Quantizer(format="int4", granularity=Channel())
    qt = quant.quantize(q, X)
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 2  # codes, scale
    assert qt.codes.dtype == jnp.uint8 and qt.codes.shape == (N // 2,)
    assert qt.quantizer == q and qt.shape == X.shape and qt.format is formats.get("int4")
    doubled = jax.jit(lambda t: jax.tree_util.tree_map(lambda a: a, t))(qt)
    np.testing.assert_array_equal(quant.dequantize(doubled), quant.dequantize(qt))
    assert jax.tree_util.tree_unflatten(treedef, leaves).quantizer == q
