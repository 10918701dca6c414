"""lowbit.nn.vit: a stock Flax ViT (no lowbit layer): shapes, configuration, argument checks, quantization."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.nn.vit import ViT, default_patch_size


@nnx.jit  # one compilation instead of one per eager op
def _forward(model, x):
    return model(x)


def _vit(**kw):
    args = dict(image_shape=(8, 8, 1), num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    return ViT(**(args | kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("recipe", ["fp32", "bf16", "fp4"])
def test_forward_shape_and_output_dtype(recipe):
    model = lowbit.quantize(_vit(), recipe)
    x = jnp.ones((3, 8, 8, 1), jnp.float32)
    lowbit.describe(model, x)
    logits = _forward(model, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))


def test_the_vit_is_stock_flax_quantized_like_any_model():
    # Every matmul of the ViT is found by path: 1 patch embedding, 2 Linear + 2 einsum + 2 Linear per block, head.
    desc = lowbit.describe(lowbit.quantize(_vit(depth=2), "fp8"), jnp.ones((1, 8, 8, 1)))
    assert [f"{d.path}:{d.key}" for d in desc] == [
        "patch_embed:dot_general0",
        *[
            f"blocks/{i}/{op}"
            for i in range(2)
            for op in (
                "attn/qkv:dot_general0",
                "attn:einsum0",
                "attn:einsum1",
                "attn/proj:dot_general0",
                "mlp_in:dot_general0",
                "mlp_out:dot_general0",
            )
        ],
        "head:dot_general0",
    ]
    lowbit_layers = (lowbit.nn.QLinear, lowbit.nn.QEinsum, lowbit.nn.QConv, lowbit.nn.OpState)
    assert not any(isinstance(m, lowbit_layers) for _, m in nnx.iter_modules(_vit()))


def test_patches_are_row_major_tiles():
    model = _vit(patch_size=4)
    images = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
    patches = model._patches(images)
    assert patches.shape == (1, 4, 16)
    # The second patch is the top-right 4x4 tile.
    np.testing.assert_array_equal(patches[0, 1], np.asarray(images[0, :4, 4:, 0]).ravel())


def test_class_token_decides_the_logits():
    # Batch elements are independent: changing one image leaves the other's logits alone.
    model = _vit()
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    changed = x.at[1].set(0.0)
    np.testing.assert_allclose(_forward(model, x)[0], _forward(model, changed)[0], rtol=1e-6)


@pytest.mark.parametrize(("shape", "patch"), [((8, 8, 1), 2), ((28, 28, 1), 4), ((32, 32, 3), 4), ((6, 6, 1), 2)])
def test_default_patch_size(shape, patch):
    assert default_patch_size(shape) == patch


def test_positions_cover_class_token_and_patches():
    model = _vit(patch_size=4)
    assert model.config["patch_size"] == 4
    assert model.pos_embed.shape == (1, 2 * 2 + 1, 16)


def test_config_is_json():
    config = _vit().config
    assert json.loads(json.dumps(config)) == config
    assert config["image_shape"] == [8, 8, 1] and config["dim"] == 16


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(dim=18, heads=4), "divisible by heads"),
        (dict(patch_size=3), "does not divide"),
        (dict(depth=0), "depth"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _vit(**kw)
