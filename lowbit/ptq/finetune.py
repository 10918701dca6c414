"""Quantization-robust fine-tuning of any float NNX model before PTQ.

Works per op (``lowbit.ptq.capture``): every matmul and convolution the forward
pass runs.

Methods:

* ``noise``: every step, the weight of each op gets fresh uniform noise of one
  quantization step of the target format, per output channel and recomputed
  from the current weights (``lowbit.ptq.noise.adaptive_noise``), so the noise
  follows each op's range and outliers; optionally every activation operand PTQ
  quantizes (op inputs, attention's Q, K, V and probabilities) gets the same
  per tensor, on the grid PTQ would use for it (unsigned where the operand is
  never negative). The gradient at the noisy weights updates the clean ones:
  the model moves to where rounding hurts less.
* ``outlier``: the task loss plus ``outlier_weight`` times the outlier penalty
  (``lowbit.ptq.outlier``) of every op operand (activations per tensor,
  weights per output channel), which shrinks the ranges PTQ must cover. Left
  out: the model's input (the first weighted op's lhs) and softmax
  probabilities (the lhs of ``softmax_ops``), whose ranges the data and softmax fix.
* ``both``: the two together.
* ``plain``: the same optimisation without either, the control that tells
  what extra training alone gives.

The model stays a float model: PTQ runs afterwards (``lowbit ptq``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowbit import data as lowbit_data
from lowbit import formats
from lowbit.formats._checks import check_int, require
from lowbit.nn.quantize import Op, discover, intercepting, op_name, ops, quantize
from lowbit.ptq import capture
from lowbit.ptq.config import METHODS, SOFTMAX_OPS, resolve_format
from lowbit.ptq.evaluate import evaluate
from lowbit.ptq.noise import adaptive_noise
from lowbit.ptq.outlier import outlier_penalty, range_ratio
from lowbit.recipes.rules import Recipe, Rule, compile_regex
from lowbit.trainer.step import make_optimizer

__all__ = ["METHODS", "FinetuneConfig", "finetune", "operand_range_ratio"]

_OWN = "FinetuneConfig"
# One rule that quantizes nothing: every op runs through the runner, where the noise is added.
_EVERY_OP = Recipe(name="float-every-op", rules=(Rule(),))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune.

    Attributes:
      method: ``noise``, ``outlier``, ``both`` or ``plain``.
      target_format: the PTQ format the noise imitates (``int4``, ``float4_e2m1fn``, ...).
      noise_activations: also add noise to the activation operands of every op.
      outlier_weight: weight of the outlier penalty in the loss.
      outlier_threshold: ``k``: values beyond ``k`` RMS count as outliers.
      epochs: passes over the training set.
      batch_size: examples per step.
      learning_rate: peak AdamW learning rate (warmup over the first 10% of
        steps, cosine decay after).
      weight_decay: AdamW weight decay on matrices.
      seed: data order and noise.
      softmax_ops: regex on op names (``path:key``) whose lhs is a softmax
        output (left out of the outlier penalty); default: the built-in ViT's.
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
    softmax_ops: str = SOFTMAX_OPS

    def __post_init__(self):
        require(self.method in METHODS, _OWN, "method", self.method, ", ".join(METHODS))
        require(
            isinstance(self.noise_activations, bool), _OWN, "noise_activations", self.noise_activations, "True or False"
        )
        check_int(_OWN, "seed", self.seed, 0)
        compile_regex(_OWN, "softmax_ops", self.softmax_ops)
        resolve_format(self.target_format)
        for field in ("outlier_weight", "outlier_threshold", "learning_rate", "weight_decay"):
            value = getattr(self, field)
            require(
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                _OWN,
                field,
                value,
                "a finite number >= 0",
            )
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


def _reduce_axes(op: Op) -> tuple[int, ...]:
    """The axes one per-output-channel scale of the op's weight covers: all but the channel axis."""
    channel = op.call.axes(len(op.lhs_shape), len(op.rhs_shape))["rhs"][1] % len(op.rhs_shape)
    return tuple(a for a in range(len(op.rhs_shape)) if a != channel)


def _penalized(qmodel, calls: dict, softmax_ops: str) -> list[tuple[jax.Array, Any]]:
    """Every recorded operand the model shapes, with the axes its quantization scale covers.

    Left out: the model's input (the first weighted op's lhs) and the softmax
    probabilities, whose ranges are fixed by the data and by softmax.
    """
    out = []
    first = next((op for op in ops(qmodel) if op.call.weighted), None)
    for op in ops(qmodel):
        name = op_name(op.path, op.key)
        if name not in calls:
            continue
        lhs, rhs, _ = calls[name]
        if op is not first and not re.fullmatch(softmax_ops, name):
            out.append((lhs, None))
        out.append((rhs, _reduce_axes(op) if op.call.weighted else None))
    return out


def _unsigned_twin(fmt):
    """The unsigned integer format of ``fmt``'s width (PTQ's grid for a never-negative operand), or ``fmt``."""
    if isinstance(fmt, formats.IntFormat) and fmt.signed:
        return formats.IntFormat(bits=fmt.bits, signed=False, name=f"uint{fmt.bits}")
    return fmt


def _activation_noise(key, x, fmt):
    """``adaptive_noise`` per tensor on the grid PTQ would give ``x``: unsigned where ``x`` is never negative."""
    signed = adaptive_noise(key, x, fmt)
    unsigned = adaptive_noise(key, x, _unsigned_twin(fmt))
    return jnp.where(jnp.min(x) >= 0, unsigned, signed)


def _perturb(cfg: FinetuneConfig, by_name: dict, key, run, name, state, call, lhs, rhs):
    """``intercepting`` wrap: the op on noisy operands (weights per channel, activations per tensor)."""
    fmt = resolve_format(cfg.target_format)
    k_w, k_x, k_r = jax.random.split(jax.random.fold_in(key, zlib.crc32(name.encode())), 3)
    if call.weighted:
        rhs = rhs + adaptive_noise(k_w, rhs, fmt, _reduce_axes(by_name[name]))
    if cfg.noise_activations:
        lhs = lhs + _activation_noise(k_x, lhs, fmt)
        if not call.weighted:
            rhs = rhs + _activation_noise(k_r, rhs, fmt)
    return run(lhs, rhs)


def _loss(graphdef, cfg: FinetuneConfig, params, rest, x, y, key):
    model = nnx.merge(graphdef, params, rest)
    by_name = {op_name(op.path, op.key): op for op in ops(model)}
    wrap = functools.partial(_perturb, cfg, by_name, key) if cfg.noise else None
    with intercepting(model, capture=cfg.outlier, wrap=wrap) as recorded:
        logits = model(x)
    calls = {op_name(r.path, r.key): (r.lhs, r.rhs, r.out) for r in recorded}
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
    terms = [outlier_penalty(v, cfg.outlier_threshold, axes) for v, axes in _penalized(model, calls, cfg.softmax_ops)]
    penalty = jnp.mean(jnp.stack(terms)) if terms else jnp.zeros((), jnp.float32)
    new_rest = nnx.split(model, nnx.Param, ...)[2]
    return ce + jnp.float32(cfg.outlier_weight) * penalty, (ce, penalty, new_rest)


def _step(graphdef, cfg, tx, params, rest, opt_state, x, y, key):
    grads, (ce, penalty, rest) = jax.grad(functools.partial(_loss, graphdef, cfg), has_aux=True)(
        params, rest, x, y, key
    )
    # optax mixes float32 hyperparameters with the parameters (strict promotion rejects that).
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, rest, opt_state, ce, penalty


def finetune(model: nnx.Module, dataset: lowbit_data.Dataset, cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``model`` in place with ``cfg``'s method.

    Args:
      model: a float NNX classifier or language model (any; the built-in
        ``vit``, ``mlp``, ``cnn``, ``lm`` or a user's); left in eval mode.
      dataset: training data, and the test set scored after every epoch.
      cfg: the method and its settings.

    Returns:
      ``config``, ``float_accuracy_before``, ``float_accuracy`` (after),
      ``train_time_s`` and per-epoch ``history`` (``loss`` = cross-entropy,
      ``penalty``, ``test_accuracy``; a language model's also ``test_loss`` and
      ``bits_per_byte``, and the result ``bits_per_byte_before`` / ``bits_per_byte``).

    Raises:
      ValueError: ``cfg.batch_size`` exceeds the training set.
    """
    text = lowbit_data.is_text(dataset)
    before = _score(model, dataset, text)
    steps = len(dataset.x_train) // cfg.batch_size
    require(steps > 0, _OWN, "batch_size", cfg.batch_size, f"at most the {len(dataset.x_train)} training examples")
    # Every op runs through the runner (a rule that quantizes nothing), where the noise goes in.
    work = quantize(model, _EVERY_OP)
    discover(work, jnp.asarray(dataset.x_train[:1]))
    work.train()
    graphdef, params, rest = nnx.split(work, nnx.Param, ...)
    tx = make_optimizer(cfg.learning_rate, cfg.weight_decay, max(1, steps * cfg.epochs // 10), steps * cfg.epochs)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(_step, graphdef, cfg, tx))
    # RBG keys: XLA's own generator compiles far faster than threefry for the many noise draws per step.
    key = jax.random.key(cfg.seed, impl="rbg")
    history, start, n = [], time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        ces, penalties = [], []
        for x, y in lowbit_data.batches(dataset.x_train, dataset.y_train, cfg.batch_size, seed=(cfg.seed, epoch)):
            params, rest, opt_state, ce, penalty = step(
                params, rest, opt_state, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(key, n)
            )
            ces.append(float(ce))
            penalties.append(float(penalty))
            n += 1
        nnx.update(work, params, rest)
        history.append(
            dict(
                epoch=epoch + 1,
                loss=float(np.mean(ces)),
                penalty=float(np.mean(penalties)),
                **_score(work, dataset, text),
            )
        )
        work.train()
    # The rule quantizes nothing, so its ops have no state: the float model's variables are all there is.
    nnx.update(model, nnx.state(work, nnx.Variable))
    model.eval()
    return dict(
        config=dataclasses.asdict(cfg),
        float_accuracy_before=before["test_accuracy"],
        float_accuracy=history[-1]["test_accuracy"],
        **(
            dict(bits_per_byte_before=before["bits_per_byte"], bits_per_byte=history[-1]["bits_per_byte"])
            if text
            else {}
        ),
        train_time_s=time.perf_counter() - start,
        history=history,
    )


def _score(model: nnx.Module, dataset: lowbit_data.Dataset, text: bool) -> dict[str, float]:
    """``test_accuracy``, and for a language model its held-out ``test_loss`` (nats) and ``bits_per_byte``."""
    scores = evaluate(model, dataset.x_test, dataset.y_test)
    extra = dict(test_loss=scores["loss"], bits_per_byte=scores["loss"] / math.log(2)) if text else {}
    return dict(test_accuracy=scores["accuracy"], **extra)


def operand_range_ratio(model: nnx.Module, images, softmax_ops: str = SOFTMAX_OPS) -> float:
    """Mean ``max|x| / rms(x)`` over every op operand on ``images``: how outlier-heavy the model is.

    The operands are those the outlier penalty covers (see ``FinetuneConfig``).
    """
    model.eval()
    probed = capture.probe(model, jnp.asarray(images[:1]))
    calls = capture.record(probed, images)
    return float(np.mean([float(range_ratio(v, axes)) for v, axes in _penalized(probed, calls, softmax_ops)]))
