"""lowbit.ptq: calibration against known clips, PTQ of a tiny trained ViT and of models written without lowbit,
noise, fine-tuning, data-free images, checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit.nn as lnn
from lowbit import data, formats, quant, recipes
from lowbit.nn import models
from lowbit.nn.quantize import is_quantized, recipe_of
from lowbit.nn.vit import ViT
from lowbit.ptq import PTQConfig, accuracy, load_model, op_sqnr, ptq, quantize_model, save_model, vit
from lowbit.ptq.capture import names, probe
from lowbit.ptq.datafree import patch_similarity_entropy, synthesize
from lowbit.ptq.finetune import FinetuneConfig, finetune
from lowbit.ptq.noise import adaptive_noise, quantization_step, set_noisy_bias, with_noisy_bias
from lowbit.ptq.outlier import outlier_penalty
from lowbit.quant import Absmax, Channel, Fixed, Log2, Twin, Uniform
from lowbit.trainer import loop

PROJ, AV, MLP_OUT = "blocks/0/attn/proj:dot_general0", "blocks/0/attn:einsum1", "blocks/0/mlp_out:dot_general0"
VIT_OPS = [
    "patch_embed:dot_general0",
    "blocks/0/attn/qkv:dot_general0",
    "blocks/0/attn:einsum0",
    AV,
    PROJ,
    "blocks/0/mlp_in:dot_general0",
    MLP_OUT,
    "head:dot_general0",
]


def _calibrated(name, operand, cfg, batches, **kw):
    """The frozen per-tensor quantizer PTQ derives from ``batches`` (the observer path of quantize_model)."""
    q = vit.activation_quantizer(name, operand, cfg, **kw)
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
    q = _calibrated(PROJ, "lhs", PTQConfig(activations="int8"), batches)
    assert isinstance(q.scale, Fixed) and q.scale.step == pytest.approx(9.0 / 127, rel=1e-6)


def test_percentile_clip_of_uniform_data():
    batches = _batches(lambda k: jax.random.uniform(k, (256, 64), minval=-2.0, maxval=2.0))
    q = _calibrated(PROJ, "lhs", PTQConfig(calibration="percentile", percentile=99.0), batches)
    assert q.scale.step * 127 == pytest.approx(0.99 * 2.0, rel=0.01)


@pytest.mark.parametrize(("bits", "lo", "hi"), [(4, 2.2, 2.9), (8, 3.5, 5.5)])
def test_mse_clip_of_a_gaussian_matches_the_known_optimum(bits, lo, hi):
    # Banner et al. (ACIQ): the MSE-optimal clip of N(0, 1) is ~2.55 sigma at 4 bits, ~4 sigma at 8 bits.
    batches = _batches(lambda k: jax.random.normal(k, (512, 64)))
    q = _calibrated(PROJ, "lhs", PTQConfig(activations=f"int{bits}", calibration="mse"), batches)
    assert lo < q.scale.step * (2 ** (bits - 1) - 1) < hi


def test_mse_clip_of_uniform_data_is_its_range():
    batches = _batches(lambda k: jax.random.uniform(k, (256, 64), minval=-1.0, maxval=1.0))
    q = _calibrated(PROJ, "lhs", PTQConfig(activations="int4", calibration="mse"), batches)
    assert q.scale.step * 7 > 0.93  # nothing to clip: the optimum is (close to) the absmax


def test_kl_clip_cuts_a_heavy_tail():
    batches = _batches(lambda k: jax.random.laplace(k, (256, 64)))
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    q8 = _calibrated(PROJ, "lhs", PTQConfig(calibration="kl"), batches)
    q4 = _calibrated(PROJ, "lhs", PTQConfig(activations="int4", calibration="kl"), batches)
    assert 4.0 < q4.scale.step * 7 < q8.scale.step * 127 < 0.9 * amax  # fewer levels, tighter clip


def test_nonnegative_operands_get_the_unsigned_grid():
    probs = _batches(lambda k: jax.nn.softmax(jax.random.normal(k, (8, 2, 16, 16)), axis=-1))
    q = _calibrated(AV, "lhs", PTQConfig(activations="int4"), probs, nonnegative=True)
    assert q.format.name == "uint4" and q.scale.step == pytest.approx(float(max(jnp.max(p) for p in probs)) / 15)


def test_twin_gelu_gives_the_negative_side_a_fine_step():
    batches = _batches(lambda k: jax.nn.gelu(3 * jax.random.normal(k, (256, 64))))
    q = _calibrated(MLP_OUT, "lhs", PTQConfig(activations="int8", gelu="twin"), batches)
    fine = q.scale.step * 2.0**-q.kind.shift
    assert isinstance(q.kind, Twin) and fine * 127 >= 0.17 > fine * 127 / 2  # covers GELU's minimum, tightly


def test_vit_options_land_on_the_ops_the_regexes_name():
    cfg = PTQConfig(softmax="log2", gelu="twin", layernorm="channel")
    assert vit.activation_quantizer(AV, "lhs", cfg).kind == Log2()
    assert vit.activation_quantizer("blocks/3/attn:einsum0", "lhs", cfg).kind == Uniform()  # QK^T: not softmax
    assert vit.activation_quantizer(MLP_OUT, "lhs", cfg).kind == Twin(split="sign")
    assert vit.activation_quantizer(AV, "rhs", cfg).kind == Uniform()  # V
    assert vit.layernorm_of("blocks/2/attn/qkv:dot_general0", cfg) == "blocks/2/norm1"
    assert vit.layernorm_of("head:dot_general0", cfg) == "norm" and vit.layernorm_of(PROJ, cfg) is None
    assert vit.activation_quantizer("head:dot_general0", "lhs", cfg, after_layernorm=True).granularity == Channel()
    # A model's own names: a softmax inside "mixer" modules.
    own = PTQConfig(softmax="log2", softmax_ops=r"mixer/\d+:einsum1")
    assert vit.activation_quantizer("mixer/4:einsum1", "lhs", own).kind == Log2()
    assert vit.activation_quantizer(AV, "lhs", own).kind == Uniform()


@pytest.mark.slow  # end to end on a trained ViT
def test_default_regexes_fit_the_built_in_vit_only():
    x = jnp.zeros((1, 8, 8, 1))
    assert names(probe(_vit(), x)) == VIT_OPS
    cfg = PTQConfig()
    for spec in ("mlp", "cnn"):
        ops = names(probe(models.build(spec, image_shape=(8, 8, 1), num_classes=10, seed=0), x))
        import re

        assert not any(re.fullmatch(cfg.softmax_ops, n) or re.fullmatch(cfg.gelu_ops, n) for n in ops), ops


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(softmax_ops="("), "softmax_ops"),
        (dict(layernorm_ops=(("qkv",),)), "layernorm_ops"),
        (dict(dynamic=True, layernorm="channel"), "layernorm"),
        (dict(noisy_bias=1), "noisy_bias"),
        (dict(dynamic=True, noisy_bias=True), "noisy_bias"),
    ],
)
def test_bad_config(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PTQConfig(**fields)


@nnx.jit
def _forward(model, x):
    return model(x)


def test_layernorm_folding_leaves_the_float_model_unchanged():
    model = _vit(seed=1)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    before = _forward(model, x)
    kernel = model.blocks[0].attn.qkv.kernel
    r = np.exp2(np.random.default_rng(1).integers(0, 4, kernel.shape[0])).astype(np.float32)
    vit.fold_layernorm(vit.module_at(model, "blocks/0/norm1"), kernel, r, axis=0)
    np.testing.assert_allclose(_forward(model, x), before, rtol=1e-5, atol=1e-5)


# ----- a tiny trained ViT -------------------------------------------------------------------------------------
def _vit(seed=0):
    return ViT(
        image_shape=(8, 8, 1), num_classes=10, patch_size=4, dim=32, depth=1, heads=2, mlp_dim=64, rngs=nnx.Rngs(seed)
    )


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny ViT trained for a few seconds on the bundled digits (about 94% test accuracy)."""
    model = _vit()
    loop.train(
        model, digits, recipe=recipes.get("fp32"), epochs=6, batch_size=64, learning_rate=1e-2, warmup=1, progress=False
    )
    return model


def test_save_and_load_round_trip(trained, digits, tmp_path):
    save_model(trained, tmp_path, 3, dict(dataset="digits", note="kept"))
    restored, meta = load_model(tmp_path)  # the run directory: finds checkpoints/epoch_0003
    assert meta["dataset"] == "digits" and meta["note"] == "kept" and meta["model"]["type"] == "ViT"
    x = jnp.asarray(digits.x_test[:8])
    np.testing.assert_array_equal(_forward(restored, x), _forward(trained, x))


def test_load_the_float_weights_of_a_quantized_run(digits, tmp_path):
    """A checkpoint of quantized training (an MLP in fp8, quantizer state included) gives its float model."""
    model = models.build("mlp", image_shape=(8, 8, 1), num_classes=10, seed=0)
    qmodel = lnn.quantize(model, "int8_lsq")  # LSQ steps: quantizer parameters in the checkpoint
    small = dataclasses.replace(digits, x_train=digits.x_train[:256], y_train=digits.y_train[:256])
    loop.train(qmodel, small, recipe=recipes.get("int8_lsq"), epochs=1, batch_size=64, out_dir=tmp_path, progress=False)
    restored, meta = load_model(tmp_path)
    assert meta["recipe"] == "int8_lsq" and not is_quantized(restored) and type(restored) is models.MLP
    for float_layer, trained_layer in ((restored.head, qmodel.head), (restored.hidden[0], qmodel.hidden[0])):
        np.testing.assert_array_equal(float_layer.kernel[...], trained_layer.kernel[...])
        np.testing.assert_array_equal(float_layer.bias[...], trained_layer.bias[...])
    assert not np.array_equal(restored.head.kernel[...], model.head.kernel[...])  # trained, not the init


@pytest.fixture(scope="module")
def w8a8(trained, digits):
    return ptq(trained, digits, PTQConfig(samples=128))


def test_w8a8_keeps_accuracy(trained, w8a8):
    quantized, metrics = w8a8
    assert metrics["float_accuracy"] > 0.85
    assert metrics["test_accuracy"] >= metrics["float_accuracy"] - 0.01
    rows = metrics["ops"]
    assert [r["name"] for r in rows] == VIT_OPS
    assert all(r["sqnr_db"] > 25 and r["rhs_sqnr_db"] > 35 for r in rows)
    # Every op got its own frozen activation scales; the original model is untouched (still float).
    rules = recipe_of(quantized).rules
    assert len(rules) == len(VIT_OPS) and all(isinstance(r.dot.lhs.scale, Fixed) for r in rules)
    assert len({r.dot.lhs.scale.step for r in rules}) == len(rules)
    assert not is_quantized(trained)
    # Pixels and softmax probabilities are never negative: the unsigned grid.
    by_name = {r["name"]: r for r in rows}
    assert by_name[AV]["lhs"].startswith("uint8") and by_name[VIT_OPS[0]]["lhs"].startswith("uint8")
    assert by_name[PROJ]["lhs"].startswith("int8")
    assert {d.path + ":" + d.key for d in lnn.describe(quantized)} == set(VIT_OPS)


@pytest.mark.slow  # end to end on a trained ViT
def test_w4a4_with_every_vit_option(trained, digits, w8a8):
    cfg = PTQConfig(
        weights="int4", activations="int4", softmax="twin", gelu="twin", layernorm="ptf", noisy_bias=True, samples=128
    )
    quantized, rows = quantize_model(trained, digits.x_train[:128], cfg)
    by_name = {r["name"]: r for r in rows}
    assert "twin(magnitude" in by_name[AV]["lhs"] and "twin(sign" in by_name[MLP_OUT]["lhs"]
    assert by_name["blocks/0/attn/qkv:dot_general0"]["fold_ratio_max"] >= 1 and "noisy_bias" in by_name[PROJ]
    assert "fold_ratio_max" not in by_name[PROJ] and "noisy_bias" not in by_name[AV]  # einsums take no noise
    assert 0.3 < accuracy(quantized, digits.x_test, digits.y_test) <= w8a8[1]["test_accuracy"] + 0.01


def test_noisy_bias_is_removed_from_the_result():
    """Q(x + N) Q(W) - N Q(W): a zero noise is the plain quantized op; a small one stays close to it."""
    model = _UserModel(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 8, 8, 1)), jnp.float32)
    plain, rows = quantize_model(model, x, PTQConfig(weights="int4", activations="int4", samples=16))
    step = rows[1]["step"]  # the raw ``x @ w`` op
    outputs = []
    for noise in (jnp.zeros(128), jnp.full(128, 0.3 * step)):
        noisy = with_noisy_bias(nnx.clone(plain))
        set_noisy_bias(
            noisy.lowbit_dot_general0, noise, jnp.round(noisy.w[...] * 7 / jnp.max(jnp.abs(noisy.w[...]), axis=0))
        )
        outputs.append(_forward(noisy, x))
    # Zero noise and its zero correction: bit-identical to the plain model.
    np.testing.assert_array_equal(outputs[0], _forward(plain, x))
    assert not np.array_equal(outputs[1], outputs[0])


def test_dynamic_activations(trained, digits):
    quantized, rows = quantize_model(trained, digits.x_train[:64], PTQConfig(dynamic=True))
    lhs = recipe_of(quantized).rules[1].dot.lhs
    assert lhs.scale == Absmax() and not lhs.static and all("step" not in r for r in rows)
    assert accuracy(quantized, digits.x_test, digits.y_test) > 0.8


# ----- any model: a CNN with a raw einsum head and a raw @ ------------------------------------------------------
class _Head(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (32, 10)) * 0.2)

    def __call__(self, x):
        return jnp.einsum("bd,dk->bk", x, self.w[...])


class _UserModel(nnx.Module):
    """Written without lowbit: nnx.Conv, a raw ``@`` on its own parameter, a raw einsum head in a submodule."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (128, 32)) * 0.1)
        self.b = nnx.Param(jnp.zeros((32,)))
        self.head = _Head(rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.head(jax.nn.gelu(x @ self.w[...] + self.b[...]))


def test_ptq_of_a_user_model_more_bits_less_error():
    model = _UserModel(nnx.Rngs(0))
    x = np.random.default_rng(0).uniform(size=(32, 8, 8, 1)).astype(np.float32)
    sqnr = {}
    for bits in (8, 4):
        quantized, rows = quantize_model(
            model, x, PTQConfig(weights=f"int{bits}", activations=f"int{bits}", samples=32)
        )
        assert [r["name"] for r in rows] == ["conv:conv0", ":dot_general0", "head:einsum0"]
        sqnr[bits] = {r["name"]: r for r in op_sqnr(model, quantized, x[:16])}
    for name, row in sqnr[8].items():
        # Each bit halves the step: ~6 dB per bit, so 4 bits lose well over 12 dB.
        assert row["sqnr_db"] > sqnr[4][name]["sqnr_db"] + 12 and row["sqnr_db"] > 30, (name, row)
        assert row["lhs_sqnr_db"] > sqnr[4][name]["lhs_sqnr_db"] + 12
    # The model is untouched and still float; the copy exports its three weights.
    assert not is_quantized(model)
    assert set(lnn.export.export(quantized, "int8")) == {"conv:conv0", ":dot_general0", "head:einsum0"}


def test_finetune_a_user_model(digits):
    model = _UserModel(nnx.Rngs(0))
    before = np.asarray(model.w[...])
    subset = dataclasses.replace(digits, x_train=digits.x_train[:128], y_train=digits.y_train[:128])
    stats = finetune(model, subset, FinetuneConfig(method="both", epochs=1, batch_size=64, learning_rate=1e-3))
    assert not np.allclose(before, model.w[...]) and stats["history"][0]["penalty"] > 0
    assert not is_quantized(model)


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
@pytest.mark.slow  # end to end on a trained ViT
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


@pytest.mark.slow  # end to end on a trained ViT
def test_synthetic_images_calibrate(trained, digits, w8a8):
    images = synthesize(trained, 64, steps=10, batch_size=64)  # one batch of the shape w8a8 calibrated on
    assert images.shape == (64, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    quantized, _ = quantize_model(trained, images, PTQConfig(samples=64))
    assert accuracy(quantized, digits.x_test, digits.y_test) > w8a8[1]["float_accuracy"] - 0.05


def test_synthesize_needs_feature_ops():
    cnn = models.build("cnn", image_shape=(8, 8, 1), num_classes=10, seed=0)
    with pytest.raises(ValueError, match="matches no op"):
        synthesize(cnn, 4, steps=1)
    images = synthesize(cnn, 4, steps=2, feature_ops="conv2:conv0", skip_tokens=0)  # its spatial features
    assert images.shape == (4, 8, 8, 1)
