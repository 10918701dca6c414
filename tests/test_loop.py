"""lowbit.trainer.loop and checkpoint: learning, bit-exact resume, checkpoint errors, data parallel."""

import contextlib
import io
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import linen, nnx
from flax.nnx import bridge

from lowbit import data as lowbit_data
from lowbit import recipes
from lowbit.data import Dataset
from lowbit.nn import quantize
from lowbit.nn.variables import OverwriteWithGradient
from lowbit.trainer import checkpoint, loop
from lowbit.trainer.checkpoint import CheckpointError, IncompatibleCheckpointError


class Tiny(nnx.Module):
    """Three stock layers and dropout; quantized, the middle one gets GradScale: params, quantizer state, RNG."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.fc1 = nnx.Linear(16, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.fc3 = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        h = self.drop(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc3(jax.nn.relu(self.fc2(h)))


def _model(recipe, seed=0):
    """``Tiny`` quantized by ``recipe`` (the loop discovers its ops and creates their state)."""
    return quantize(Tiny(seed), recipe)


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
    return [
        np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(nnx.state(model))
    ]


class _Stop(Exception):
    pass


def _interrupt_after(k, sig):
    """``lowbit.data.batches`` that sends ``sig`` to this process as the loop asks for its (k+1)-th batch.

    Python runs the handler before the generator resumes, so the loop sees the
    request right after that batch's step: exactly k + 1 steps run.
    """
    real, count = lowbit_data.batches, 0

    def batches(*args, **kw):
        nonlocal count
        for item in real(*args, **kw):
            if count == k:
                os.kill(os.getpid(), sig)
            count += 1
            yield item

    return batches


def _quiet_train(*args, **kw):
    """``loop.train`` with its stdout captured: (metrics, printed text)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = loop.train(*args, **kw)
    return metrics, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp4 (GradScale, PACT, SAWB), 2 epochs of 4 steps: uninterrupted; killed after epoch 1 and resumed;
    stopped by SIGINT in epoch 1 and by SIGTERM in epoch 2, resumed each time."""
    recipe = recipes.get("fp4")
    full_dir, cut_dir, sig_dir = (tmp_path_factory.mktemp(n) for n in ("full", "cut", "sig"))
    full = _model(recipe)
    full_metrics = loop.train(full, _toy(), recipe=recipe, out_dir=full_dir, **_HP)

    real_save = checkpoint.save

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise _Stop  # as if the process were killed right after the first checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(_Stop):
            loop.train(_model(recipe), _toy(), recipe=recipe, out_dir=cut_dir, **_HP)
    resumed = _model(recipe, seed=99)  # the restored state must replace every initial value
    resumed_metrics = loop.train(resumed, _toy(), recipe=recipe, out_dir=cut_dir, resume=True, **_HP)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signalled, printed, listed = [], [], []
    for k, sig, resume in ((1, signal.SIGINT, False), (5, signal.SIGTERM, True)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lowbit_data, "batches", _interrupt_after(k, sig))
            metrics, text = _quiet_train(_model(recipe), _toy(), recipe=recipe, out_dir=sig_dir, resume=resume, **_HP)
        signalled.append(metrics)
        printed.append(text)
        listed.append(sorted(p.name for p in (sig_dir / "checkpoints").iterdir()))
    after_signals = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sig_model = _model(recipe, seed=98)
    sig_metrics, text = _quiet_train(sig_model, _toy(), recipe=recipe, out_dir=sig_dir, resume=True, **_HP)
    printed.append(text)
    return dict(
        full=full,
        full_metrics=full_metrics,
        full_dir=full_dir,
        resumed=resumed,
        resumed_metrics=resumed_metrics,
        signalled=signalled,
        printed=printed,
        listed=listed,
        handlers=(handlers, after_signals),
        sig_model=sig_model,
        sig_metrics=sig_metrics,
        sig_dir=sig_dir,
    )


def test_training_reduces_loss():
    recipe = recipes.get("fp32")
    metrics = loop.train(_model(recipe), _toy(), recipe=recipe, out_dir=None, **(_HP | dict(epochs=8)))
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < 0.6 * losses[0]
    assert metrics["test_accuracy"] >= 0.8


def test_resume_is_bit_exact(runs):
    for a, b in zip(_leaves(runs["full"]), _leaves(runs["resumed"]), strict=True):
        np.testing.assert_array_equal(a, b)
    full, resumed = runs["full_metrics"]["history"], runs["resumed_metrics"]["history"]
    assert [(h["loss"], h["test_accuracy"]) for h in full] == [(h["loss"], h["test_accuracy"]) for h in resumed]


def test_signals_stop_cleanly_and_resume_bit_exact(runs):
    first, second = runs["signalled"]
    # k + 1 steps ran: SIGINT after 2 steps of epoch 1; SIGTERM after 2 steps of epoch 2.
    assert first["stopped"] and first["stopped_at"] == dict(epoch=0, step=2) and first["history"] == []
    assert second["stopped"] and second["stopped_at"] == dict(epoch=1, step=2) and len(second["history"]) == 1
    assert "stopped at epoch 1/2 step 2/4 (SIGINT); resume with --resume" in runs["printed"][0]
    assert "resumed from epoch 0 of 2, step 2/4 of epoch 1 (epoch_0000_step_0002)" in runs["printed"][1]
    assert "stopped at epoch 2/2 step 2/4 (SIGTERM); resume with --resume" in runs["printed"][1]
    assert "resumed from epoch 1 of 2, step 2/4 of epoch 2 (epoch_0001_step_0002)" in runs["printed"][2]
    assert runs["listed"] == [["epoch_0000_step_0002"], ["epoch_0001", "epoch_0001_step_0002"]]
    before, after = runs["handlers"]
    assert before == after  # the loop put the previous handlers back
    for a, b in zip(_leaves(runs["full"]), _leaves(runs["sig_model"]), strict=True):
        np.testing.assert_array_equal(a, b)
    full, resumed = runs["full_metrics"]["history"], runs["sig_metrics"]["history"]
    keys = ("loss", "train_acc", "test_accuracy", "skipped")
    assert [[h[k] for k in keys] for h in full] == [[h[k] for k in keys] for h in resumed]
    assert not runs["sig_metrics"]["stopped"] and runs["sig_metrics"]["stopped_at"] is None


def test_one_line_per_epoch_when_not_on_a_terminal(runs):
    lines = [line for line in runs["printed"][2].splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1  # only epoch 2 was left to run
    assert lines[0].startswith("epoch 2/2: loss ")
    for part in ("train acc ", "test acc ", " img/s", "elapsed 0:", "ETA 0:00:00"):
        assert part in lines[0]


def test_gradscale_state_is_overwritten(runs):
    # The fp4 recipe's GradScale starts at 1 and is replaced by the backward pass.
    scales = jax.tree.leaves(nnx.state(runs["full"], OverwriteWithGradient))
    assert scales and all(float(s) != 1.0 for s in scales)


def test_metrics_curves_and_checkpoint_files(runs):
    out = runs["full_dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "recipe",
        "dataset",
        "epochs",
        "seed",
        "test_accuracy",
        "train_time_s",
        "step_time_ms",
        "final_loss",
        "history",
        "skipped_steps",
    ):
        assert key in metrics
    assert set(metrics["history"][0]) >= {"loss", "train_acc", "test_accuracy", "time_s"}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["step_time_ms"] > 0
    assert (out / "curves.png").stat().st_size > 0
    # The last keep=2 checkpoints are kept, and nothing half-written is left behind.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.png", "metrics.json"]  # lock removed
    assert metrics["curves"] == "curves.png" and metrics["stopped"] is False
    meta = json.loads((out / "checkpoints" / "epoch_0002" / "metadata.json").read_text())
    assert meta["recipe"] == "fp4" and meta["dataset"] == "toy" and meta["epoch"] == 2
    assert meta["model"]["type"] == "Tiny" and "lowbit_version" in meta


def test_nonfinite_steps_are_skipped_and_warned_per_epoch():
    data = _toy()
    data.x_train[5, 0, 0, 0] = np.inf  # one poisoned example: its batch's gradients are NaN
    recipe = recipes.get("fp32")
    model = _model(recipe)
    with pytest.warns(RuntimeWarning, match=r"epoch \d/2: 1 of 4 steps skipped .*max_skipped=16") as caught:
        metrics = loop.train(model, data, recipe=recipe, out_dir=None, **_HP)
    assert len([w for w in caught if "skipped" in str(w.message)]) == 2  # one line per epoch, not per step
    assert metrics["skipped_steps"] == 2  # the poisoned batch, once per epoch
    assert [h["skipped"] for h in metrics["history"]] == [1, 1]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _copy_run(runs, tmp_path):
    shutil.copytree(runs["full_dir"], tmp_path, dirs_exist_ok=True)
    return tmp_path / "checkpoints" / "epoch_0002"


def _truncate_arrays(ckpt):
    biggest = max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path):
    _truncate_arrays(_copy_run(runs, tmp_path))
    recipe = recipes.get("fp4")
    model = _model(recipe, seed=97)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint epoch_0002"):
        metrics, text = _quiet_train(model, _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **_HP)
    assert "resumed from epoch 1 of 2 (epoch_0001)" in text
    for a, b in zip(_leaves(runs["full"]), _leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_all_checkpoints_damaged_is_an_error(runs, tmp_path):
    newest = _copy_run(runs, tmp_path)
    _truncate_arrays(newest)
    meta = newest.parent / "epoch_0001" / "metadata.json"
    meta.write_text(meta.read_text()[:100])
    recipe = recipes.get("fp4")
    with (
        pytest.raises(CheckpointError, match="every checkpoint .* is damaged; the newest: .*epoch_0002"),
        pytest.warns(RuntimeWarning, match="epoch_0001: cannot read metadata.json"),
    ):
        loop.train(_model(recipe), _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **_HP)


@pytest.mark.parametrize(
    ("recipe", "change", "match"),
    [
        ("fp32", {}, "recipe is 'fp4' there but 'fp32'"),
        ("fp4", dict(learning_rate=0.5), "hparams.learning_rate is 0.01 there but 0.5"),
    ],
)
def test_incompatible_checkpoint_is_an_error(runs, tmp_path, recipe, change, match):
    _copy_run(runs, tmp_path)
    recipe = recipes.get(recipe)
    with pytest.raises(IncompatibleCheckpointError, match=match):
        loop.train(_model(recipe), _toy(), recipe=recipe, out_dir=tmp_path, resume=True, **(_HP | change))


class LinenTiny(linen.Module):
    """A linen MLP with a raw ``@``: trained through flax.nnx.bridge."""

    @linen.compact
    def __call__(self, x):
        h = linen.relu(linen.Dense(16)(x.reshape(x.shape[0], -1)))
        return h @ self.param("w", linen.initializers.lecun_normal(), (16, 2))


def test_train_resolves_recipe_names_and_refuses_a_mismatched_model():
    data = _toy()
    with pytest.raises(ValueError, match="pass lowbit.quantize\\(model, 'fp4'\\)"):
        loop.train(Tiny(), data, recipe="fp4", **_HP)
    with pytest.raises(ValueError, match="quantized with 'fp8'"):
        loop.train(_model("fp8"), data, recipe="fp4", **_HP)
    with pytest.raises(ValueError, match="recipe='fp9' is unknown"):
        loop.train(_model("fp8"), data, recipe="fp9", **_HP)
    with pytest.raises(TypeError, match="ToNNX"):
        loop.train(LinenTiny(), data, recipe="fp32", **_HP)


def test_a_quantized_linen_model_trains_through_the_nnx_bridge():
    data = _toy()
    qlinen = quantize(LinenTiny(), "int8_lsq")
    model = bridge.ToNNX(qlinen, rngs=nnx.Rngs(0)).lazy_init(data.x_train[:1])
    steps = nnx.state(model, nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(steps)}
    assert any("lowbit_params" in n or "act_step" in n for n in names), names
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    metrics = loop.train(model, data, recipe="int8_lsq", **_HP)
    assert metrics["test_accuracy"] > 0.9
    after = nnx.to_flat_state(nnx.state(model, nnx.Param))
    changed = {
        "/".join(map(str, p))
        for (p, a), b in zip(after, jax.tree.leaves(before))
        if not np.array_equal(np.asarray(a[...]), b)
    }
    assert any("act_step" in n for n in changed) and any("weight_step" in n for n in changed)
