"""lowbit.cli.train: the ``train`` and ``compare`` subcommands."""

import argparse
import json

import pytest

from lowbit.cli import train as cli_train
from lowbit.cli.train import add_compare_parser, add_train_parser

_SMALL = ["--epochs", "1", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--no-progress"]


def _parser():
    parser = argparse.ArgumentParser(prog="lowbit")
    subparsers = parser.add_subparsers(required=True)
    add_train_parser(subparsers)
    add_compare_parser(subparsers)
    return parser


def _main(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(("command", "flags"), [("train", ["--recipe", "--resume", "--devices", "--lr"]),
                                               ("compare", ["--recipes", "--seeds", "--dataset"])])
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"], "apt-get install"),
     (["train", "--dataset", "cifar10"], "CIFAR-10"),
     (["train", "--recipe", "fp3"], "unknown recipe 'fp3'"),
     (["compare", "--recipes", "fp32,nope"], "unknown recipe 'nope'"),
     (["compare", "--seeds", "0,x"], "--seeds"),
     (["train", "--batch-size", "10", "--devices", "3"], "not divisible")],
)
def test_bad_input_exits_2_without_traceback(argv, message, capsys):
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_numbers_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_one_epoch_on_digits(tmp_path, capsys):
    assert _main(["train", "--out", str(tmp_path), *_SMALL]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("recipe", "dataset", "epochs", "seed", "test_accuracy", "train_time_s", "step_time_ms",
                "final_loss", "history"):
        assert key in metrics
    assert metrics["recipe"] == "fp32" and metrics["dataset"] == "digits" and len(metrics["history"]) == 1
    assert metrics["test_accuracy"] > 0.2  # well above chance (0.1) after one epoch
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "test accuracy" in capsys.readouterr().out


def test_compare_summarises_every_recipe_and_seed(tmp_path, monkeypatch, capsys):
    # Training itself is covered above and in test_loop; here each run is faked.
    def fake_run(args, dataset, recipe, seed, out, *, resume):
        acc = {"fp32": 0.95, "fp4": 0.90}[recipe.name] + 0.01 * seed
        return dict(test_accuracy=acc, step_time_ms={"fp32": 10.0, "fp4": 25.0}[recipe.name], train_time_s=1.0)

    monkeypatch.setattr(cli_train, "_run", fake_run)
    assert _main(["compare", "--recipes", "fp32,fp4", "--seeds", "0,2", "--out", str(tmp_path)]) == 0
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "comparison.json").read_text())["results"]}
    assert rows["fp32"]["gap_to_fp32_points"] == 0 and rows["fp32"]["step_time_ratio_to_fp32"] == 1
    assert rows["fp4"]["test_accuracy"] == pytest.approx([0.90, 0.92])
    assert rows["fp4"]["test_accuracy_mean"] == pytest.approx(0.91)
    assert rows["fp4"]["test_accuracy_std"] == pytest.approx(0.01 * 2**0.5)
    assert rows["fp4"]["gap_to_fp32_points"] == pytest.approx(-5.0)
    assert rows["fp4"]["step_time_ratio_to_fp32"] == pytest.approx(2.5)
    assert (tmp_path / "comparison.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "91.00 ± 1.41" in out and "-5.00" in out and "2.50x" in out
