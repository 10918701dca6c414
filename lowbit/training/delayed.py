"""Delayed scaling: a per-tensor scale from an amax history (TransformerEngine's recipe).

A ``Quantizer(scale=Delayed(history=L, reduction=R))`` takes its
clip not from the tensor it quantizes but from the absmaxes ("amaxes") of the
same tensor in the ``L`` previous steps, as TransformerEngine's
``DelayedScaling`` and Flax's ``fp8_ops`` do. The scale is then known before
the tensor is, and the step's own amax only feeds the history.

The history of one tensor is a float32 array of shape ``(L,)``: entry 0 is the
most recent step's amax, entry ``i`` the amax ``i`` steps before it; 0 marks a
step not seen yet (an all-zero tensor also records 0: it has no scale to give).
``lowbit.training.qdot`` keeps one history per delayed operand of a product
(``lhs``, ``rhs``, and ``grad`` for the incoming gradient) and returns the
updated histories as the cotangents of the histories it was given, GradScale's
overwrite-with-gradient mechanism: a train step replaces the state by its
"gradient". Without a backward pass (evaluation) the history stays as it is.

Per step, for a tensor ``x`` with history ``h``:

* ``amax = max |x|`` over its finite entries (as ``Absmax()``);
* ``clip = max(h)`` (``amax_reduction="max"``) or ``h[0]`` (``"most_recent"``);
* ``step = clip / q.max_level`` (then rounded to ``q.scale_format``) and
  ``x`` is quantized with it, saturating values above the clip; **an empty
  history** (``clip == 0``: the first step, or only all-zero tensors so far)
  gives ``step = 1``, the format's own grid, as TransformerEngine's initial
  scale of 1. The quantized values then never wait for ``max |x|``: the
  amax reduction only feeds the history, off the product's critical path
  (falling back to the current amax would put it back on it, for every
  step, to help the first one);
* the new history is ``[amax, h[0], ..., h[L-2]]``.

Under data parallelism written for the global batch (GSPMD), ``max |x|`` is
the global amax: XLA inserts the cross-device reduction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from lowbit.quant import scales
from lowbit.quant._arith import div
from lowbit.quant.sources import Delayed

if TYPE_CHECKING:
    from lowbit.quant import Quantizer

__all__ = ["amax", "history_init", "reduce", "step", "update"]


def history_init(length: int) -> jax.Array:
    """An empty history: float32 zeros of shape ``(length,)``."""
    return jnp.zeros((length,), jnp.float32)


def amax(q: Quantizer, x: ArrayLike) -> jax.Array:
    """The largest finite magnitude of ``x`` (float32 scalar; 0 if none), as ``Absmax()`` computes it."""
    return scales.absmax(q, jnp.asarray(x, jnp.float32), None)[1].reshape(())


def reduce(q: Quantizer, history: jax.Array) -> jax.Array:
    """The clip ``history`` gives (float32 scalar): its ``max`` or its ``most_recent`` entry."""
    assert isinstance(q.scale, Delayed), q.scale  # a delayed quantizer
    return jnp.max(history) if q.scale.reduction == "max" else history[0]


def step(q: Quantizer, history: jax.Array) -> jax.Array:
    """The step of delayed quantizer ``q``: the history's clip over ``q.max_level``, 1 for an empty history.

    Args:
      q: a ``Quantizer`` with ``scale=Delayed()``.
      history: its ``(L,)`` amax history.

    Returns:
      float32 scalar step, to pass as ``fake_quant(q, x, scale=step)``.
    """
    clip = reduce(q, history)
    return jnp.where(clip > 0, div(clip, jnp.float32(q.max_level)), jnp.float32(1))


def update(history: jax.Array, current: jax.Array) -> jax.Array:
    """``history`` with ``current`` (this step's amax) in front and its oldest entry dropped."""
    return jnp.concatenate([current.astype(history.dtype)[None], history[:-1]])
