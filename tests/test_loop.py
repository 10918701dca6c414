"""lowbit.trainer.loop and checkpoint: learning, bit-exact resume, checkpoint errors, data parallel."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from lowbit.data import Dataset
from lowbit.nn import QLinear
from lowbit import recipes
from lowbit.trainer import checkpoint, loop
from lowbit.trainer.checkpoint import CheckpointError


class Tiny(nnx.Module):
    """Two quantized layers and dropout: params, quantizer state and RNG streams."""

    def __init__(self, recipe, seed=0):
        rngs = nnx.Rngs(seed)
        self.fc1 = QLinear(16, 16, recipe=recipe, role="mlp_in", rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = QLinear(16, 2, recipe=recipe, role="head", rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))))


def _toy(n_train=64, n_test=40):
    """Noisy 4x4 images; the left half is dark for class 0 and bright for class 1."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n_train + n_test).astype(np.int32)
    x = rng.uniform(-0.5, 0.5, size=(n_train + n_test, 4, 4, 1)).astype(np.float32)
    x[:, :, :2] += y[:, None, None, None] - 0.5
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=2, name="toy")


_HP = dict(epochs=2, batch_size=16, seed=3, learning_rate=1e-2, weight_decay=0.01, warmup=0.5, progress=False)


def _leaves(model):
    """Every state leaf as a numpy array (PRNG keys as their raw data)."""
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(nnx.state(model))]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp4 (GradScale, PACT, SAWB): one uninterrupted 2-epoch run and one killed after epoch 1, then resumed."""
    recipe = recipes.get("fp4")
    full_dir, cut_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut")
    full = Tiny(recipe)
    full_metrics = loop.train(full, _toy(), recipe=recipe, out_dir=full_dir, **_HP)

    real_save = checkpoint.save

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise _Stop  # as if the process were killed right after the first checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(_Stop):
            loop.train(Tiny(recipe), _toy(), recipe=recipe, out_dir=cut_dir, **_HP)
    resumed = Tiny(recipe, seed=99)  # the restored state must replace every initial value
    resumed_metrics = loop.train(resumed, _toy(), recipe=recipe, out_dir=cut_dir, resume=True, **_HP)
    return dict(full=full, full_metrics=full_metrics, full_dir=full_dir, resumed=resumed,
                resumed_metrics=resumed_metrics)


def test_training_reduces_loss():
    recipe = recipes.get("fp32")
    metrics = loop.train(Tiny(recipe), _toy(), recipe=recipe, out_dir=None, **(_HP | dict(epochs=8)))
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < 0.6 * losses[0]
    assert metrics["test_accuracy"] >= 0.8


def test_resume_is_bit_exact(runs):
    for a, b in zip(_leaves(runs["full"]), _leaves(runs["resumed"]), strict=True):
        np.testing.assert_array_equal(a, b)
    full, resumed = runs["full_metrics"]["history"], runs["resumed_metrics"]["history"]
    assert [(h["loss"], h["test_accuracy"]) for h in full] == [(h["loss"], h["test_accuracy"]) for h in resumed]


def test_gradscale_state_is_overwritten(runs):
    # The fp4 recipe's GradScale starts at 1 and is replaced by the backward pass.
    assert float(runs["full"].fc1.grad_scale[...]) != 1.0


def test_metrics_curves_and_checkpoint_files(runs):
    out = runs["full_dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("recipe", "dataset", "epochs", "seed", "test_accuracy", "train_time_s", "step_time_ms",
                "final_loss", "history", "skipped_steps"):
        assert key in metrics
    assert set(metrics["history"][0]) >= {"loss", "train_acc", "test_accuracy", "time_s"}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["step_time_ms"] > 0
    assert (out / "curves.png").stat().st_size > 0
    # Only the last checkpoint is kept, and nothing half-written is left behind.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0002"]
    meta = json.loads((out / "checkpoints" / "epoch_0002" / "metadata.json").read_text())
    assert meta["recipe"] == "fp4" and meta["dataset"] == "toy" and meta["epoch"] == 2
    assert meta["model"]["type"] == "Tiny" and "lowbit_version" in meta


def test_nonfinite_steps_are_skipped():
    data = _toy()
    data.x_train[5, 0, 0, 0] = np.inf  # one poisoned example: its batch's gradients are NaN
    recipe = recipes.get("fp32")
    model = Tiny(recipe)
    metrics = loop.train(model, data, recipe=recipe, out_dir=None, **_HP)
    assert metrics["skipped_steps"] == 2  # the poisoned batch, once per epoch
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _copy_run(runs, tmp_path):
    shutil.copytree(runs["full_dir"], tmp_path, dirs_exist_ok=True)
    return tmp_path / "checkpoints" / "epoch_0002"


def test_truncated_array_file_is_an_error(runs, tmp_path):
    ckpt = _copy_run(runs, tmp_path)
    biggest = max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    recipe = recipes.get("fp4")
    with pytest.raises(CheckpointError, match="epoch_0002"):
        loop.train(Tiny(recipe), _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **_HP)


def test_truncated_metadata_is_an_error(runs, tmp_path):
    meta = _copy_run(runs, tmp_path) / "metadata.json"
    meta.write_text(meta.read_text()[:100])
    recipe = recipes.get("fp4")
    with pytest.raises(CheckpointError, match="metadata.json"):
        loop.train(Tiny(recipe), _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **_HP)


@pytest.mark.parametrize(("recipe", "change", "match"),
                         [("fp32", {}, "recipe is 'fp4' there but 'fp32'"),
                          ("fp4", dict(learning_rate=0.5), "hparams.learning_rate is 0.01 there but 0.5")])
def test_incompatible_checkpoint_is_an_error(runs, tmp_path, recipe, change, match):
    _copy_run(runs, tmp_path)
    recipe = recipes.get(recipe)
    with pytest.raises(CheckpointError, match=match):
        loop.train(Tiny(recipe), _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **(_HP | change))


def test_structure_mismatch_is_an_error(tmp_path):
    tree = {"w": np.zeros((2, 3), np.float32)}
    path = checkpoint.save(tmp_path, 1, tree, dict(recipe="x"))
    with pytest.raises(CheckpointError, match=r"'w' is float32\[2, 3\] there, float32\[3, 3\]"):
        checkpoint.restore(path, {"w": np.zeros((3, 3), np.float32)}, dict(recipe="x"))


_DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from lowbit.data import Dataset
    from lowbit.nn.vit import ViT
    from lowbit import recipes
    from lowbit.trainer import loop

    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    data = Dataset(x, y, x[:8], y[:8], num_classes=10, name="random")
    recipe = recipes.get("fp4")
    saved = []
    for devices in (1, 4):
        model = ViT(image_shape=(8, 8, 1), num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32,
                    recipe=recipe, rngs=nnx.Rngs(0))
        out = f"{sys.argv[1]}/devices{devices}"
        loop.train(model, data, recipe=recipe, epochs=1, batch_size=16, warmup=0, devices=devices,
                   out_dir=out, progress=False)
        with ocp.StandardCheckpointer() as ckpt:  # every saved leaf, without a template
            saved.append({k: np.asarray(v) for k, v in ckpt.restore(f"{out}/checkpoints/epoch_0001/state").items()})
    np.savez(f"{sys.argv[1]}/states.npz", **{f"{d}:{k}": v for d, s in zip((1, 4), saved) for k, v in s.items()})
""")


def test_one_and_four_devices_agree(tmp_path):
    # fp4 has every kind of quantizer state: amax scales, SAWB, PACT clips and GradScale.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = np.load(tmp_path / "states.npz")
    one = {k[2:]: states[k] for k in states.files if k.startswith("1:")}
    four = {k[2:]: states[k] for k in states.files if k.startswith("4:")}
    assert one.keys() == four.keys()
    moments = [k for k in one if "/mu/" in k]
    assert len(moments) > 10
    for key in moments:  # Adam's first moment after one step is 0.1 * the global gradient
        np.testing.assert_allclose(one[key], four[key], rtol=1e-4, atol=1e-6 * np.abs(one[key]).max(), err_msg=key)
    for key in (k for k in one if k.startswith("params/")):
        mu = np.abs(one[key.replace("params/", "opt_state/inner_state/0/mu/", 1)])
        # Adam's first step is lr * g / (|g| + eps): where the true gradient is zero (the
        # key bias; softmax ignores shifts) rounding noise decides it, so skip those.
        settled = mu > 1e-6 * mu.max()
        np.testing.assert_allclose(one[key][settled], four[key][settled], rtol=0, atol=1e-6, err_msg=key)
    for key in (k for k in one if k.startswith(("overwrite/", "rest/", "loss_scale/"))):
        np.testing.assert_array_equal(one[key], four[key], err_msg=key)  # GradScale, RNG streams
