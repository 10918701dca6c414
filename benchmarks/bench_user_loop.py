"""fp4 in a user's own NNX loop against ``lowbit.train`` on the same model and data.

GradScale (fp4) and amax histories (fp8_delayed) take their new value as their
gradient; a user's loop updates them through ``lowbit.optimizer(tx)``. This
trains the stock ViT (digits, lowbit.train's model and schedule) both ways,
per seed, and reports the test accuracies: the loop Flax's docs teach
(``nnx.Optimizer`` + ``nnx.value_and_grad`` + ``nnx.jit``, shuffled batches),
and ``lowbit.train``.

Usage: ``python benchmarks/bench_user_loop.py [--recipe fp4] [--seeds 0] [--epochs 15]``; writes
``results/bench_user_loop.json`` and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowbit
from lowbit import data
from lowbit.nn import models
from lowbit.trainer.step import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LR, WD, WARMUP_EPOCHS = 64, 3e-3, 0.05, 2  # lowbit.train's defaults


def _model(dataset, seed: int) -> nnx.Module:
    return models.build("vit", image_shape=dataset.x_train.shape[1:], num_classes=dataset.num_classes, seed=seed)


def user_loop(dataset, recipe: str, seed: int, epochs: int) -> float:
    """Test accuracy after the loop a user writes, with the one lowbit line (the optimizer)."""
    steps_per_epoch = len(dataset.x_train) // BATCH
    model = lowbit.quantize(_model(dataset, seed), recipe, jnp.asarray(dataset.x_train[:1]))
    tx = make_optimizer(LR, WD, WARMUP_EPOCHS * steps_per_epoch, epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, lowbit.optimizer(tx), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, x):
        return jnp.argmax(model(x), -1)

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(dataset.x_train))
        for i in range(steps_per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            step(model, optimizer, jnp.asarray(dataset.x_train[idx]), jnp.asarray(dataset.y_train[idx]))
    pred = np.concatenate(
        [
            np.asarray(predict(model, jnp.asarray(dataset.x_test[i : i + 256])))
            for i in range(0, len(dataset.x_test), 256)
        ]
    )
    return float((pred == dataset.y_test).mean())


def lowbit_train(dataset, recipe: str, seed: int, epochs: int) -> float:
    model = lowbit.quantize(_model(dataset, seed), recipe)
    metrics = lowbit.train(model, dataset, recipe=recipe, epochs=epochs, seed=seed, progress=False)
    return float(metrics["test_accuracy"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fp4")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    dataset = data.load("digits")
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for name, fn in (("user loop + lowbit.optimizer", user_loop), ("lowbit.train", lowbit_train)):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                acc = fn(dataset, args.recipe, seed, args.epochs)
            rows.append(
                dict(
                    recipe=args.recipe,
                    seed=seed,
                    loop=name,
                    epochs=args.epochs,
                    test_accuracy=acc,
                    seconds=time.perf_counter() - t0,
                    load=os.getloadavg()[0],
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_user_loop.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
