"""Post-training quantization and fine-tuning of a language model: a saved ``lm`` checkpoint goes through
``lowbit ptq`` and ``lowbit finetune`` as an image model does, scored in bits per byte."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowbit import data as lowbit_data
from lowbit.cli import ptq as cli_ptq
from lowbit.nn import models
from lowbit.nn.lm import LM
from lowbit.ptq import evaluate, load_model, save_model
from lowbit.ptq.finetune import FinetuneConfig, finetune

_TINY = dict(vocab_size=256, context=8, dim=16, depth=1, heads=2, mlp_dim=32)
_CORPUS = "".join(f"def f{i % 7}(x):\n    return x + {i % 3}\n\n" for i in range(40))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "code.py").write_text(_CORPUS)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(run directory, model)``: a tiny untrained LM saved as a float checkpoint of the text dataset."""
    model = LM(**_TINY, rngs=nnx.Rngs(3))
    out = tmp_path_factory.mktemp("lm-run")
    save_model(model, out, 1, dict(dataset="text", hparams=dict(learning_rate=1e-3)))
    return out, model


def _main(argv):
    parser = argparse.ArgumentParser(prog="lowbit")
    subparsers = parser.add_subparsers(required=True)
    cli_ptq.add_ptq_parser(subparsers)
    cli_ptq.add_finetune_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_example_input_fits_images_and_tokens():
    assert models.example_input(dict(image_shape=(8, 8, 1))).shape == (1, 8, 8, 1)
    tokens = models.example_input(dict(context=8, vocab_size=256))
    assert tokens.shape == (1, 8) and tokens.dtype == np.int32


def test_lm_checkpoint_round_trip(saved):
    out, model = saved
    loaded, meta = load_model(out)
    assert isinstance(loaded, LM) and meta["dataset"] == "text" and loaded.config == model.config
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    model.eval()
    assert jnp.array_equal(loaded(x), model(x))


def test_evaluate_scores_every_next_token(saved, corpus):
    _, model = saved
    dataset = lowbit_data.load("text", corpus, context=8)
    x, y = dataset.x_test[:7], dataset.y_test[:7]
    # batch_size 4: the padded last batch (labels -1) must not count.
    scores = evaluate.evaluate(model, x, y, batch_size=4)
    logits = model(jnp.asarray(x)).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
    correct = jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y))
    assert scores["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(float(correct))


def test_cli_ptq_of_an_lm_checkpoint_reports_bits_per_byte(saved, corpus, tmp_path, capsys):
    out, _ = saved
    argv = ["ptq", "--checkpoint", str(out), "--data-dir", str(corpus), "--method", "rtn", "--weights", "int4"]
    argv += ["--group-size", "8", "--samples", "32", "--out", str(tmp_path / "ptq")]
    assert _main(argv) == 0
    metrics = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    assert metrics["dataset"] == "text" and metrics["method"] == "rtn"  # GPTQ itself: tests/test_ptq_methods.py
    assert metrics["bits_per_byte"] == pytest.approx(metrics["test_loss"] / math.log(2))
    assert metrics["bits_per_byte_increase"] == pytest.approx(metrics["bits_per_byte"] - metrics["float_bits_per_byte"])
    methods = [r["method"] for r in metrics["ops"]]
    # qkv, attention out, MLP in and out; the tied head reads the embedding's transpose: float.
    assert methods == ["rtn"] * 4 + ["float"], methods
    assert all(np.isfinite(r["error"]) for r in metrics["ops"][:4])
    printed = capsys.readouterr().out
    assert "held-out " in printed and "bits/byte (float " in printed and "test accuracy" not in printed


def test_noise_finetune_of_an_lm_reports_bits_per_byte(saved, corpus):
    _, model = saved
    work = nnx.clone(model)
    dataset = lowbit_data.load("text", corpus, context=8)
    before = jax.tree.leaves(nnx.state(work, nnx.Param))
    cfg = FinetuneConfig(method="noise", target_format="int4", epochs=1, batch_size=16, learning_rate=1e-3)
    metrics = finetune(work, dataset, cfg)
    after = jax.tree.leaves(nnx.state(work, nnx.Param))
    assert any(not jnp.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert math.isfinite(metrics["bits_per_byte"]) and math.isfinite(metrics["bits_per_byte_before"])
    assert metrics["history"][-1]["bits_per_byte"] == metrics["bits_per_byte"]
    assert metrics["history"][-1]["bits_per_byte"] == pytest.approx(metrics["history"][-1]["test_loss"] / math.log(2))
