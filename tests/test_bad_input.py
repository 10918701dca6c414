"""Bad input and failures as a user meets them: each gets one clear line or the documented fallback (issue 21).

Covers: an all-skipped last epoch's summary, seeds out of range, a second Ctrl-C
during a checkpoint write, orbax's tracebacks after a damaged checkpoint, an
edited metadata field (damage, not a different run), NaN/inf images under a
quantized recipe, the model/data check before the first call, and the formats'
own argument checks (register, FloatFormat, key arrays, check_format).
"""

import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import _edit, _run_meta
from test_loop import _HP, _toy
from test_trainer_safety import Mlp

import lowbit
from lowbit import formats, recipes, testing
from lowbit.cli import args as cli_args
from lowbit.cli import train as cli_train
from lowbit.cli.main import main
from lowbit.formats import FloatFormat, IntFormat
from lowbit.trainer import checkpoint, loop, make_eval_step, make_optimizer, metadata
from lowbit.trainer.checkpoint import CheckpointError
from lowbit.trainer.interrupt import StopRequest, deferred
from lowbit.trainer.step import init_state

_FP32 = recipes.get("fp32")
_ONE = _HP | dict(epochs=1)


# ----- an all-skipped last epoch ------------------------------------------------------


def test_a_last_epoch_that_skipped_every_step_is_summarised_cleanly():
    # As `lowbit train --lr 1e30 --max-skipped 1000`: the first step (learning rate 0 in
    # warmup) is finite, then the parameters overflow and every later step is skipped.
    metrics = loop.train(Mlp(), _toy(), recipe=_FP32, **(_HP | dict(learning_rate=1e30, max_skipped=1000)))
    assert metrics["final_loss"] is None and metrics["history"][-1]["skipped"] == 4
    line = cli_train._summary(metrics)
    assert "final loss n/a (every step of the last epoch was skipped: 4 steps)" in line
    assert (
        line.startswith("fp32 on toy, 2 epochs, seed 3: test accuracy ")
        and f"{metrics['skipped_steps']} skipped steps" in line
    )
    # Nothing timed (one step, which compiles) and nothing measured: still one clean line.
    bare = dict(metrics, step_time_ms=None, test_accuracy=None, history=[])
    assert "test accuracy n/a, final loss n/a (every step of the last epoch was skipped)" in cli_train._summary(bare)
    assert "(n/a ms/step)" in cli_train._summary(bare)


# ----- seeds --------------------------------------------------------------------------


def test_cli_seeds_are_range_checked(capsys):
    assert cli_args.MAX_SEED == loop.MAX_SEED
    for bad in (str(2**70), "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--seed", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"lowbit train: error: argument --seed: expected an integer in [0, 2**63 - 1], got {bad!r}"
    assert main(["compare", "--seeds", f"0,{2**70}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lowbit compare: error: --seeds '0,{2**70}': expected an integer in [0, 2**63 - 1], got '{2**70}'"
    )
    with pytest.raises(SystemExit):
        main(["ptq", "--seed", str(2**64)])
    assert "argument --seed: expected an integer in [0, 2**63 - 1]" in capsys.readouterr().err
    assert cli_args.seed_value(str(2**63 - 1)) == 2**63 - 1


def test_train_seed_is_range_checked_and_accepts_numpy_integers():
    with pytest.raises(ValueError, match=r"^train: seed=1180591620717411303424 is invalid; allowed: an integer in"):
        lowbit.train(Mlp(), _toy(), recipe=_FP32, **(_ONE | dict(seed=2**70)))
    with pytest.raises(ValueError, match=r"seed=<an integer of 20001 bits> is invalid"):
        lowbit.train(Mlp(), _toy(), recipe=_FP32, **(_ONE | dict(seed=2**20000)))
    assert loop.check_seed(np.uint64(2**63 - 1)) == 2**63 - 1 and type(loop.check_seed(np.int32(3))) is int


# ----- a second Ctrl-C during a checkpoint write --------------------------------------

_TREE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int32(5)}


def _signal_during_write(monkeypatch, times=2, signum=signal.SIGINT):
    """Sends ``signum`` ``times`` times from inside the first checkpoint write (after orbax wrote)."""
    real, sent = checkpoint._fsync_tree, []

    def fsync_tree(root):
        if not sent:
            for _ in range(times):
                signal.raise_signal(signum)
                sent.append(signum)
        real(root)

    monkeypatch.setattr(checkpoint, "_fsync_tree", fsync_tree)
    return sent


def _private_dirs(directory):
    return [p.name for p in directory.rglob(".*") if p.name.startswith((".tmp-", ".del-"))]


def test_a_second_ctrl_c_during_a_write_is_held_until_it_is_done(tmp_path, monkeypatch):
    sent = _signal_during_write(monkeypatch)
    with StopRequest() as stop:
        stop.requested = "SIGINT"  # the first Ctrl-C: the loop is writing its stop checkpoint
        with stop.shielded():
            path = checkpoint.save(tmp_path, 1, _TREE, {})
    assert sent == [signal.SIGINT, signal.SIGINT] and stop.requested == "SIGINT"
    assert _private_dirs(tmp_path) == [] and [p.name for p in checkpoint.checkpoints(tmp_path)] == ["epoch_0001"]
    tree, _ = checkpoint.restore(path, _TREE, {})
    np.testing.assert_array_equal(tree["w"], _TREE["w"])
    # Outside the write, a second signal still aborts (a stuck compilation).
    with StopRequest() as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_during_a_plain_save_interrupts_after_the_write(tmp_path, monkeypatch):
    _signal_during_write(monkeypatch, times=3)
    # Python's own Ctrl-C handler, whatever an earlier test in this worker left installed (under -n 2 this
    # failed once with "DID NOT RAISE": a handler that does not raise was in place; which test left it is
    # not known yet).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # once, after the checkpoint is complete
            checkpoint.save(tmp_path, 1, _TREE, {})
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _private_dirs(tmp_path) == [] and checkpoint.latest(tmp_path).name == "epoch_0001"
    checkpoint.restore(checkpoint.latest(tmp_path), _TREE, {})


def test_deferred_keeps_an_ignored_signal_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred():
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_train_stops_cleanly_on_two_ctrl_c_during_a_checkpoint_write(tmp_path, monkeypatch, capsys):
    sent = _signal_during_write(monkeypatch)
    metrics = loop.train(Mlp(), _toy(), recipe=_FP32, out_dir=tmp_path, **_HP)
    assert len(sent) == 2 and metrics["stopped"] and metrics["stopped_at"] == dict(epoch=1, step=0)
    out = capsys.readouterr().out
    assert "stopped at epoch 1/2 step 4/4 (SIGINT); resume with --resume" in out and "Traceback" not in out
    assert _private_dirs(tmp_path) == [] and [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == [
        "epoch_0001"
    ]


# ----- damaged checkpoints --------------------------------------------------------------


def _many_leaves():
    rng = np.random.default_rng(0)
    return {f"w{i:02d}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(48)}


def test_a_truncated_array_file_falls_back_without_orbax_tracebacks(tmp_path, monkeypatch):
    tree = _many_leaves()
    checkpoint.save(tmp_path, 1, tree, {}, keep=2)
    newest = checkpoint.save(tmp_path, 2, tree, {}, keep=2)
    files = [p for p in (newest / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint epoch_0002: .*cannot read the arrays"):
        _, _, path = checkpoint.restore_latest(tmp_path, tree, {})
    assert path.name == "epoch_0001"
    time.sleep(0.3)  # tensorstore's late reads report within milliseconds
    assert [str(u.exc_value) for u in reported] == []
    assert sys.unraisablehook == reported.append  # the filter is gone again


def test_an_edited_recipe_is_damage_and_falls_back(tmp_path):
    checkpoint.save(tmp_path, 1, _TREE, _run_meta(1), keep=2)
    newest = checkpoint.save(tmp_path, 2, _TREE, _run_meta(2), keep=2)
    _edit(newest, recipe="fp4")  # valid for the schema, but not what was written
    expected = dict(recipe="fp32", dataset="toy")
    with pytest.raises(CheckpointError, match="does not match its checksum") as caught:
        checkpoint.restore(newest, _TREE, expected, metadata.check_run)
    assert type(caught.value) is CheckpointError  # not IncompatibleCheckpointError
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint epoch_0002: .*checksum"):
        _, meta, path = checkpoint.restore_latest(tmp_path, _TREE, expected, metadata.check_run)
    assert path.name == "epoch_0001" and meta["recipe"] == "fp32"


# ----- non-finite data, whatever the recipe --------------------------------------------


def test_nonfinite_images_are_reported_and_skipped_under_fp8():
    data = _toy()
    data.x_train[5, 0, 0, 0] = np.inf  # fp8's quantizer would saturate it: no NaN loss
    data.x_test[[0, 7], 1, 1, 0] = np.nan
    recipe = recipes.get("fp8")
    with pytest.warns(RuntimeWarning) as caught:
        metrics = lowbit.train(lowbit.quantize(Mlp(), recipe), data, recipe=recipe, **_ONE)
    messages = [str(w.message) for w in caught]
    assert (
        "train: dataset.x_train has 1 of 64 images with NaN or inf pixels (e.g. index 5); a step on a batch "
        "holding one is not applied (counted with the non-finite steps)" in messages
    )
    assert (
        "train: dataset.x_test has 2 of 40 images with NaN or inf pixels (e.g. index 0, 7); each is scored "
        "as misclassified" in messages
    )
    assert metrics["skipped_steps"] == 1 and metrics["history"][0]["skipped"] == 1


def test_eval_step_scores_nonfinite_images_as_misclassified():
    tx = make_optimizer(1e-2, 0.0, 0, 10)
    graphdef, state = init_state(Mlp(), tx, policy=_FP32.policy, loss_scale=_FP32.make_loss_scale())
    evaluate = jax.jit(make_eval_step(graphdef, policy=_FP32.policy))
    x = jnp.full((4, 4, 4, 1), jnp.nan, jnp.float32)
    for label in (0, 1):  # argmax of NaN logits would hit one of the classes
        assert int(evaluate(state, x, jnp.full(4, label, jnp.int32), jnp.ones(4, bool))) == 0


# ----- the model/data check first; a dataset that is not one -------------------------


def test_a_quantized_model_that_does_not_fit_the_data_gets_the_shape_message():
    with pytest.raises(ValueError) as caught:
        lowbit.train(lowbit.quantize(Mlp(inputs=10), "fp8"), _toy(), recipe="fp8", **_ONE)
    message = str(caught.value)
    assert message.startswith("train: the model cannot be applied to a batch of images of shape [1, 4, 4, 1] (")
    assert "\n" not in message


@pytest.mark.parametrize("dataset", [None, np.zeros((4, 4, 4, 1), np.float32)])
def test_a_dataset_that_is_not_one_is_a_type_error(dataset):
    with pytest.raises(TypeError, match=r"^train: dataset must be a lowbit.data.Dataset .* got (NoneType|ndarray)"):
        lowbit.train(lowbit.quantize(Mlp(), "fp8"), dataset, recipe="fp8", **_ONE)


# ----- formats: protocol, register, numpy integers, key arrays, check_format ------------


class _Fmt:
    """A user format whose members the tests edit."""

    name, bits, max_value, has_nan = "mine", 4, 6.0, False

    def __init__(self, **members):
        self.__dict__.update(members)

    def encode(self, x, *, saturate, rounding, key):
        return formats.encode("float4_e2m1fn", x, saturate=saturate, rounding=rounding, key=key)

    def decode(self, codes, *, dtype):
        return formats.decode("float4_e2m1fn", codes, dtype=dtype)

    def quantize(self, x, *, saturate, rounding, key):
        return formats.quantize("float4_e2m1fn", x, saturate=saturate, rounding=rounding, key=key)

    def values(self):
        return formats.values("float4_e2m1fn")


class _NoDecode:
    name, bits, max_value, has_nan = "half", 4, 6.0, False

    def encode(self, x, **kw):
        return x


def test_the_protocol_error_names_the_missing_members():
    with pytest.raises(TypeError, match=r"is not an element format \(it lacks decode, quantize, values\); allowed"):
        testing.check_format(_NoDecode())


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        (dict(bits="eight"), TypeError, "bits='eight' is invalid; allowed: an integer in \\[1, 16\\]"),
        (dict(bits=0), ValueError, "bits=0 is invalid; allowed: an integer in \\[1, 16\\]"),
        (dict(bits=17), ValueError, "bits=17 is invalid"),
        (dict(bits=True), TypeError, "bits=True is invalid"),
        (dict(max_value=-1), ValueError, "max_value=-1 is invalid; allowed: a positive finite float"),
        (dict(max_value=0.0), ValueError, "max_value=0.0 is invalid"),
        (dict(max_value=float("inf")), ValueError, "max_value=inf is invalid"),
        (dict(max_value="6"), TypeError, "max_value='6' is invalid"),
        (dict(has_nan=0), TypeError, "has_nan=0 is invalid; allowed: True or False \\(a bool\\)"),
        (dict(has_nan=np.bool_(False)), TypeError, "has_nan=.*False.* is invalid"),
        (dict(name=3), TypeError, "name=3 is invalid; allowed: a string"),
    ],
)
def test_register_checks_the_members_values(members, error, match):
    with pytest.raises(error, match=match):
        formats.register("bad_input_test_fmt", _Fmt(**members))
    assert "bad_input_test_fmt" not in formats.names()


def test_register_refuses_a_class_and_accepts_a_valid_instance():
    with pytest.raises(
        TypeError, match=r"fmt=<class .*_Fmt'> is a class; allowed: an instance .* \(e.g. _Fmt\(...\)\)"
    ):
        formats.register("bad_input_class", _Fmt)
    fmt = _Fmt(bits=np.int64(4), max_value=np.float32(6.0))  # NumPy numbers are numbers
    formats.register("bad_input_ok", fmt)
    assert formats.get("bad_input_ok") is fmt


def test_numpy_integers_are_accepted_and_passed_on_as_ints():
    fmt = FloatFormat(name="np_e4m3", ebits=np.int64(4), mbits=np.int32(3), bias=np.int64(7), specials="fn")
    assert fmt == FloatFormat(ebits=4, mbits=3, bias=7, specials="fn")
    assert all(type(getattr(fmt, f)) is int for f in ("ebits", "mbits", "bias", "radix"))
    assert float(fmt.values()[-1]) == 448.0
    assert formats.p3109(np.int64(8), np.int64(3)) == formats.get("p3109_k8p3")
    int4 = IntFormat(bits=np.int64(4))
    assert int4 == IntFormat(bits=4) and type(int4.bits) is int and int4.name == "int4"
    with pytest.raises(ValueError, match="ebits=True is invalid; allowed: an integer"):
        FloatFormat(ebits=True, mbits=3)


def test_a_key_array_as_x_is_named_as_keys():
    keys = jax.random.split(jax.random.key(0), 3)
    for x in (keys, keys[0]):
        with pytest.raises(TypeError, match=r"^x is an array of jax.random keys \(dtype key<fry>\); allowed: a jax"):
            formats.quantize("float8_e4m3fn", x)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(examples=0), ValueError, r"check_format: examples=0 is invalid; allowed: an integer in \[1, "),
        (dict(examples=-1), ValueError, "examples=-1 is invalid"),
        (dict(examples="5"), TypeError, "examples='5' is invalid; allowed: an integer"),
        (dict(examples=True), TypeError, "examples=True is invalid"),
        (dict(examples=2.0), TypeError, "examples=2.0 is invalid"),
        (dict(seed="a"), TypeError, "check_format: seed='a' is invalid; allowed: an integer in \\[0, "),
        (dict(seed=-1), ValueError, "seed=-1 is invalid"),
        (dict(seed=2**70), ValueError, "seed=1180591620717411303424 is invalid"),
    ],
)
def test_check_format_checks_its_own_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        testing.check_format("int4", **kw)
