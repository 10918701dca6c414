"""lowbit.nn.lm and the language-model path of the trainer and CLI: shapes, causality, quantized ops,
training on a tiny corpus, bit-exact resume, the ``lowbit train --dataset text`` run."""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit import data as lowbit_data
from lowbit import text, trainer
from lowbit.cli import compare as cli_compare
from lowbit.cli import train as cli_train
from lowbit.cli.args import HelpFormatter
from lowbit.nn.lm import LM, greedy
from lowbit.trainer import loop

_TINY = dict(context=8, dim=16, depth=1, heads=2, mlp_dim=32)
_CLI_TINY = ["--context", "8", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--no-progress"]
# Repetitive text: a tiny model learns it within a few steps.
_CORPUS = "".join(f"def f{i % 7}(x):\n    return x + {i % 3}\n\n" for i in range(40))


def _tokens(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "code.py").write_text(_CORPUS)
    return directory


# --- the model ------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_forward_shapes(positions):
    model = LM(**_TINY, positions=positions, rngs=nnx.Rngs(0))
    assert model(_tokens(3, 8)).shape == (3, 8, 256)
    assert model(_tokens(2, 5)).shape == (2, 5, 256)  # shorter than the context
    with pytest.raises(ValueError, match="a sequence of 9 tokens is longer than context=8"):
        model(_tokens(1, 9))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal(positions):
    model = LM(**_TINY, positions=positions, rngs=nnx.Rngs(0))
    x = _tokens(2, 8)
    for t in (0, 3, 7):
        changed = x.at[:, t].set((x[:, t] + 1) % 256)
        a, b = model(x), model(changed)
        np.testing.assert_array_equal(a[:, :t], b[:, :t])  # nothing before t sees token t
        assert not np.allclose(a[:, t], b[:, t])  # position t does


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dim=10, heads=4), "dim 10 is not divisible by heads 4"),
        (dict(depth=0), "depth must be >= 1, got 0"),
        (dict(positions="alibi"), "positions='alibi' is unknown; allowed: learned, rotary"),
        (dict(dim=6, heads=2, positions="rotary"), "rotary positions need an even head width"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LM(**(_TINY | kwargs), rngs=nnx.Rngs(0))


def test_registered_as_a_built_in_model():
    model = lowbit.nn.models.build("lm", vocab_size=256, context=8, seed=0)
    assert isinstance(model, LM) and model.config["context"] == 8
    with pytest.raises(ValueError, match="pass image_shape= and num_classes= .* or vocab_size= and context="):
        lowbit.nn.models.build("lm", vocab_size=256, seed=0)


@pytest.mark.parametrize("recipe", ["fp8", "fp4", "int8", "nvfp4"])
def test_quantized_ops_include_the_tied_head(recipe):
    qmodel = lowbit.quantize(LM(**_TINY, rngs=nnx.Rngs(0)), recipe)
    desc = lowbit.describe(qmodel, _tokens(2, 8))
    assert not desc.unmatched
    found = {(op.path, op.kind) for op in desc.quantized}
    linears = {f"blocks/0/{name}" for name in ("attn/qkv", "attn/proj", "mlp_in", "mlp_out")}
    assert {path for path, kind in found if kind == "dot_general"} == linears | {""}  # "": the root's tied head
    assert {kind for path, kind in found if path == "blocks/0/attn"} == {"einsum"}  # QK^T and AV
    assert len(desc.quantized) == 7
    head = next(op for op in desc.quantized if op.path == "")
    assert head.weighted and head.rhs != "float"  # the embedding, a parameter, quantized as a weight


def test_greedy_continues_with_the_argmax():
    model = LM(**_TINY, rngs=nnx.Rngs(1))
    prompt = b"def f(x"  # 7 bytes: the first window is padded, the next ones slide (two shapes to compile)
    out = greedy(model, prompt, 3, context=8)
    seq = list(prompt)
    for _ in range(3):  # the same by hand, on the unpadded window
        window = jnp.asarray([seq[-8:]], jnp.int32)
        seq.append(int(jnp.argmax(model(window)[0, -1])))
    assert out == bytes(seq[len(prompt) :]) and len(out) == 3
    with pytest.raises(ValueError, match="prompt must hold at least one byte"):
        greedy(model, b"", 1, context=8)


# --- the trainer ----------------------------------------------------------------------

_HP = dict(batch_size=8, seed=1, learning_rate=1e-2, weight_decay=0.01, warmup=0.5, progress=False, keep=2)


def _qmodel(recipe="fp8", seed=0):
    return lowbit.quantize(LM(**_TINY, rngs=nnx.Rngs(seed)), recipe)


def _leaves(model):
    return [
        np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(nnx.state(model))
    ]


def _interrupt_after(k):
    """``lowbit.data.batches`` that sends SIGINT as the loop asks for its (k+1)-th batch: k + 1 steps run."""
    real, count = lowbit_data.batches, 0

    def batches(*args, **kw):
        nonlocal count
        for item in real(*args, **kw):
            if count == k:
                os.kill(os.getpid(), signal.SIGINT)
            count += 1
            yield item

    return batches


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """fp8 on the tiny corpus, 3 epochs: uninterrupted; then, from a copy of its epoch-2 checkpoint,
    resumed, stopped by SIGINT 2 steps into epoch 3, and resumed again."""
    dataset = text.load_text(corpus, context=8)
    full_dir, cut_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut")
    full = _qmodel()
    full_metrics = loop.train(full, dataset, recipe="fp8", epochs=3, out_dir=full_dir, **_HP)
    shutil.copytree(full_dir / "checkpoints" / "epoch_0002", cut_dir / "checkpoints" / "epoch_0002")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lowbit_data, "batches", _interrupt_after(1))
        stopped = loop.train(_qmodel(seed=7), dataset, recipe="fp8", epochs=3, out_dir=cut_dir, resume=True, **_HP)
    resumed = _qmodel(seed=9)  # the restored state must replace every initial value
    resumed_metrics = loop.train(resumed, dataset, recipe="fp8", epochs=3, out_dir=cut_dir, resume=True, **_HP)
    return dict(
        dataset=dataset,
        full=full,
        full_metrics=full_metrics,
        full_dir=full_dir,
        stopped=stopped,
        resumed=resumed,
        resumed_metrics=resumed_metrics,
    )


@pytest.mark.slow
def test_fp8_training_reduces_the_loss_and_reports_bits_per_byte(runs):
    metrics, dataset = runs["full_metrics"], runs["dataset"]
    history = metrics["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"] and history[0]["loss"] < math.log(256) + 0.5
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    for h in history:
        assert h["perplexity"] == pytest.approx(math.exp(h["test_loss"]))
        assert h["bits_per_byte"] == pytest.approx(h["test_loss"] / math.log(2))
        assert 0 <= h["test_accuracy"] <= 1 and 0 <= h["train_acc"] <= 1
    saved = json.loads((runs["full_dir"] / "metrics.json").read_text())
    for key in ("test_loss", "perplexity", "bits_per_byte"):
        assert saved[key] == pytest.approx(history[-1][key])
    assert saved["model"]["type"] == "LM" and saved["dataset"] == "text"
    assert (runs["full_dir"] / "curves.png").stat().st_size > 0
    assert len(dataset.x_train) // _HP["batch_size"] >= 2  # more than one step per epoch


@pytest.mark.slow
def test_resume_is_bit_exact(runs):
    stopped = runs["stopped"]
    assert stopped["stopped"] and stopped["stopped_at"] == dict(epoch=2, step=2)
    for a, b in zip(_leaves(runs["full"]), _leaves(runs["resumed"]), strict=True):
        np.testing.assert_array_equal(a, b)
    keys = ("loss", "test_loss", "bits_per_byte", "train_acc", "test_accuracy")
    full, resumed = runs["full_metrics"]["history"], runs["resumed_metrics"]["history"]
    assert [[h[k] for k in keys] for h in full] == [[h[k] for k in keys] for h in resumed]


def _token_dataset(x_train, x_test=None):
    x_test = x_train if x_test is None else x_test
    return text.TextDataset(
        x_train=x_train, y_train=x_train, x_test=x_test, y_test=x_test, num_classes=256, name="text"
    )


@pytest.mark.parametrize(("where", "value"), [("x_train", 256), ("x_test", -1)])
def test_out_of_range_token_ids_fail_before_training(where, value):
    x = np.zeros((8, 8), np.int32)
    bad = x.copy()
    bad[3, 5] = value
    dataset = _token_dataset(bad if where == "x_train" else x, bad if where == "x_test" else None)
    with pytest.raises(
        ValueError, match=rf"dataset.{where} has 1 token ids outside \[0, 256\).* {value} at index \[3, 5\]"
    ):
        loop.train(_qmodel(), dataset, recipe="fp8", epochs=1, batch_size=4, progress=False)


def test_image_model_on_tokens_is_a_clear_error():
    from lowbit.nn.models import MLP

    model = MLP(image_shape=(8, 1, 1), num_classes=10, rngs=nnx.Rngs(0))  # takes 8 values per example
    dataset = _token_dataset(np.zeros((8, 8), np.int32))
    with pytest.raises(
        ValueError, match=r"maps a batch of shape \[4, 8\] to \[4, 10\]; expected logits of shape \[4, 8, "
    ):
        loop.train(model, dataset, recipe="fp32", epochs=1, batch_size=4, progress=False)


# --- the CLI --------------------------------------------------------------------------


def _main(argv):
    parser = argparse.ArgumentParser(prog="lowbit", formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(required=True)
    cli_train.add_train_parser(subparsers)
    cli_compare.add_compare_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "lm"], "--model lm does not fit --dataset digits: --model lm trains on --dataset text"),
        (["--dataset", "text", "--model", "vit"], "--model vit does not fit --dataset text: --dataset text needs"),
        (["--context", "8"], "--context sets the window of --dataset text, not of --dataset digits"),
        (["--dataset", "text", "--patch-size", "2"], "--patch-size set(s) the size of --model vit, not of --model lm"),
        (["--positions", "rotary"], "--positions set(s) the size of --model lm, not of --model vit"),
        (["--dataset", "text", "--data-dir", "/nonexistent/corpus"], "text data not found: /nonexistent/corpus"),
        (["--dataset", "text", "--positions", "alibi"], "positions='alibi' is unknown; allowed: learned, rotary"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained"))
    assert _main(["train", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_text_defaults_and_summary(corpus, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_train(model, dataset, **kw):
        seen.update(kw, model=model, dataset=dataset)
        return dict(
            recipe="fp8",
            dataset="text",
            epochs=kw["epochs"],
            seed=0,
            test_accuracy=0.5,
            test_loss=1.5,
            perplexity=math.exp(1.5),
            bits_per_byte=1.5 / math.log(2),
            final_loss=1.25,
            train_time_s=3.0,
            step_time_ms=2.0,
            skipped_steps=0,
            stopped=False,
        )

    monkeypatch.setattr(trainer, "train", fake_train)
    argv = ["train", "--dataset", "text", "--data-dir", str(corpus), "--recipe", "fp8", "--out", str(tmp_path)]
    assert _main([*argv, *_CLI_TINY]) == 0
    assert (seen["epochs"], seen["warmup"]) == (2, 0.25)
    assert isinstance(seen["model"], LM) and lowbit.nn.is_quantized(seen["model"])
    assert seen["model"].config["context"] == 8 and seen["dataset"].x_train.shape[1] == 8
    out = capsys.readouterr().out
    assert "fp8 on text, 2 epochs, seed 0: held-out loss 1.5000, perplexity 4.48, 2.164 bits/byte" in out
    assert 'greedy sample (80 bytes): "' in out and "test accuracy" not in out


def test_escape_keeps_the_sample_on_one_line():
    assert cli_train._escape(b'a\n\t"\\\x00\xff') == '"a\\n\\t\\"\\\\\\x00\\xff"'


def test_compare_ranks_language_models_by_bits_per_byte(corpus, tmp_path, monkeypatch, capsys):
    def fake_run(args, dataset, recipe, seed, out, *, resume):
        bits = {"fp32": 2.0, "fp8": 2.1}[recipe.name] + 0.1 * seed
        return dict(
            bits_per_byte=bits,
            test_accuracy=0.5,
            step_time_ms=10.0,
            train_time_s=1.0,
            wall_time_s=2.0,
            compile_time_s=1.0,
            stopped=False,
        )

    monkeypatch.setattr(cli_train, "_run", fake_run)
    argv = ["compare", "--dataset", "text", "--data-dir", str(corpus), "--recipes", "fp32,fp8", "--seeds", "0,1"]
    assert _main([*argv, "--out", str(tmp_path), *_CLI_TINY]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    rows = {r["recipe"]: r for r in report["results"]}
    assert report["model"] == "lm" and rows["fp8"]["bits_per_byte_mean"] == pytest.approx(2.15)
    assert rows["fp8"]["gap_to_fp32_bits_per_byte"] == pytest.approx(0.1)
    assert "held-out bits/byte" in capsys.readouterr().out and (tmp_path / "comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_cli_trains_from_relative_paths_and_prints_a_sample(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "code.py").write_text(_CORPUS)
    script = shutil.which("lowbit")
    cmd = [script] if script else [sys.executable, "-m", "lowbit.cli"]
    argv = [*cmd, "train", "--dataset", "text", "--data-dir", "corpus", "--recipe", "fp8", "--epochs", "1"]
    argv += ["--batch-size", "8", "--out", "run", *_CLI_TINY]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout.count("epoch 1/1: loss ") == 1 and "bits/byte" in done.stdout and "tok/s" in done.stdout
    assert "fp8 on text, 1 epoch, seed 0: held-out loss " in done.stdout
    (sample,) = [line for line in done.stdout.splitlines() if line.startswith("greedy sample (80 bytes): ")]
    assert sample.count('"') >= 4 and "\n" not in sample
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["bits_per_byte"] == pytest.approx(metrics["test_loss"] / math.log(2))
