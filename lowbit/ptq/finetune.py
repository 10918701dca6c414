"""Quantization-robust fine-tuning of a float ViT before PTQ.

Methods:

* ``noise``: every step, each linear layer's kernel gets fresh uniform noise of
  one quantization step of the target format, per output channel and
  recomputed from the current weights (``lowbit.ptq.noise.adaptive_noise``),
  so the noise follows each layer's range and outliers; optionally every
  activation operand PTQ quantizes (linear inputs, attention's Q, K, V and
  probabilities) gets the same per tensor, on the grid PTQ would use for it. The gradient at the noisy weights
  updates the clean ones: the model moves to where rounding hurts less.
* ``outlier``: the task loss plus ``outlier_weight`` times the outlier penalty
  (``lowbit.ptq.outlier``) of every matmul operand (activations per tensor,
  kernels per output channel), which shrinks the ranges PTQ must cover.
* ``both``: the two together.
* ``plain``: the same optimisation without either, the control that tells
  what extra training alone gives.

The model stays a float model: PTQ runs afterwards (``lowbit ptq``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowbit import data as lowbit_data
from lowbit.formats._checks import check_int, require
from lowbit.nn.layers import QLinear
from lowbit.ptq.capture import quantized_layers, recording, role_of, set_child
from lowbit.ptq import vit
from lowbit.ptq.config import PTQConfig, resolve_format
from lowbit.ptq.evaluate import accuracy
from lowbit.ptq.noise import adaptive_noise
from lowbit.ptq.outlier import outlier_penalty, range_ratio
from lowbit.trainer.step import make_optimizer

__all__ = ["METHODS", "FinetuneConfig", "finetune", "operand_range_ratio"]

METHODS = ("noise", "outlier", "both", "plain")
_OWN = "FinetuneConfig"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune.

    Attributes:
      method: ``noise``, ``outlier``, ``both`` or ``plain``.
      target_format: the PTQ format the noise imitates (``int4``, ``float4_e2m1fn``, ...).
      noise_activations: also add noise to the activation operands of every matmul.
      outlier_weight: weight of the outlier penalty in the loss.
      outlier_threshold: ``k``: values beyond ``k`` RMS count as outliers.
      epochs: passes over the training set.
      batch_size: examples per step.
      learning_rate: peak AdamW learning rate (warmup over the first 10% of
        steps, cosine decay after).
      weight_decay: AdamW weight decay on matrices.
      seed: data order and noise.
    """

    method: str = "noise"
    target_format: str = "int4"
    noise_activations: bool = True
    outlier_weight: float = 1.0
    outlier_threshold: float = 3.0
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    seed: int = 0

    def __post_init__(self):
        require(self.method in METHODS, _OWN, "method", self.method, ", ".join(METHODS))
        resolve_format(self.target_format)
        for field in ("outlier_weight", "outlier_threshold", "learning_rate", "weight_decay"):
            value = getattr(self, field)
            require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, _OWN, field, value,
                    "a finite number >= 0")
        check_int(_OWN, "epochs", self.epochs, 1)
        check_int(_OWN, "batch_size", self.batch_size, 1)

    @property
    def noise(self) -> bool:
        """Whether the method injects quantization noise."""
        return self.method in ("noise", "both")

    @property
    def outlier(self) -> bool:
        """Whether the method adds the outlier penalty."""
        return self.method in ("outlier", "both")


def _operands(calls) -> list[tuple[jax.Array, Any]]:
    """Every recorded operand the model shapes, with the axes its quantization scale covers.

    Left out: the pixels (``patch``'s input) and the softmax probabilities
    (``attn_av``'s input), whose ranges are fixed by the data and by softmax.
    """
    out = []
    for name, recorded in calls.items():
        lhs, rhs, _ = recorded[0]
        if role_of(name) not in ("patch", "attn_av"):
            out.append((lhs, None))
        out.append((rhs, (0,) if rhs.ndim == 2 else None))  # a kernel is scaled per output channel
    return out


def _loss(graphdef, cfg: FinetuneConfig, params, rest, x, y, key):
    model = nnx.merge(graphdef, params, rest)
    layers = quantized_layers(model)
    fmt = resolve_format(cfg.target_format)
    wrapped = {}
    if cfg.noise:
        for i, (name, layer) in enumerate(layers.items()):
            k_w, k_x = jax.random.split(jax.random.fold_in(key, i))
            if isinstance(layer, QLinear):
                layer.kernel[...] = layer.kernel[...] + adaptive_noise(k_w, layer.kernel[...], fmt, (0,))
            if cfg.noise_activations:
                wrapped[name] = set_child(model, name, _noisy_inputs(layer, role_of(name), k_x, cfg.target_format))
    with recording(layers) if cfg.outlier else contextlib.nullcontext({}) as calls:
        logits = model(x)
    for name, layer in wrapped.items():
        set_child(model, name, layer)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
    terms = [outlier_penalty(v, cfg.outlier_threshold, axes) for v, axes in _operands(calls)]
    penalty = jnp.mean(jnp.stack(terms)) if terms else jnp.zeros((), jnp.float32)
    new_rest = nnx.split(model, nnx.Param, ...)[2]
    return ce + jnp.float32(cfg.outlier_weight) * penalty, (ce, penalty, new_rest)


def _noisy_inputs(layer, role: str, key, target: str):
    """``layer`` with noise on the inputs PTQ quantizes as activations, on the grid PTQ would give each."""
    operands = ("lhs",) if isinstance(layer, QLinear) else ("lhs", "rhs")
    grids = [vit.activation_quantizer(role, op, PTQConfig(activations=target)).format for op in operands]

    def call(*xs):
        keys = jax.random.split(key, len(xs))
        return layer(*(x + adaptive_noise(k, x, g) for x, k, g in zip(xs, keys, grids)))
    return call


def _step(graphdef, cfg, tx, params, rest, opt_state, x, y, key):
    grads, (ce, penalty, rest) = jax.grad(functools.partial(_loss, graphdef, cfg), has_aux=True)(
        params, rest, x, y, key)
    # optax mixes float32 hyperparameters with the parameters (strict promotion rejects that).
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, rest, opt_state, ce, penalty


def finetune(model: nnx.Module, dataset: lowbit_data.Dataset, cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``model`` in place with ``cfg``'s method.

    Args:
      model: a float ViT (``lowbit.nn.ViT``); left in eval mode.
      dataset: training data, and the test set scored after every epoch.
      cfg: the method and its settings.

    Returns:
      ``config``, ``float_accuracy_before``, ``float_accuracy`` (after),
      ``train_time_s`` and per-epoch ``history`` (``loss`` = cross-entropy,
      ``penalty``, ``test_accuracy``).

    Raises:
      ValueError: ``cfg.batch_size`` exceeds the training set.
    """
    before = accuracy(model, dataset.x_test, dataset.y_test)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps = len(dataset.x_train) // cfg.batch_size
    require(steps > 0, _OWN, "batch_size", cfg.batch_size, f"at most the {len(dataset.x_train)} training examples")
    tx = make_optimizer(cfg.learning_rate, cfg.weight_decay, max(1, steps * cfg.epochs // 10), steps * cfg.epochs)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(_step, graphdef, cfg, tx))
    # RBG keys: XLA's own generator compiles far faster than threefry for the many noise draws per step.
    key = jax.random.key(cfg.seed, impl="rbg")
    history, start, n = [], time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        ces, penalties = [], []
        for x, y in lowbit_data.batches(dataset.x_train, dataset.y_train, cfg.batch_size, seed=(cfg.seed, epoch)):
            params, rest, opt_state, ce, penalty = step(params, rest, opt_state, jnp.asarray(x), jnp.asarray(y),
                                                        jax.random.fold_in(key, n))
            ces.append(float(ce))
            penalties.append(float(penalty))
            n += 1
        nnx.update(model, params, rest)
        history.append(dict(epoch=epoch + 1, loss=float(np.mean(ces)), penalty=float(np.mean(penalties)),
                            test_accuracy=accuracy(model, dataset.x_test, dataset.y_test)))
        model.train()
    model.eval()
    return dict(config=dataclasses.asdict(cfg), float_accuracy_before=before,
                float_accuracy=history[-1]["test_accuracy"], train_time_s=time.perf_counter() - start,
                history=history)


def operand_range_ratio(model: nnx.Module, images) -> float:
    """Mean ``max|x| / rms(x)`` over every matmul operand on ``images``: how outlier-heavy the model is."""
    model.eval()
    layers = quantized_layers(model)
    with recording(layers) as calls:
        model(jnp.asarray(images))
    return float(np.mean([float(range_ratio(v, axes)) for v, axes in _operands(calls)]))
