"""lowbit.ptq: calibration against known clips, PTQ of a tiny trained ViT, noise, fine-tuning, data-free images."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit import data, formats, quant
from lowbit.nn.vit import ViT
from lowbit.ptq import PTQConfig, accuracy, load_vit, ptq, quantize_vit, save_vit, vit
from lowbit.ptq.capture import quantized_layers
from lowbit.ptq.datafree import patch_similarity_entropy, synthesize
from lowbit.ptq.finetune import FinetuneConfig, finetune
from lowbit.ptq.noise import adaptive_noise, quantization_step
from lowbit.ptq.outlier import outlier_penalty
from lowbit import recipes
from lowbit.trainer import loop


def _calibrated(role, operand, cfg, batches):
    """The frozen per-tensor quantizer PTQ derives from ``batches`` (the observer path of quantize_vit)."""
    q = vit.activation_quantizer(role, operand, cfg)
    obs = quant.observer(q)
    state = obs.init(batches[0])
    for b in batches:
        state = obs.update(state, b)
    return vit.fixed_quantizer(q, obs.scale(state))


def _batches(sample, n=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [sample(k) for k in keys]


# ----- calibration: clips of known distributions ---------------------------------------------------------------
def test_absmax_clip_is_the_running_max():
    batches = _batches(lambda k: jax.random.normal(k, (64, 32)))
    batches[2] = batches[2].at[3, 5].set(-9.0)  # the largest magnitude, in one batch only
    q = _calibrated("proj", "lhs", PTQConfig(activations="int8"), batches)
    assert q.scale == "fixed" and q.fixed_scale == pytest.approx(9.0 / 127, rel=1e-6)


def test_percentile_clip_of_uniform_data():
    batches = _batches(lambda k: jax.random.uniform(k, (256, 64), minval=-2.0, maxval=2.0))
    q = _calibrated("proj", "lhs", PTQConfig(calibration="percentile", percentile=99.0), batches)
    assert q.fixed_scale * 127 == pytest.approx(0.99 * 2.0, rel=0.01)


@pytest.mark.parametrize(("bits", "lo", "hi"), [(4, 2.2, 2.9), (8, 3.5, 5.5)])
def test_mse_clip_of_a_gaussian_matches_the_known_optimum(bits, lo, hi):
    # Banner et al. (ACIQ): the MSE-optimal clip of N(0, 1) is ~2.55 sigma at 4 bits, ~4 sigma at 8 bits.
    batches = _batches(lambda k: jax.random.normal(k, (512, 64)))
    q = _calibrated("proj", "lhs", PTQConfig(activations=f"int{bits}", calibration="mse"), batches)
    assert lo < q.fixed_scale * (2 ** (bits - 1) - 1) < hi


def test_mse_clip_of_uniform_data_is_its_range():
    batches = _batches(lambda k: jax.random.uniform(k, (256, 64), minval=-1.0, maxval=1.0))
    q = _calibrated("proj", "lhs", PTQConfig(activations="int4", calibration="mse"), batches)
    assert q.fixed_scale * 7 > 0.93  # nothing to clip: the optimum is (close to) the absmax


def test_kl_clip_cuts_a_heavy_tail():
    batches = _batches(lambda k: jax.random.laplace(k, (256, 64)))
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    q8 = _calibrated("proj", "lhs", PTQConfig(calibration="kl"), batches)
    q4 = _calibrated("proj", "lhs", PTQConfig(activations="int4", calibration="kl"), batches)
    assert 4.0 < q4.fixed_scale * 7 < q8.fixed_scale * 127 < 0.9 * amax  # fewer levels, tighter clip


def test_nonnegative_operands_get_the_unsigned_grid():
    probs = _batches(lambda k: jax.nn.softmax(jax.random.normal(k, (8, 2, 16, 16)), axis=-1))
    q = _calibrated("attn_av", "lhs", PTQConfig(activations="int4"), probs)
    assert q.format.name == "uint4" and q.fixed_scale == pytest.approx(float(max(jnp.max(p) for p in probs)) / 15)


def test_twin_gelu_gives_the_negative_side_a_fine_step():
    batches = _batches(lambda k: jax.nn.gelu(3 * jax.random.normal(k, (256, 64))))
    q = _calibrated("mlp_out", "lhs", PTQConfig(activations="int8", gelu="twin"), batches)
    fine = q.fixed_scale * 2.0**-q.twin_shift
    assert q.kind == "twin_uniform" and fine * 127 >= 0.17 > fine * 127 / 2  # covers GELU's minimum, tightly


@nnx.jit
def _forward(model, x):
    return model(x)


def test_layernorm_folding_leaves_the_float_model_unchanged():
    model = _vit(seed=1)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    before = _forward(model, x)
    layer = model.blocks[0].attn.qkv
    r = np.exp2(np.random.default_rng(1).integers(0, 4, layer.kernel.shape[0])).astype(np.float32)
    vit.fold_layernorm(vit.input_norm(model, "blocks.0.attn.qkv"), layer.kernel, r)
    np.testing.assert_allclose(_forward(model, x), before, rtol=1e-5, atol=1e-5)


# ----- a tiny trained ViT -------------------------------------------------------------------------------------
def _vit(seed=0):
    return ViT(image_shape=(8, 8, 1), num_classes=10, patch_size=4, dim=32, depth=1, heads=2, mlp_dim=64,
               recipe=recipes.get("fp32"), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny ViT trained for a few seconds on the bundled digits (about 94% test accuracy)."""
    model = _vit()
    loop.train(model, digits, recipe=recipes.get("fp32"), epochs=6, batch_size=64, learning_rate=1e-2, warmup=1,
               progress=False)
    return model


def test_save_and_load_round_trip(trained, digits, tmp_path):
    save_vit(trained, tmp_path, 3, dict(dataset="digits", note="kept"))
    restored, meta = load_vit(tmp_path)  # the run directory: finds checkpoints/epoch_0003
    assert meta["dataset"] == "digits" and meta["note"] == "kept" and meta["model"]["type"] == "ViT"
    x = jnp.asarray(digits.x_test[:8])
    np.testing.assert_array_equal(_forward(restored, x), _forward(trained, x))


@pytest.fixture(scope="module")
def w8a8(trained, digits):
    return ptq(trained, digits, PTQConfig(samples=128))


def test_w8a8_keeps_accuracy(trained, w8a8):
    quantized, metrics = w8a8
    assert metrics["float_accuracy"] > 0.85
    assert metrics["test_accuracy"] >= metrics["float_accuracy"] - 0.01
    layers = metrics["layers"]
    assert [r["role"] for r in layers] == ["patch", "qkv", "attn_qk", "attn_av", "proj", "mlp_in", "mlp_out", "head"]
    assert all(r["sqnr_db"] > 25 and r["rhs_sqnr_db"] > 35 for r in layers)
    # Every layer instance got frozen activation scales; the original model is untouched.
    assert all(q.layer.dot.lhs.scale == "fixed" for q in quantized_layers(quantized).values())
    assert all(q.layer.dot.lhs is None for q in quantized_layers(trained).values())


def test_w4a4_with_every_vit_option(trained, digits, w8a8):
    cfg = PTQConfig(weights="int4", activations="int4", softmax="twin", gelu="twin",
                    layernorm="ptf", noisy_bias=True, samples=128)
    quantized = nnx.clone(trained)
    rows = quantize_vit(quantized, digits.x_train[:128], cfg)
    by_role = {r["role"]: r for r in rows}
    assert "twin_uniform" in by_role["attn_av"]["lhs"] and "twin_uniform" in by_role["mlp_out"]["lhs"]
    assert by_role["qkv"]["fold_ratio_max"] >= 1 and "noisy_bias" in by_role["proj"]
    assert 0.3 < accuracy(quantized, digits.x_test, digits.y_test) <= w8a8[1]["test_accuracy"] + 0.01


def test_dynamic_activations(trained, digits):
    quantized = nnx.clone(trained)
    quantize_vit(quantized, digits.x_train[:64], PTQConfig(dynamic=True, layernorm="channel"))
    lhs = quantized_layers(quantized)["blocks.0.attn.qkv"].layer.dot.lhs
    assert lhs.granularity == "channel" and lhs.scale == "absmax" and not lhs.static
    assert accuracy(quantized, digits.x_test, digits.y_test) > 0.8


# ----- noise -------------------------------------------------------------------------------------------------
def test_noise_scale_follows_the_per_channel_quantization_step():
    w = jax.random.normal(jax.random.key(0), (64, 8)) * jnp.arange(1, 9, dtype=jnp.float32)  # channel c: scale c+1
    step = quantization_step(w, formats.get("int4"), (0,))
    np.testing.assert_allclose(step, jnp.broadcast_to(jnp.max(jnp.abs(w), axis=0) / 7, w.shape), rtol=1e-6)
    draw = jax.jit(jax.vmap(lambda k: adaptive_noise(k, w, formats.get("int4"), (0,))))
    noise = draw(jax.random.split(jax.random.key(1), 64))
    assert bool(jnp.all(jnp.abs(noise) <= step / 2))
    # Uniform on one step: std = step / sqrt(12), channel by channel.
    np.testing.assert_allclose(jnp.std(noise, axis=(0, 1)), step[0] / np.sqrt(12), rtol=0.05)


def test_float_format_noise_grows_with_the_binade():
    # float4_e2m1fn values 0, .5, 1, 1.5, 2, 3, 4, 6; scale = absmax / 6 = 1 here.
    x = jnp.asarray([6.0, 0.2, 1.2, 2.5, 4.5], jnp.float32)
    np.testing.assert_allclose(quantization_step(x, formats.get("float4_e2m1fn")), [2.0, 0.5, 0.5, 1.0, 2.0])


def test_outlier_penalty_shrinks_the_range_ratio():
    x = jnp.ones((100,)).at[0].set(20.0)
    assert float(outlier_penalty(jnp.ones((100,)))) == 0.0
    # One outlier among 100 or among 10000 weighs the same: the mean runs over the outliers.
    big = jnp.ones((10000,)).at[0].set(200.0)
    assert float(outlier_penalty(big)) > float(outlier_penalty(x)) > 0
    grad = jax.grad(outlier_penalty)(x)
    assert float(grad[0]) > 0 > float(grad[1])  # descent pulls the outlier in and widens the bulk


# ----- fine-tuning ---------------------------------------------------------------------------------------------
def test_finetune_changes_the_weights(trained, digits):
    model = nnx.clone(trained)
    before = np.asarray(model.blocks[0].mlp_in.kernel[...])
    subset = dataclasses.replace(digits, x_train=digits.x_train[:128], y_train=digits.y_train[:128])
    stats = finetune(model, subset, FinetuneConfig(method="both", epochs=1, batch_size=64, learning_rate=1e-3))
    after = np.asarray(model.blocks[0].mlp_in.kernel[...])
    assert np.all(np.isfinite(after)) and not np.allclose(before, after)
    assert stats["history"][0]["penalty"] > 0 and stats["float_accuracy"] > 0.5


# ----- data-free ---------------------------------------------------------------------------------------------
def test_patch_similarity_entropy_is_higher_for_diverse_patches():
    same = jnp.ones((1, 16, 8))
    diverse = jax.random.normal(jax.random.key(0), (1, 16, 8))
    entropy = jax.jit(patch_similarity_entropy)
    assert float(entropy(diverse)) > float(entropy(same)) + 1


def test_synthetic_images_calibrate(trained, digits, w8a8):
    model = trained
    images = synthesize(model, 64, steps=10, batch_size=64)  # one batch of the shape w8a8 calibrated on
    assert images.shape == (64, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    quantized = nnx.clone(model)
    quantize_vit(quantized, images, PTQConfig(samples=64))
    assert accuracy(quantized, digits.x_test, digits.y_test) > w8a8[1]["float_accuracy"] - 0.05
