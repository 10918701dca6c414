"""The public train step: one optimizer step of a Flax NNX classifier or language model as a pure function.

For users with their own loop::

    tx = make_optimizer(3e-3, 0.05, warmup_steps=100, total_steps=3000)
    graphdef, state = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
    step = jax.jit(make_train_step(graphdef, tx, policy=recipe.policy))
    evaluate = jax.jit(make_eval_step(graphdef, policy=recipe.policy))  # make_lm_eval_step for token models
    for x, y in batches:
        state, metrics = step(state, x, y)  # metrics: loss, correct, skipped
    nnx.update(model, state.params, state.overwrite, state.rest)  # back into the module

The model is handled functionally: it is split into three states,

* ``params``: ``nnx.Param`` (weights and learned quantizer parameters such as LSQ
  steps and PACT clips), updated by the optimizer;
* ``overwrite``: ``OverwriteWithGradient`` variables (GradScale, amax histories;
  Params too, split off first), whose "gradient" is their new value, computed by
  the quantized backward pass;
* ``rest``: everything else (RNG streams for dropout and stochastic rounding),
  carried from step to step.

The step is written for the global batch: under ``jax.jit`` with the batch sharded
over a ``data`` mesh axis (GSPMD), quantizer statistics (amax, GradScale) are
global reductions and the result does not depend on the device count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowbit.nn.variables import OverwriteWithGradient
from lowbit.recipes import carried
from lowbit.training.loss_scale import all_finite, skip_nonfinite
from lowbit.training.policy import Policy

__all__ = ["TrainState", "init_state", "make_eval_step", "make_lm_eval_step", "make_optimizer", "make_train_step"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; a pytree, checkpointed whole.

    Attributes:
      params: The ``nnx.Param`` state, ``OverwriteWithGradient`` excluded.
      overwrite: The ``OverwriteWithGradient`` state.
      rest: All other model state (RNG streams...).
      opt_state: Optimizer state (for :func:`make_optimizer`, an
        ``optax.ApplyIfFiniteState`` whose ``total_notfinite`` counts skipped steps).
      loss_scale: The loss scale (``lowbit.training.loss_scale``).
    """

    params: nnx.State
    overwrite: nnx.State
    rest: nnx.State
    opt_state: Any
    loss_scale: Any


def make_optimizer(
    learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to zero, skipping non-finite steps.

    Weight decay applies to matrices only: decaying biases, LayerNorm scales,
    positions or learned quantizer steps and clips would pull them toward zero
    for no regularisation benefit.

    Args:
      learning_rate: Peak learning rate, reached after ``warmup_steps``.
      weight_decay: AdamW decoupled weight decay.
      warmup_steps: Steps of linear warmup from 0.
      total_steps: Steps until the cosine reaches 0.

    Returns:
      The optimizer, wrapped by ``skip_nonfinite``: a step with a non-finite
      gradient changes nothing and is counted in ``total_notfinite``.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
    adamw = optax.adamw(schedule, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
    return skip_nonfinite(adamw)


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, policy: Policy, loss_scale: Any
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` into its graph definition and the initial train state.

    Args:
      model: An NNX classifier; it is put in train mode (dropout on).
      tx: The optimizer (e.g. :func:`make_optimizer`); its state is initialised
        from the parameters.
      policy: Precision policy; parameters are stored in its parameter dtype.
      loss_scale: The initial loss scale (a recipe's ``make_loss_scale()``).

    Returns:
      ``(graphdef, state)``: the model's structure, for :func:`make_train_step`
      and :func:`make_eval_step`, and its state.
    """
    model.train()
    graphdef, overwrite, params, rest = _split(model)
    params = policy.cast_to_param(params)
    return graphdef, TrainState(params, overwrite, rest, tx.init(params), loss_scale)


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, overwrite, params, rest)``; ``OverwriteWithGradient`` is an ``nnx.Param``: split off first."""
    return nnx.split(model, OverwriteWithGradient, nnx.Param, ...)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, policy: Policy
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step for a model split by :func:`init_state`.

    Args:
      graphdef: From :func:`init_state`.
      tx: The optimizer whose state ``init_state`` created. It must skip steps
        with non-finite gradients (:func:`make_optimizer` does).
      policy: Precision policy: inputs are cast to its compute dtype.

    Returns:
      ``step(state, x, y) -> (state, metrics)``, pure and ready for ``jax.jit``:
      ``x`` is a (B, H, W, C) image batch, ``y`` its (B,) int32 labels in
      ``[0, classes)``; or, for a language model, ``x`` (B, T) int32 token ids and
      ``y`` (B, T) the next tokens, the model returning (B, T, vocab) logits.
      ``metrics`` holds ``loss`` (mean cross-entropy over every example, and every
      position of a sequence; float32 scalar), ``correct`` (int32 count of argmax
      hits, per position for sequences) and ``skipped`` (bool: the loss, a
      gradient or a pixel of ``x`` was inf/NaN, so parameters, optimizer state and
      GradScale were left unchanged; the loss scale still adjusts, except for
      non-finite pixels).
    """

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(diff):
            params, overwrite = diff
            model = nnx.merge(graphdef, params, overwrite, state.rest, copy=True)
            with carried.managed():  # this step overwrites the state itself: no misuse check in its program
                logits = model(policy.cast_to_compute(x))
            loss = _cross_entropy(logits, y)
            rest = _split(model)[3]
            return state.loss_scale.scale(loss), (loss, logits, rest)

        (grads, new_overwrite), (loss, logits, rest) = jax.grad(loss_fn, has_aux=True)((state.params, state.overwrite))
        grads = state.loss_scale.unscale(grads)
        # NaN/inf pixels skip the step whatever the recipe: a quantizer saturates an
        # inf input to a finite value, so the loss alone would not show it.
        finite_input = jnp.all(jnp.isfinite(x))
        finite = all_finite(grads) & jnp.isfinite(loss) & finite_input
        # A NaN loss can come with finite gradients (an out-of-range label, a masked
        # NaN): poisoning the gradients makes the optimizer's finite check skip the
        # step and count it with the others in total_notfinite.
        grads = jax.tree.map(
            lambda g: jnp.where(finite, g, jnp.nan) if jnp.issubdtype(g.dtype, jnp.floating) else g, grads
        )
        # optax.adamw mixes its float32 hyperparameters and counters with the
        # parameters, which jax_numpy_dtype_promotion="strict" rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        # A skipped step must not adopt GradScale values computed from inf/NaN gradients.
        overwrite = jax.tree.map(
            lambda new, old: jnp.where(finite, new.astype(old.dtype), old), new_overwrite, state.overwrite
        )
        # Bad data says nothing about the loss scale's range: it is left as it was.
        loss_scale = jax.tree.map(
            lambda new, old: jnp.where(finite_input, new, old), state.loss_scale.adjust(finite), state.loss_scale
        )
        new_state = TrainState(params, overwrite, rest, opt_state, loss_scale)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return new_state, dict(loss=loss, correct=correct, skipped=~finite)

    return step


def make_eval_step(
    graphdef: nnx.GraphDef, *, policy: Policy
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], jax.Array]:
    """The evaluation step for a model split by :func:`init_state`.

    Args:
      graphdef: From :func:`init_state`; the model is switched to eval mode
        (dropout off) inside the step.
      policy: Precision policy: inputs are cast to its compute dtype.

    Returns:
      ``evaluate(state, x, y, mask) -> correct``, pure and ready for ``jax.jit``:
      the int32 count of examples where ``mask`` (a (B,) bool array; False marks
      padding) is set, every pixel is finite (a NaN/inf image counts as
      misclassified) and the argmax of the logits equals ``y``.
    """

    def evaluate(state: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        logits = _eval_logits(graphdef, state, policy, x)
        finite = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)  # NaN/inf images: misclassified
        return jnp.sum((jnp.argmax(logits, axis=-1) == y) & mask & finite)

    return evaluate


def make_lm_eval_step(
    graphdef: nnx.GraphDef, *, policy: Policy
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The evaluation step of a language model split by :func:`init_state`.

    Args:
      graphdef: From :func:`init_state`; the model is switched to eval mode inside the step.
      policy: Precision policy (token ids are integers: nothing to cast).

    Returns:
      ``evaluate(state, x, y, mask) -> (loss_sum, correct)``, pure and ready for
      ``jax.jit``: ``x`` (B, T) int32 token ids, ``y`` (B, T) the next tokens,
      ``mask`` (B,) bool, False for padding. ``loss_sum`` is the float32 sum of the
      per-position cross-entropies (nats) over the examples ``mask`` keeps;
      ``correct`` the int32 count of positions there whose argmax equals ``y``.
      Divide both by the number of positions evaluated for the means.
    """

    def evaluate(state: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = _eval_logits(graphdef, state, policy, x).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # (B, T)
        keep = mask[:, None]
        return jnp.sum(jnp.where(keep, losses, 0.0)), jnp.sum((jnp.argmax(logits, axis=-1) == y) & keep)

    return evaluate


def _eval_logits(graphdef: nnx.GraphDef, state: TrainState, policy: Policy, x: jax.Array) -> jax.Array:
    """The model's output on ``x`` in eval mode (dropout off)."""
    model = nnx.merge(graphdef, state.params, state.overwrite, state.rest, copy=True)
    model.eval()
    return model(policy.cast_to_compute(x))
