"""lowbit.trainer.checkpoint: atomic writes, retention, schema, checksum, fallback, crash safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from lowbit.trainer import checkpoint, metadata
from lowbit.trainer.checkpoint import CheckpointError, IncompatibleCheckpointError

_TREE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "key": jax.random.key(7), "n": np.int32(5)}


def _run_meta(epoch=1, step=0, epochs=2, steps_per_epoch=4):
    """Metadata as the train loop writes it after ``epoch`` epochs and ``step`` steps."""
    history = [
        dict(epoch=e + 1, loss=0.5, train_acc=0.75, test_accuracy=0.5, time_s=1.0, skipped=0) for e in range(epoch)
    ]
    partial = dict(losses=[0.25] * step, correct=step, skipped=0, time_s=0.5) if step else None
    return dict(
        recipe="fp32",
        dataset="toy",
        model=dict(type="Tiny", config=None),
        steps_per_epoch=steps_per_epoch,
        hparams=dict(epochs=epochs, batch_size=16, seed=0, learning_rate=0.01, weight_decay=0.0, warmup=0.5),
        history=history,
        partial=partial,
        step_times_ms=[1.5, 2.0],
        train_time_s=3.0,
        lowbit_version="0.1.0",
    )


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _edit(path, **changes):
    meta_file = path / "metadata.json"
    meta = json.loads(meta_file.read_text())
    for key, value in changes.items():
        target = meta
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    meta_file.write_text(json.dumps(meta))


def test_round_trip_and_names(tmp_path):
    path = checkpoint.save(tmp_path, 1, _TREE, _run_meta(1), keep=5)
    assert path.name == "epoch_0001" and path.is_absolute()
    mid = checkpoint.save(tmp_path, 1, _TREE, _run_meta(1, step=3), step=3, keep=5)
    assert mid.name == "epoch_0001_step_0003"
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["epoch_0001_step_0003", "epoch_0001"]
    tree, meta = checkpoint.restore(mid, _TREE, dict(recipe="fp32"), metadata.check_run)
    _equal(tree, _TREE)
    assert (meta["epoch"], meta["step"], meta["format"]) == (1, 3, checkpoint.FORMAT)


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = checkpoint.save("runs/x", 2, _TREE, {})
    assert path == tmp_path / "runs" / "x" / "epoch_0002"
    _equal(checkpoint.restore("runs/x/epoch_0002", _TREE, {})[0], _TREE)


def test_keeps_the_newest_k_and_leaves_later_ones_alone(tmp_path):
    (tmp_path / "epoch_9999").mkdir()  # a stray "later" directory: not ours to judge or delete
    for epoch in range(1, 6):
        checkpoint.save(tmp_path, epoch, _TREE, {}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["epoch_9999", "epoch_0005", "epoch_0004"]
    checkpoint.save(tmp_path, 5, _TREE, {}, step=2, keep=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["epoch_9999", "epoch_0005_step_0002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0005_step_0002", "epoch_9999"]  # no leftovers


def test_save_spares_live_writers_and_sweeps_dead_ones(tmp_path):
    live = tmp_path / f".tmp-{os.getppid()}-{'a' * 32}-epoch_0003"  # another process, still writing
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".tmp-{int(done.stdout)}-{'b' * 32}-epoch_0002"  # its writer was killed
    live.mkdir()
    dead.mkdir()
    (live / "partial").write_text("x")
    checkpoint.save(tmp_path, 1, _TREE, {})
    assert live.is_dir() and (live / "partial").exists()
    assert not dead.exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epoch", "2", "epoch is '2'; allowed: an integer"),
        ("epoch", -3, "epoch is -3"),
        ("epoch", 2.5, "epoch is 2.5"),
        ("epoch", 99, "epoch is 99; allowed: an integer in \\[0, 2\\]"),
        ("step", 4, "step is 4; allowed: an integer in \\[0, 3\\]"),
        ("history", "x", "history is 'x'"),
        ("history", [], "history is \\[\\]; allowed: a list of 1 entries"),
        ("history.0.train_acc", 1.5, "history\\[0\\].train_acc is 1.5"),
        ("step_times_ms", "abc", "step_times_ms is 'abc'"),
        ("step_times_ms", [1.0, "slow"], "step_times_ms is"),
        ("train_time_s", "slow", "train_time_s is 'slow'"),
        ("hparams.epochs", 0, "hparams.epochs is 0"),
        ("partial", dict(losses=[]), "partial is .* at step 0"),
        ("leaves", "x", "leaves is 'x'"),
        ("sha256", "abc", "sha256 is 'abc'"),
        ("format", 1, "format is 1; this lowbit reads checkpoint format 2"),
    ],
)
def test_metadata_schema(tmp_path, field, value, match):
    path = checkpoint.save(tmp_path, 1, _TREE, _run_meta(1))
    if field.startswith("history."):
        _, index, key = field.split(".")
        meta = json.loads((path / "metadata.json").read_text())
        meta["history"][int(index)][key] = value
        (path / "metadata.json").write_text(json.dumps(meta))
    else:
        _edit(path, **{field: value})
    with pytest.raises(CheckpointError, match=f"epoch_0001: metadata.json is invalid: {match}"):
        checkpoint.restore(path, _TREE, {}, metadata.check_run)


def test_metadata_is_covered_by_the_checksum(tmp_path):
    path = checkpoint.save(tmp_path, 1, _TREE, _run_meta(1))
    _edit(path, **{"history": [dict(_run_meta(1)["history"][0], test_accuracy=1.0)]})  # valid, but forged
    with pytest.raises(CheckpointError, match="metadata or array data does not match its checksum"):
        checkpoint.restore(path, _TREE, {}, metadata.check_run)


def test_nan_in_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metadata is not valid JSON"):
        checkpoint.save(tmp_path, 1, _TREE, dict(loss=float("nan")))
    assert checkpoint.checkpoints(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_incompatible_is_its_own_error(tmp_path):
    path = checkpoint.save(tmp_path, 1, _TREE, dict(recipe="fp4"))
    with pytest.raises(IncompatibleCheckpointError, match="recipe is 'fp4' there but 'fp32'"):
        checkpoint.restore(path, _TREE, dict(recipe="fp32"))
    with pytest.raises(IncompatibleCheckpointError, match=r"'w' is float32\[2, 3\] there, float32\[3, 3\]"):
        checkpoint.restore(path, dict(_TREE, w=np.zeros((3, 3), np.float32)), {})


def test_restore_latest_falls_back_past_damaged_checkpoints(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "none", _TREE, {}) is None
    checkpoint.save(tmp_path, 1, _TREE, {}, keep=5)
    checkpoint.save(tmp_path, 2, dict(_TREE, n=np.int32(6)), {}, keep=5)
    (tmp_path / "epoch_9999").mkdir()  # empty stray directory
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint epoch_9999: .*cannot read metadata.json"):
        tree, meta, path = checkpoint.restore_latest(tmp_path, _TREE, {})
    assert path.name == "epoch_0002" and int(tree["n"]) == 6
    # An intact checkpoint of another run is not skipped: that would silently resume something else.
    with pytest.raises(IncompatibleCheckpointError), pytest.warns(RuntimeWarning):
        checkpoint.restore_latest(tmp_path, _TREE, dict(recipe="other"))
    for p in checkpoint.checkpoints(tmp_path):
        (p / "metadata.json").write_text("{")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"), pytest.warns(RuntimeWarning):
        checkpoint.restore_latest(tmp_path, _TREE, {})


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from lowbit.trainer import checkpoint

    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}
    for epoch in range(1, 10_000):
        tree["w0"][0, 0] = epoch
        checkpoint.save(sys.argv[1], epoch, tree, dict(run="kill"), keep=2)
        print(epoch, flush=True)
""")


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_newest_checkpoint_loadable(tmp_path):
    template = {f"w{i}": np.zeros((256, 256), np.float32) for i in range(8)}
    rng = np.random.default_rng(0)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for trial in range(3):
        # A directory per writer: each starts again at epoch 1, and save() keeps checkpoints ordered after the
        # new one (an abandoned later run), so a shared directory could list an earlier writer's too.
        directory = tmp_path / f"writer{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory)], stdout=subprocess.PIPE, text=True, env=env
        )
        proc.stdout.readline()  # one checkpoint written: the writer is in its save loop
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        found = checkpoint.checkpoints(directory)
        assert 1 <= len(found) <= 3, [p.name for p in found]  # keep=2, plus at most one mid-rotation
        for path in found:  # every listed checkpoint is complete, the newest included
            tree, meta = checkpoint.restore(path, template, dict(run="kill"))
            assert tree["w0"][0, 0] == meta["epoch"]
