"""lowbit.cli.train and lowbit.cli.compare: the ``train`` and ``compare`` subcommands."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from jax import monitoring

from lowbit import recipes, trainer
from lowbit.cli import compare as cli_compare
from lowbit.cli import train as cli_train
from lowbit.cli.args import HelpFormatter
from lowbit.cli.compare import add_compare_parser
from lowbit.cli.train import add_train_parser
from lowbit.trainer import CheckpointError, TrainingError

_SMALL = ["--epochs", "1", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--no-progress"]
_COMPILE = "/jax/core/compile/backend_compile_duration"


def _parser():
    parser = argparse.ArgumentParser(prog="lowbit", formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(required=True)
    add_train_parser(subparsers)
    add_compare_parser(subparsers)
    return parser


def _main(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def compilations():
    """Counts XLA compilations while a test runs (a list that grows by one per compile)."""
    seen = []

    def listen(event, seconds, **_):
        if event == _COMPILE:
            seen.append(seconds)

    monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "train",
            [
                "--recipe",
                "--resume",
                "--devices",
                "--mesh",
                "--lr",
                "--overwrite",
                "--keep",
                "--max-skipped",
                "--no-progress",
            ],
        ),
        ("compare", ["--recipes", "--seeds", "--dataset", "--overwrite", "--keep"]),
    ],
)
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out
    for name in recipes.names():  # the recipe help lists every registered recipe
        assert name in " ".join(out.split())


def test_run_options_default_and_parse():
    args = _parser().parse_args(["train"])
    assert (args.overwrite, args.keep, args.max_skipped, args.no_progress, args.resume) == (
        False,
        2,
        None,
        False,
        False,
    )
    args = _parser().parse_args(["train", "--overwrite", "--keep", "5", "--max-skipped", "0", "--no-progress"])
    assert (args.overwrite, args.keep, args.max_skipped, args.no_progress) == (True, 5, 0, True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--keep", "0"], "expected an integer >= 1"),
        (["--max-skipped", "-1"], "expected an integer >= 0"),
        (["--out", ""], "expected a path"),
    ],
)
def test_bad_run_options_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["train", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_relative_paths_are_resolved_once_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["train", "--out", "runs/x", "--data-dir", "data/../fm"])
    assert args.out == tmp_path / "runs" / "x" and args.data_dir == tmp_path / "fm"
    monkeypatch.chdir("/")
    assert args.out.is_absolute()


def test_train_passes_run_options_and_absolute_out_to_the_trainer(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_train(model, dataset, **kwargs):
        seen.update(kwargs)
        out = Path(kwargs["out_dir"])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text("{}")  # no curves.png: the CLI must not claim it
        return dict(
            recipe="fp32",
            dataset="digits",
            epochs=1,
            seed=0,
            test_accuracy=0.5,
            final_loss=1.0,
            train_time_s=1.0,
            step_time_ms=2.0,
            skipped_steps=1,
            stopped=False,
        )

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--out", "runs/rel", "--overwrite", "--keep", "3", "--max-skipped", "7", *_SMALL]
    assert _main(argv) == 0
    assert seen["out_dir"] == tmp_path / "runs" / "rel"
    assert (seen["overwrite"], seen["keep"], seen["max_skipped"], seen["progress"]) == (True, 3, 7, False)
    out = capsys.readouterr().out
    assert "1 epoch," in out and "1 skipped step" in out and "1 epochs" not in out
    assert f"wrote {tmp_path}/runs/rel/metrics.json; not written: {tmp_path}/runs/rel/curves.png" in out


def test_default_out_is_under_the_working_directory(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        trainer,
        "train",
        lambda model, dataset, **kw: (
            seen.update(kw)
            or dict(
                recipe="fp8",
                dataset="digits",
                epochs=2,
                seed=3,
                test_accuracy=0.5,
                final_loss=1.0,
                train_time_s=1.0,
                step_time_ms=2.0,
                skipped_steps=0,
                stopped=False,
            )
        ),
    )
    monkeypatch.chdir(tmp_path)
    assert _main(["train", "--recipe", "fp8", "--seed", "3", *_SMALL]) == 0
    assert seen["out_dir"] == tmp_path / "runs" / "fp8-digits-seed3" and seen["max_skipped"] is None


def test_stopped_run_exits_130_without_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        trainer,
        "train",
        lambda model, dataset, **kw: dict(
            recipe="fp32",
            dataset="digits",
            epochs=3,
            seed=0,
            test_accuracy=None,
            final_loss=None,
            train_time_s=1.0,
            step_time_ms=None,
            skipped_steps=0,
            stopped=True,
        ),
    )
    assert _main(["train", "--out", str(tmp_path), *_SMALL]) == 130
    out = capsys.readouterr().out
    assert "test accuracy" not in out and "wrote nothing; not written" in out


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TrainingError("another process is using it"), 1),
        (ValueError("holds an earlier run; pass --overwrite"), 2),
        (CheckpointError("checkpoint epoch_0002: damaged"), 2),
    ],
)
def test_trainer_errors_are_one_line(error, status, tmp_path, monkeypatch, capsys):
    def fail(model, dataset, **kw):
        raise error

    monkeypatch.setattr(trainer, "train", fail)
    assert _main(["train", "--out", str(tmp_path), *_SMALL]) == status
    err = capsys.readouterr().err
    assert err == f"lowbit train: error: {error}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"], "apt-get install -y"),
        (["train", "--dataset", "cifar10"], "CIFAR-10"),
        (["train", "--recipe", "fp3"], "'fp3' is unknown; allowed: fp32, bf16"),
        (["compare", "--recipes", "fp32,nope"], "'nope' is unknown; allowed: fp32, bf16"),
        (["compare", "--seeds", "0,x"], "--seeds"),
        (["train", "--batch-size", "10", "--devices", "3"], "not divisible"),
        (["train", "--mesh", "pipe=2"], "--mesh pipe=2: mesh: unknown axis 'pipe'; the axes are data, fsdp, tensor"),
        (["train", "--mesh", "data=2", "--devices", "2"], "give --devices (2) or --mesh (data=2), not both"),
        (["train", "--batch-size", "10", "--mesh", "data=2,fsdp=2"], "not divisible by the mesh's data × fsdp = 4"),
        (["train", "--mesh", "tensor=64"], "64 devices (--devices/--mesh): jax sees only"),
        (["train", "--batch-size", "5000"], "exceeds the 1442 training examples"),
        (["train", "--patch-size", "3"], "patch"),
    ],
)
def test_bad_input_exits_2_without_traceback_or_compiling(argv, message, capsys, compilations, tmp_path):
    flags = os.environ.get("XLA_FLAGS")
    assert _main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert os.environ.get("XLA_FLAGS") == flags  # a refused --devices/--mesh leaves the environment alone
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert compilations == []


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("where", ["out-is-a-file", "parent-is-a-file"])
def test_unwritable_out_fails_before_loading_anything(command, where, tmp_path, capsys, compilations, monkeypatch):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if where == "out-is-a-file" else tmp_path / "file" / "run"
    monkeypatch.setattr(cli_train, "_dataset", lambda args: pytest.fail("loaded the dataset first"))
    assert _main([command, "--out", str(out), *_SMALL]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "is a file" in err and "expected a directory" in err
    assert compilations == []


def test_read_only_out_fails(tmp_path, capsys, monkeypatch):
    # As root every directory is writable, so the permission answer is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert _main(["train", "--out", str(tmp_path / "new" / "run"), *_SMALL]) == 2
    assert f"its nearest existing parent {tmp_path} is not writable" in capsys.readouterr().err


_FACTORY_MODULE = """
import jax.numpy as jnp
from flax import nnx


class Tiny(nnx.Module):
    def __init__(self, image_shape, num_classes, rngs):
        h, w, c = image_shape
        self.head = nnx.Linear(h * w * c, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(x.reshape(x.shape[0], -1))


def make(*, image_shape, num_classes, rngs):
    return Tiny(image_shape, num_classes, rngs)


def not_a_model(*, image_shape, num_classes, rngs):
    return "a string"


def wrong_signature(size):
    return None
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``lowbit_user_models`` in a fresh working directory (not on sys.path: the CLI adds it)."""
    (tmp_path / "lowbit_user_models.py").write_text(_FACTORY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "lowbit_user_models", raising=False)
    return "lowbit_user_models"


def test_model_factory_from_the_working_directory_is_quantized_and_trained(user_module, monkeypatch, capsys):
    from lowbit.nn import is_quantized

    seen = {}

    def fake_train(model, dataset, **kwargs):
        seen.update(model=model, recipe=kwargs["recipe"])
        return dict(
            recipe="fp8",
            dataset="digits",
            epochs=1,
            seed=0,
            test_accuracy=0.5,
            final_loss=1.0,
            train_time_s=1.0,
            step_time_ms=2.0,
            skipped_steps=0,
            stopped=False,
        )

    monkeypatch.setattr(trainer, "train", fake_train)
    assert _main(["train", "--model", f"{user_module}:make", "--recipe", "fp8", "--no-progress"]) == 0
    assert type(seen["model"]).__name__ == "Tiny" and is_quantized(seen["model"])
    assert seen["recipe"].name == "fp8"


@pytest.mark.parametrize(
    ("spec", "flags", "message"),
    [
        ("lowbit_no_such_module:make", [], "--model: model='lowbit_no_such_module:make': cannot import"),
        ("{module}:missing", [], "has no callable 'missing'"),
        ("{module}", [], "allowed: vit, mlp, cnn or PKG.MODULE:FACTORY"),
        ("{module}:not_a_model", [], "returned str; allowed: a flax.nnx.Module"),
        ("{module}:wrong_signature", [], "--model {module}:wrong_signature: "),
        ("mlp", ["--dim", "16", "--depth", "1"], "--dim, --depth set(s) the size of --model vit, not of --model mlp"),
    ],
)
def test_bad_model_exits_2_before_training(spec, flags, message, user_module, capsys, compilations, monkeypatch):
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained a bad model"))
    spec, message = spec.format(module=user_module), message.format(module=user_module)
    assert _main(["train", "--model", spec, *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert compilations == []


@pytest.mark.slow
@pytest.mark.parametrize(("model", "lr"), [("mlp", "3e-3"), ("cnn", "3e-3"), ("user", "0.05")])  # user: one layer
def test_train_other_models_one_epoch(model, lr, user_module, capsys):
    spec = f"{user_module}:make" if model == "user" else model
    assert (
        _main(
            [
                "train",
                "--model",
                spec,
                "--recipe",
                "int8_lsq",
                "--epochs",
                "1",
                "--warmup",
                "0.2",
                "--lr",
                lr,
                "--out",
                "run",
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads(Path("run/metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1


def test_invalid_numbers_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_one_epoch_on_digits(tmp_path, capsys):
    assert _main(["train", "--out", str(tmp_path), "--overwrite", *_SMALL]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
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
    ):
        assert key in metrics
    assert metrics["recipe"] == "fp32" and metrics["dataset"] == "digits" and len(metrics["history"]) == 1
    assert metrics["test_accuracy"] > 0.2  # well above chance (0.1) after one epoch
    assert (tmp_path / "curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "1 epoch," in out
    assert f"wrote {tmp_path}/metrics.json and {tmp_path}/curves.png" in out


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path):
    script = shutil.which("lowbit")
    cmd = [script] if script else [sys.executable, "-m", "lowbit.cli"]
    argv = [*cmd, "train", "--epochs", "2", "--out", "run", *_SMALL[2:]]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first per-epoch line, printed and flushed into the pipe
    assert first.startswith("epoch 1/2:"), first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    assert "resume with --resume" in out and "Traceback" not in err
    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from epoch" in resumed.stdout and "epoch 2/2:" in resumed.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"] is False


def test_interrupt_outside_training_is_one_line(monkeypatch, capsys):
    from lowbit.cli.main import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "_recipes", lambda args, names: interrupted(args))
    assert main(["train", "--no-progress"]) == 130
    assert capsys.readouterr().err == "lowbit train: interrupted\n"


def _fake_run(args, dataset, recipe, seed, out, *, resume):
    acc = {"fp32": 0.95, "fp4": 0.90}[recipe.name] + 0.01 * seed
    return dict(
        test_accuracy=acc,
        step_time_ms={"fp32": 10.0, "fp4": 25.0}[recipe.name],
        train_time_s=1.0,
        wall_time_s=3.0 + seed,
        compile_time_s={"fp32": 0.5, "fp4": 1.5}[recipe.name],
        stopped=False,
    )


def test_compare_summarises_every_recipe_and_seed(tmp_path, monkeypatch, capsys):
    # Training itself is covered above and in test_loop; here each run is faked.
    monkeypatch.setattr(cli_train, "_run", _fake_run)
    assert _main(["compare", "--recipes", "fp32,fp4", "--seeds", "0,2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert (report["model"], report["seeds"], report["dataset"]) == ("vit", [0, 2], "digits")
    rows = {r["recipe"]: r for r in report["results"]}
    assert rows["fp32"]["gap_to_fp32_points"] == 0 and rows["fp32"]["step_time_ratio_to_fp32"] == 1
    assert rows["fp4"]["test_accuracy"] == pytest.approx([0.90, 0.92])
    assert rows["fp4"]["test_accuracy_mean"] == pytest.approx(0.91)
    assert rows["fp4"]["test_accuracy_std"] == pytest.approx(0.01 * 2**0.5)
    assert rows["fp4"]["gap_to_fp32_points"] == pytest.approx(-5.0)
    assert rows["fp4"]["step_time_ratio_to_fp32"] == pytest.approx(2.5)
    assert rows["fp4"]["wall_time_s"] == pytest.approx(4.0) and rows["fp4"]["compile_time_s"] == pytest.approx(1.5)
    assert (tmp_path / "comparison.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "91.00 ± 1.41" in out and "-5.00" in out and "2.50x" in out
    fp4_row = next(line for line in out.splitlines() if " fp4 " in line)
    assert "4.0" in fp4_row and "1.5" in fp4_row  # wall and compile time beside the step-time ratio
    assert "wall time (s)" in out and "compile time (s)" in out and "2 seeds" in out


def test_compare_with_one_seed_shows_no_spread(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "_run", _fake_run)
    assert _main(["compare", "--recipes", "fp32,fp4", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "comparison.json").read_text())["results"]
    assert [r["test_accuracy_std"] for r in rows] == [None, None]
    out = capsys.readouterr().out
    assert "±" not in out and "96.00" in out and "1 seed " in out and "no spread" in out


def test_compare_refuses_an_earlier_comparison_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "_run", _fake_run)
    (tmp_path / "fp4" / "seed2").mkdir(parents=True)
    (tmp_path / "fp4" / "seed2" / "metrics.json").write_text("{}")
    monkeypatch.setattr(cli_train, "_dataset", lambda args: pytest.fail("loaded the dataset first"))
    argv = ["compare", "--recipes", "fp32,fp4", "--seeds", "0,2", "--out", str(tmp_path)]
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/fp4/seed2 hold(s) an earlier comparison; add --overwrite" in err
    monkeypatch.undo()
    monkeypatch.setattr(cli_train, "_run", _fake_run)
    assert _main([*argv, "--overwrite"]) == 0


def test_comparison_plot_states_where_the_accuracy_axis_starts(tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr(
        cli_compare, "plot_bars", lambda path, title, names, panels: captured.update(names=names, panels=panels)
    )
    rows = [
        dict(recipe="fp32", test_accuracy_mean=0.95, test_accuracy_std=0.01, step_time_ms=10.0),
        dict(recipe="fp4", test_accuracy_mean=0.91, test_accuracy_std=0.02, step_time_ms=25.0),
    ]
    cli_compare._plot_comparison(rows, tmp_path / "c.png", "digits", [0, 1])
    accuracy, step = captured["panels"]
    assert accuracy.floor == 80 and accuracy.ceiling == 100  # 5 points under 89 (= 91 - 2), down to a 10
    assert accuracy.errors == pytest.approx([1.0, 2.0]) and step.floor is None
    one_seed = [dict(rows[0], test_accuracy_mean=0.3, test_accuracy_std=None)]
    cli_compare._plot_comparison(one_seed, tmp_path / "c.png", "digits", [0])
    assert captured["panels"][0].floor == 20 and captured["panels"][0].errors is None
    cli_compare._plot_comparison([dict(one_seed[0], test_accuracy_mean=0.12)], tmp_path / "c.png", "digits", [0])
    assert captured["panels"][0].floor is None  # near chance: the full axis from 0
