"""lowbit.trainer: everyday safety: paths, argument checks, existing runs, locks, NaN handling, public step."""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_loop import _HP, _toy

from lowbit import recipes
from lowbit.trainer import TrainingError, init_state, loop, make_eval_step, make_optimizer, make_train_step, report
from lowbit.trainer.interrupt import StopRequest
from lowbit.trainer.lock import LOCK_NAME, RunLock

_FP32 = recipes.get("fp32")
_ONE = _HP | dict(epochs=1)


class Mlp(nnx.Module):
    """A stock float MLP for 4x4 images: fast to compile."""

    def __init__(self, classes=2, inputs=16, seed=0):
        rngs = nnx.Rngs(seed)
        self.fc1 = nnx.Linear(inputs, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"metrics.json holds {constant}")

    return json.loads(text, parse_constant=refuse)


def test_relative_out_dir_from_a_fresh_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    metrics = loop.train(Mlp(), _toy(), recipe=_FP32, out_dir="runs/x", **_ONE)
    out = tmp_path / "runs" / "x"
    assert _strict_json((out / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    assert (out / "curves.png").is_file() and (out / "checkpoints" / "epoch_0001").is_dir()
    loop.train(Mlp(), _toy(), recipe=_FP32, out_dir="runs/x", resume=True, **_ONE)
    assert "resumed from epoch 1 of 1 (epoch_0001); nothing left to train" in capsys.readouterr().out


def test_an_earlier_run_is_never_silently_replaced(tmp_path, capsys):
    loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, **_ONE)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / "mine.txt").write_text("mine")
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(
        ValueError,
        match=r"already holds a run \(checkpoints/epoch_0001, metrics.json, curves.png\); "
        r"pass resume=True \(--resume\) to continue it, or overwrite=True",
    ):
        loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, **_ONE)
    assert (tmp_path / "metrics.json").read_text() == before
    with pytest.raises(ValueError, match="resume=True continues the run in out_dir and overwrite=True replaces it"):
        loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, resume=True, overwrite=True, **_ONE)
    metrics = loop.train(Mlp(seed=1), _toy(), recipe=_FP32, out_dir=tmp_path, overwrite=True, **_ONE)
    # Only what lowbit wrote was replaced.
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoints" / "mine.txt").exists()
    assert _strict_json((tmp_path / "metrics.json").read_text())["final_loss"] == metrics["final_loss"]
    # Reports without a checkpoint: nothing to resume, and still not deleted without overwrite.
    for p in (tmp_path / "checkpoints").glob("epoch_*"):
        loop.checkpoint.remove(p)
    with pytest.raises(ValueError, match="there is no checkpoint to resume, or overwrite=True"):
        loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, resume=True, **_ONE)


def test_a_second_process_on_the_same_out_dir_is_refused(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(f"{os.getppid()}\n")  # a live process (pytest's parent)
    with pytest.raises(TrainingError, match=f"in use by process {os.getppid()} \\(lock file .*{LOCK_NAME}\\)"):
        loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, **_ONE)
    assert lock.read_text() == f"{os.getppid()}\n"  # untouched
    lock.unlink()
    with RunLock(tmp_path), pytest.raises(TrainingError, match="in use by this process"):
        with RunLock(tmp_path):
            pass


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(f"{_dead_pid()}\n")  # left by a run killed with SIGKILL
    with RunLock(tmp_path):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(epochs=0), ValueError, "epochs must be >= 1, got 0"),
        (dict(epochs=1.5), TypeError, "epochs must be an integer, got 1.5"),
        (dict(batch_size=True), TypeError, "batch_size must be an integer, got True"),
        (dict(batch_size=1000), ValueError, "batch_size 1000 exceeds the 64 training examples"),
        (dict(seed=-1), ValueError, r"seed=-1 is invalid; allowed: an integer in \[0, 2\*\*63 - 1\]"),
        (dict(seed=2**70), ValueError, r"seed=1180591620717411303424 is invalid; allowed: an integer in \[0, 2"),
        (dict(seed="3"), TypeError, "seed='3' is invalid; allowed: an integer"),
        (dict(seed=True), TypeError, "seed=True is invalid; allowed: an integer"),
        (dict(resume="no"), TypeError, "resume must be True or False, got 'no'"),
        (dict(overwrite=1), TypeError, "overwrite must be True or False, got 1"),
        (dict(progress="yes"), TypeError, "progress must be True or False"),
        (dict(keep=0), ValueError, "keep must be >= 1, got 0"),
        (dict(max_skipped=-1), ValueError, "max_skipped must be >= 0, got -1"),
        (dict(max_skipped=0.5), TypeError, "max_skipped must be an integer"),
        (dict(learning_rate=math.nan), ValueError, "learning_rate must be a finite number >= 0, got nan"),
        (dict(warmup=-1.0), ValueError, "warmup must be a finite number >= 0"),
        (dict(weight_decay="0.1"), TypeError, "weight_decay must be a number"),
        (dict(devices=64), ValueError, "needs 64 devices but jax sees"),
        (dict(mesh="data=2,fsdp=32"), ValueError, "needs 64 devices but jax sees"),
        (dict(mesh="data=2,pipe=2"), ValueError, "unknown axis 'pipe'; the axes are data, fsdp, tensor"),
        (dict(mesh="data"), ValueError, "'data' is not AXIS=SIZE"),
        (dict(mesh=3), TypeError, "mesh must be a string, a mapping of axis to size or a jax Mesh, got 3"),
        (dict(mesh="data=1", devices=2), ValueError, r"give devices \(2\) or mesh"),
        (dict(out_dir=3), TypeError, "out_dir must be a path"),
        (dict(out_dir=None, resume=True), ValueError, "resume=True needs out_dir"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, change, error, match):
    kw = _ONE | dict(out_dir=tmp_path / "out") | change
    with pytest.raises(error, match=match):
        loop.train(Mlp(), _toy(), recipe=_FP32, **kw)
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir_fails_first(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match=f"cannot create out_dir {out}"):
            loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=out, **_ONE)


@pytest.mark.parametrize(("split", "index", "label"), [("y_train", 3, 2), ("y_test", 0, -1)])
def test_out_of_range_labels_are_refused(tmp_path, split, index, label):
    data = _toy()
    getattr(data, split)[index] = label
    with pytest.raises(
        ValueError,
        match=rf"dataset.{split} has 1 labels outside \[0, 2\) \(num_classes=2\), "
        rf"e.g. {label} at index {index}",
    ):
        loop.train(Mlp(), data, recipe=_FP32, out_dir=tmp_path / "out", **_ONE)
    assert not (tmp_path / "out").exists()


def test_bad_data_and_models_are_refused(tmp_path):
    data = _toy()
    float_labels = type(data)(data.x_train, data.y_train.astype(np.float32), data.x_test, data.y_test, 2, "toy")
    with pytest.raises(TypeError, match="dataset.y_train must be integer labels"):
        loop.train(Mlp(), float_labels, recipe=_FP32, **_ONE)
    with pytest.raises(
        ValueError,
        match=r"maps a batch of shape \[16, 4, 4, 1\] to \[16, 1\]; expected logits of "
        r"shape \[16, classes\] with classes >= dataset.num_classes=2",
    ):
        loop.train(Mlp(classes=1), data, recipe=_FP32, **_ONE)
    with pytest.raises(ValueError, match=r"model cannot be applied to a batch of images of shape \[16, 4, 4, 1\]"):
        loop.train(Mlp(inputs=10), data, recipe=_FP32, **_ONE)
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module"):
        loop.train(lambda x: x, data, recipe=_FP32, **_ONE)
    with pytest.raises(TypeError, match="recipe=<object .* is invalid; allowed: a lowbit.recipes.Recipe or a name"):
        loop.train(Mlp(), data, recipe=object(), **_ONE)


def test_too_many_skipped_steps_fail_the_run():
    data = _toy()
    data.x_train[:] = np.nan
    with pytest.raises(
        TrainingError,
        match=r"3 steps skipped for a non-finite loss or gradient, more than "
        r"max_skipped=2 \(at epoch 1 step 3\)",
    ):
        loop.train(Mlp(), data, recipe=_FP32, max_skipped=2, **_ONE)


def test_metrics_json_is_valid_json_when_every_step_is_skipped(tmp_path):
    data = _toy()
    data.x_train[:] = np.nan
    with pytest.warns(RuntimeWarning, match=r"epoch 1/1: 4 of 4 steps skipped .*max_skipped=16"):
        metrics = loop.train(Mlp(), data, recipe=_FP32, out_dir=tmp_path, **_ONE)
    text = (tmp_path / "metrics.json").read_text()
    written = _strict_json(text)  # no NaN / Infinity tokens
    assert written["final_loss"] is None and written["history"][0]["loss"] is None
    assert written["skipped_steps"] == 4 == metrics["skipped_steps"]


def test_public_step_skips_a_nan_loss_with_finite_gradients():
    data = _toy()
    tx = make_optimizer(1e-2, 0.0, 0, 10)
    graphdef, state = init_state(Mlp(), tx, policy=_FP32.policy, loss_scale=_FP32.make_loss_scale())
    step = jax.jit(make_train_step(graphdef, tx, policy=_FP32.policy))
    evaluate = jax.jit(make_eval_step(graphdef, policy=_FP32.policy))
    x, y = jnp.asarray(data.x_train[:16]), jnp.asarray(data.y_train[:16])
    state, m = step(state, x, y)
    assert not bool(m["skipped"]) and np.isfinite(float(m["loss"]))
    bad = y.at[0].set(7)  # out of range: the loss is NaN but its gradients are finite
    after, m = step(state, x, bad)
    assert bool(m["skipped"]) and np.isnan(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(after.opt_state.total_notfinite) == 1
    correct = evaluate(after, x, y, jnp.arange(16) < 10)  # the last 6 examples are masked out
    logits = nnx.merge(graphdef, after.params, after.overwrite, after.rest)(x)
    assert int(correct) == int(jnp.sum(jnp.argmax(logits[:10], -1) == y[:10]))


def test_stop_request_restores_handlers_and_a_second_signal_aborts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_duration():
    assert report.duration(3725.4) == "1:02:05" and report.duration(math.nan) == "-:--:--"
