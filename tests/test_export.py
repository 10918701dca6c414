"""Export: packed weights per op, honest bytes per parameter, exported model == fake-quant model, any model."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VIT_WEIGHTS
from flax import nnx

import lowbit.nn as lnn
from lowbit import quant
from lowbit.nn import export
from lowbit.nn.vit import ViT
from lowbit.training import ternary_weight

# bytes/param of the weights alone, before scales: what the packing must deliver
PACKED = {"fp32": 4.0, "fp8": 1.0, "fp4": 0.5, "int8": 1.0, "int4": 0.5, "ternary": 0.25, "binary": 0.125}
PACKED |= {"nf4": 0.5, "mxfp8": 1.0, "mxfp4": 0.5, "nvfp4": 0.5}  # block formats: 1-byte scales per 32 (16) elements

_forward = nnx.jit(lambda m, x: m(x))  # one compilation serves every exported copy
_IMAGES = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), jnp.float32)


@pytest.fixture(scope="module")
def model():
    """The ViT quantized by the float recipe: every op stays float, the ops are discovered."""
    vit = ViT(
        image_shape=(8, 8, 1), num_classes=10, patch_size=2, dim=32, depth=1, heads=2, mlp_dim=64, rngs=nnx.Rngs(0)
    )
    qmodel = lnn.quantize(vit, "fp32")
    lnn.discover(qmodel, _IMAGES)
    return qmodel


@pytest.mark.parametrize("fmt", list(export.EXPORTS))
def test_export_roundtrip_and_bytes(model, fmt):
    exported = export.export(model, fmt)
    assert list(exported) == VIT_WEIGHTS  # the weighted ops, in forward order; attention's einsums have none
    loaded, reference = copy.deepcopy(model), copy.deepcopy(model)
    export.load(loaded, exported)
    export.fake_quant_weights(reference, fmt)
    np.testing.assert_array_equal(_forward(loaded, _IMAGES), _forward(reference, _IMAGES))
    bpp = export.bytes_per_parameter(exported)
    # per-channel float32 scales add 4 bytes per output channel: a few percent at these sizes
    assert PACKED[fmt] <= bpp <= PACKED[fmt] * 1.05 + 4 / 32 * (fmt != "fp32"), bpp


def test_ternary_export_equals_the_ternary_forward(model):
    exported = export.export(model, "ternary")
    for name, _, param, _ in export.weights(model):
        np.testing.assert_array_equal(quant.dequantize(exported[name]), ternary_weight(param[...], axis=-1))


def test_edges_take_their_own_format(model):
    exported = export.export(model, "binary", edges="int8")
    for name, qtensor in exported.items():
        want = "int8" if name in (VIT_WEIGHTS[0], VIT_WEIGHTS[-1]) else "binary"
        assert qtensor.quantizer.format.name == want, name


@pytest.mark.slow  # end to end on a trained ViT
def test_export_errors(model):
    with pytest.raises(ValueError, match="weights="):
        export.export(model, "fp5")
    with pytest.raises(ValueError, match="edges="):
        export.export(model, "int8", edges="fp5")
    exported = export.export(model, "int8")
    exported.pop(next(iter(exported)))
    with pytest.raises(ValueError, match="export has ops"):
        export.load(copy.deepcopy(model), exported)
    fresh = lnn.quantize(
        ViT(image_shape=(8, 8, 1), num_classes=10, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=8, rngs=nnx.Rngs(0)),
        "fp32",
    )
    with pytest.raises(ValueError, match="not discovered"):
        export.export(fresh, "int8")
    with pytest.raises(TypeError, match="lowbit.quantize"):
        export.export(ViT(image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0)), "int8")


# ----- a user's model: conv, a raw einsum head in a submodule, a raw @ on two same-shaped weights -----------
class _Head(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 10)))

    def __call__(self, x):
        return jnp.einsum("bd,dk->bk", x, self.w[...])


class _User(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(64, 16, rngs=rngs)
        self.head = _Head(rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.head(jax.nn.relu(self.fc(x)))


def test_export_of_a_quantized_user_model():
    qmodel = lnn.quantize(_User(nnx.Rngs(0)), "int4_lsq")
    lnn.describe(qmodel, _IMAGES)
    exported = export.export(qmodel, "int4", edges="int8")
    assert list(exported) == ["conv:conv0", "fc:dot_general0", "head:einsum0"]
    assert [t.quantizer.format.name for t in exported.values()] == ["int8", "int4", "int8"]
    # Per output channel: the conv's (H, W, I, O) kernel has one scale per O, the einsum weight one per k.
    assert (
        exported["conv:conv0"].quantizer.granularity.axis == 3
        and exported["head:einsum0"].quantizer.granularity.axis == 1
    )
    loaded, reference = copy.deepcopy(qmodel), copy.deepcopy(qmodel)
    export.load(loaded, exported)
    export.fake_quant_weights(reference, "int4", edges="int8")
    np.testing.assert_array_equal(loaded.head.w[...], reference.head.w[...])
    np.testing.assert_array_equal(_forward(loaded, _IMAGES), _forward(reference, _IMAGES))


class _Twins(nnx.Module):
    """Two same-shaped weights in one module: which one an op multiplies by is ambiguous."""

    def __init__(self, rngs):
        self.a = nnx.Param(jax.random.normal(rngs.params(), (64, 64)))
        self.b = nnx.Param(jax.random.normal(rngs.params(), (64, 64)))

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return (x @ self.a[...]) @ self.b[...]


def test_ambiguous_weight_is_named():
    qmodel = lnn.quantize(_Twins(nnx.Rngs(0)), "fp32")
    lnn.discover(qmodel, _IMAGES)
    with pytest.raises(ValueError, match=r":dot_general0: .* 2 parameters shaped like its rhs"):
        export.export(qmodel, "int8")
