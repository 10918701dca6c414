"""lowbit.cli.ptq: the ``ptq`` and ``finetune`` subcommands."""

import argparse
import json
import os
import shutil

import pytest

from lowbit import ptq
from lowbit.cli import main
from lowbit.cli import ptq as cli_ptq
from lowbit.ptq import config, finetune, weights
from lowbit.ptq.config import PTQConfig, WeightPTQConfig
from lowbit.ptq.gptq import GPTQ

_TINY = ["--patch-size", "4", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32"]


def _parser():
    parser = argparse.ArgumentParser(prog="lowbit")
    subparsers = parser.add_subparsers(required=True)
    cli_ptq.add_ptq_parser(subparsers)
    cli_ptq.add_finetune_parser(subparsers)
    return parser


def _main(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The --out directory of a one-epoch fp32 `lowbit train` on digits (accuracy does not matter here)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--recipe", "fp32", "--epochs", "1", *_TINY, "--out", str(out), "--no-progress"]) == 0
    return out


def test_choices_are_the_library_lists():
    from lowbit.quant.sources import DATA_SCALES

    # One list each: the CLI takes the library's own (the calibration names are lowbit.quant's clip sources).
    assert cli_ptq.CALIBRATIONS is config.CALIBRATIONS
    assert tuple(config.SOURCES.values()) == DATA_SCALES
    assert (cli_ptq.SOFTMAX, cli_ptq.GELU, cli_ptq.LAYERNORM) == (config.SOFTMAX, config.GELU, config.LAYERNORM)
    assert cli_ptq.METHODS is finetune.METHODS
    # --method: calibrate (the default: what `lowbit ptq` did before it had methods), then the library's
    # weight methods, by the names quantize_weights takes.
    assert cli_ptq.PTQ_METHODS is config.PTQ_METHODS and config.PTQ_METHODS[0] == config.CALIBRATE
    assert weights.WEIGHT_METHODS is config.WEIGHT_METHODS and config.PTQ_METHODS[1:] == tuple(weights.WEIGHT_METHODS)


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "ptq",
            [
                "--checkpoint",
                "--weights",
                "--calibration",
                "--softmax",
                "--layernorm",
                "--noisy-bias",
                "--calibration-data",
                "--sweep",
                "--method",
                "--group-size",
                "--damping",
                "--act-order",
                "--alpha",
            ],
        ),
        ("finetune", ["--method", "--target-format", "--outlier-weight"]),
    ],
)
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags)


def _error(argv, capsys):
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("command", [["ptq"], ["finetune", "--method", "noise"]])
def test_missing_checkpoint(command, tmp_path, capsys):
    err = _error(command + ["--checkpoint", str(tmp_path / "nope")], capsys)
    assert "does not exist" in err and "lowbit train" in err


@pytest.mark.parametrize("command", [["ptq"], ["finetune", "--method", "noise"]])
def test_unwritable_out_fails_before_the_checkpoint_is_read(command, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _error(command + ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "file" / "o")], capsys)
    assert f"--out {tmp_path}/file/o cannot be created" in err and "is a file" in err


def test_directory_without_checkpoint(tmp_path, capsys):
    assert "holds no metadata.json" in _error(["ptq", "--checkpoint", str(tmp_path)], capsys)


def _edited_copy(run_dir, tmp_path, edit):
    """A copy of the run's checkpoint whose metadata.json went through ``edit``."""
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    copy = tmp_path / ckpt.name
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    edit(meta)
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # An edited model config is damage (the checksum covers the metadata), not another run; a real
        # other-run checkpoint is IncompatibleCheckpointError (tests/test_checkpoint.py).
        (lambda m: m["model"]["config"].update(dim=32), "does not match its checksum"),
        (lambda m: m["model"].update(type="ResNet"), "not a lowbit model checkpoint"),
        (lambda m: m.update(dataset="cifar10"), "does not match its checksum"),  # metadata is checksummed too
    ],
)
@pytest.mark.slow  # end to end on a trained ViT
def test_mismatched_checkpoint(run_dir, tmp_path, capsys, edit, message):
    assert message in _error(["ptq", "--checkpoint", str(_edited_copy(run_dir, tmp_path, edit))], capsys)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (dict(recipe="fp4"), "was trained with recipe 'fp4'; PTQ starts from a float model"),
        (dict(dataset="cifar10"), "CIFAR-10 needs a data directory"),
        (dict(dataset="fashion-mnist"), "apt-get install -y dataset-fashion-mnist"),
    ],
)
def test_checkpoint_of_another_recipe_or_dataset(run_dir, capsys, monkeypatch, edit, message):
    # What the CLI checks after a valid checkpoint loads: the run's recipe and dataset.
    from lowbit.ptq import restore

    load = restore.load_model
    monkeypatch.setattr(restore, "load_model", lambda path: (lambda m, meta: (m, meta | edit))(*load(path)))
    monkeypatch.setattr("lowbit.data.DEFAULT_FASHION_MNIST_DIR", "/nonexistent/fashion-mnist")
    assert message in _error(["ptq", "--checkpoint", str(run_dir)], capsys)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--weights", "int1"], "unknown format 'int1'"),
        (["--activations", "mxfp4_e2m1"], "not a scalar"),
        (["--activations", "float8_e4m3fn", "--softmax", "log2"], "needs a signed integer"),
        (["--dynamic", "--noisy-bias"], "noisy_bias"),
    ],
)
def test_bad_settings(run_dir, capsys, flags, message):
    assert message in _error(["ptq", "--checkpoint", str(run_dir)] + flags, capsys)


def test_bad_granularity_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["ptq", "--checkpoint", "x", "--granularity", "group:0"])
    assert exit_info.value.code == 2
    assert "group:N" in capsys.readouterr().err


@pytest.mark.slow  # end to end on a trained ViT
def test_ptq_writes_metrics_and_plot(run_dir, tmp_path, capsys, monkeypatch):
    # Relative --checkpoint and --out, as a user types them: resolved against the working directory.
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(run_dir, tmp_path)
    out = tmp_path / "ptq"
    argv = ["ptq", "--checkpoint", relative, "--samples", "64", "--granularity", "group:8", "--out", "ptq"]
    assert _main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label"] == "W8A8" and metrics["config"]["group_size"] == 8
    assert 0 <= metrics["test_accuracy"] <= 1 and len(metrics["ops"]) == 8
    assert all("sqnr_db" in op for op in metrics["ops"])
    assert metrics["ops"][2]["name"] == "blocks/0/attn:einsum0"
    assert (out / "layer_sqnr.png").stat().st_size > 0
    assert "W8A8" in capsys.readouterr().out


@pytest.mark.slow  # end to end on a trained ViT
def test_finetune_then_ptq(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out: the fine-tuned checkpoint is written through orbax
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--checkpoint",
        str(run_dir),
        "--method",
        "plain",
        "--target-format",
        "int4",
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--out",
        "ft",
    ]
    assert _main(argv) == 0
    assert "for 1 epoch:" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["config"]["method"] == "plain"
    model, meta = ptq.load_model(out)
    assert meta["finetune"]["target_format"] == "int4" and model.config["dim"] == 16


@pytest.fixture(scope="module")
def loaded(run_dir):
    """``_load``'s result for ``run_dir``, read once: the weight-method tests share it (loading is tested above)."""
    return cli_ptq._load(argparse.Namespace(checkpoint=run_dir, data_dir=None))


def _config(argv):
    return cli_ptq._config(_parser().parse_args(["ptq", "--checkpoint", "x", *argv]))


def test_default_method_is_calibrate_with_the_old_defaults():
    # Every invocation from before --method existed: the same PTQConfig, its defaults untouched by the CLI.
    assert _config([]) == PTQConfig()
    assert _config(["--weights", "int4", "--granularity", "group:8"]) == PTQConfig(
        weights="int4", granularity="group", group_size=8
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "gptq"], WeightPTQConfig()),  # W4A16 g128
        (
            [
                "--method",
                "gptq",
                "--damping",
                "0.05",
                "--act-order",
                "--group-size",
                "channel",
                "--activations",
                "int8",
            ],
            WeightPTQConfig(method=GPTQ(damping=0.05, act_order=True), group_size=None, activations="int8"),
        ),
        (
            ["--method", "rtn", "--group-size", "0", "--weights", "nf4"],
            WeightPTQConfig(method=weights.RTN(), weights="nf4", group_size=None),
        ),
        (
            ["--method", "smoothquant", "--alpha", "0.8", "--weights", "int8", "--activations", "int8"],
            WeightPTQConfig(method=config.SmoothQuant(alpha=0.8), weights="int8", activations="int8"),
        ),
        (
            [
                "--method",
                "smoothquant+gptq",
                "--alpha",
                "0.7",
                "--damping",
                "0.05",
                "--act-order",
                "--activations",
                "int8",
            ],
            WeightPTQConfig(
                method=config.SmoothQuant(alpha=0.7, then=GPTQ(damping=0.05, act_order=True)), activations="int8"
            ),
        ),
        (
            ["--method", "awq", "--activations", "none", "--group-size", "32", "--exclude", "patch_embed:.*"],
            WeightPTQConfig(method=config.AWQ(), group_size=32, exclude="patch_embed:.*"),
        ),
    ],
)
def test_weight_method_settings(argv, expected):
    assert _config(argv) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--method", "gptq", "--softmax", "log2"],
            "--softmax does not apply to --method gptq; it applies to --method calibrate",
        ),
        (
            ["--method", "rtn", "--damping", "0.1"],
            "--damping does not apply to --method rtn; it applies to --method gptq",
        ),
        (
            ["--method", "gptq", "--alpha", "0.3"],
            "--alpha does not apply to --method gptq; it applies to --method smoothquant",
        ),
        (
            ["--group-size", "32"],
            "--group-size does not apply to --method calibrate; it applies to --method rtn / gptq / awq / smoothquant",
        ),
        (["--method", "awq", "--granularity", "group:8"], "--granularity does not apply to --method awq"),
        (["--exclude", "head:.*"], "--exclude does not apply to --method calibrate"),
        (["--method", "rtn", "--include", "("], "WeightPTQConfig.include"),
        (["--method", "smoothquant", "--sweep"], "--sweep does not apply to --method smoothquant"),
        (["--activations", "none"], "--activations none does not apply to --method calibrate"),
        (["--method", "gptq", "--damping", "2"], "GPTQ.damping=2.0 is invalid"),
        (["--method", "rtn", "--weights", "int1"], "unknown format 'int1'"),
        (["--method", "rtn", "--activations", "nf4"], "not a scalar"),
    ],
)
def test_option_of_another_method(tmp_path, capsys, flags, message):
    # Bad flags fail before the checkpoint is read (it does not exist here).
    assert message in _error(["ptq", "--checkpoint", str(tmp_path / "nope")] + flags, capsys)


def test_bad_group_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["ptq", "--checkpoint", "x", "--method", "rtn", "--group-size", "g8"])
    assert exit_info.value.code == 2
    assert "expected N >= 1, 0 or channel" in capsys.readouterr().err


@pytest.mark.slow  # end to end on a trained ViT
def test_group_size_not_dividing_an_op(loaded, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_ptq, "_load", lambda args: loaded)
    argv = ["ptq", "--checkpoint", "x", "--method", "rtn", "--group-size", "5", "--samples", "16"]
    err = _error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "group size 5 does not divide the input dimension" in err


@pytest.mark.parametrize(
    ("flags", "label"),
    [
        (["--method", "rtn", "--exclude", "head:.*"], "W4A16"),
        (["--method", "gptq", "--act-order"], "W4A16"),
        (["--method", "awq"], "W4A16"),
        # SmoothQuant's scaled inputs, with GPTQ on the smoothed weights (plain SmoothQuant: test_ptq_methods).
        (["--method", "smoothquant+gptq", "--act-order", "--activations", "int8"], "W4A8"),
    ],
)
@pytest.mark.slow  # end to end on a trained ViT
def test_weight_method_writes_metrics(loaded, monkeypatch, tmp_path, capsys, flags, label):
    monkeypatch.setattr(cli_ptq, "_load", lambda args: loaded)
    out = tmp_path / "ptq"
    argv = ["ptq", "--checkpoint", "x", *flags, "--group-size", "8", "--samples", "32", "--out", str(out)]
    assert _main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    method = flags[1]
    assert metrics["method"] == metrics["config"]["method"] == method and metrics["label"] == label
    assert metrics["config"]["group_size"] == 8 and metrics["calibration_images"] == 32
    assert 0 <= metrics["test_accuracy"] <= 1
    rows = metrics["ops"]
    # The tiny ViT's weighted ops (its two attention einsums have no weight), less an excluded head.
    assert len(rows) == (5 if "--exclude" in flags else 6)
    assert all(r["method"] == method and r["error"] >= 0 and "rtn_error" in r and "sqnr_db" in r for r in rows)
    # Every op's output is measured as the model runs it: SmoothQuant's ops on their scaled inputs too.
    assert min(r["sqnr_db"] for r in rows) > 10
    if method == "gptq":  # GPTQ minimises exactly this error, from RTN's start
        assert sum(r["error"] for r in rows) < sum(r["rtn_error"] for r in rows)
    assert (out / "layer_sqnr.png").stat().st_size > 0
    assert f"{label} ({method}, " in capsys.readouterr().out
