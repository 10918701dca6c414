"""Loss scaling for float16 (and other narrow-range) training.

A float16 gradient below about 6e-8 flushes to zero. Multiplying the loss by a
large factor S before differentiating shifts every gradient up by S, out of the
underflow range; dividing the gradients by S afterwards restores their true value
in a wider dtype. Three scales share one interface (:class:`LossScale`):

* :class:`NoOpLossScale` does nothing (float32 / bfloat16 training).
* :class:`StaticLossScale` multiplies by a fixed S.
* :class:`DynamicLossScale` doubles S after ``period`` consecutive finite steps
  and halves it after a non-finite one, never below ``min_scale``.

Every scale is an immutable pytree: ``adjust`` returns a new one, the scale and
step counter are leaves (they change inside ``jit``), and the configuration
(``min_scale``, ``period``, ``factor``) is static aux data, so it survives
``jit``, ``tree_flatten`` / ``tree_unflatten`` and checkpointing unchanged.

Dtypes, chosen to work under ``jax_numpy_dtype_promotion="strict"``:

* The scale is stored as a float32 scalar.
* ``scale(loss)`` casts the scale to the loss dtype and returns the loss dtype. A
  float16 loss overflows for scales above 65504; the dynamic scale sees the
  non-finite gradients and backs off, so this is self-correcting.
* ``unscale(grads)`` divides each floating leaf in float32 (float64 for float64
  leaves) and casts back to the leaf's dtype: one rounding, and the reciprocal of
  the scale never has to be representable in the leaf's dtype. Non-floating
  leaves (integer or ``float0`` gradients) pass through.

A typical step::

    def loss_fn(params):
        return loss_scale.scale(model_loss(params))

    grads = loss_scale.unscale(jax.grad(loss_fn)(params))
    loss_scale = loss_scale.adjust(all_finite(grads))
    updates, opt_state = optimizer.update(grads, opt_state, params)

with ``optimizer = skip_nonfinite(optax.adamw(...))`` so a step whose gradients
overflowed leaves parameters and optimizer state untouched.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax


class LossScale(Protocol):
    """Interface shared by every loss scale."""

    def scale(self, loss: jax.Array) -> jax.Array:
        """Returns ``loss`` multiplied by the current scale, in the loss dtype."""

    def unscale(self, grads: Any) -> Any:
        """Returns ``grads`` divided by the current scale, leaf dtypes kept."""

    def adjust(self, grads_finite: jax.Array) -> LossScale:
        """Returns the scale to use next, given whether this step's gradients were finite."""


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating element of a pytree is finite.

    Args:
      tree: A pytree of arrays. Non-floating leaves (ints, bools, ``float0``) are
        finite by definition and skipped.

    Returns:
      A scalar bool array; True for a tree with no floating leaves.
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_floating(x)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def skip_nonfinite(
    inner: optax.GradientTransformation, *, max_consecutive_errors: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so steps with non-finite gradients change nothing.

    On a step where any gradient is inf or NaN the wrapped optimizer returns zero
    updates and keeps the inner state as it was, so parameters, moments and step
    count are exactly those of the previous step. This is optax's
    ``apply_if_finite``; its state is the NamedTuple ``optax.ApplyIfFiniteState``
    (``notfinite_count``: consecutive skipped steps, ``last_finite``,
    ``total_notfinite``: all skipped steps, ``inner_state``).

    Args:
      inner: The optimizer to wrap, e.g. ``optax.adamw(1e-3)``.
      max_consecutive_errors: After this many consecutive non-finite steps, apply
        the update anyway. None (the default) never does: with loss scaling, a
        non-finite update would only destroy the parameters.

    Returns:
      The wrapped optimizer.

    Raises:
      ValueError: ``max_consecutive_errors`` is negative.
    """
    if max_consecutive_errors is None:
        # The counter saturates at the int32 maximum, so it can never exceed it.
        max_consecutive_errors = int(np.iinfo(np.int32).max)
    if max_consecutive_errors < 0:
        raise ValueError(f"max_consecutive_errors must be >= 0 or None, got {max_consecutive_errors}")
    return optax.apply_if_finite(inner, max_consecutive_errors)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOpLossScale:
    """A loss scale of one that never changes: scaling is the identity."""

    def scale(self, loss: jax.Array) -> jax.Array:
        """Returns ``loss`` unchanged."""
        return loss

    def unscale(self, grads: Any) -> Any:
        """Returns ``grads`` unchanged."""
        return grads

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        """Returns ``self``."""
        del grads_finite  # Nothing to adapt.
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticLossScale:
    """A fixed loss scale.

    Attributes:
      loss_scale: The multiplier S, a float32 scalar (Python numbers are converted).
    """

    loss_scale: jax.Array

    def __post_init__(self) -> None:
        _set_scalar_leaf(self, "loss_scale", jnp.float32)

    def scale(self, loss: jax.Array) -> jax.Array:
        """Returns ``loss * S`` in the loss dtype."""
        return loss * self.loss_scale.astype(loss.dtype)

    def unscale(self, grads: Any) -> Any:
        """Returns ``grads / S``, each floating leaf divided in float32 and cast back."""
        return _unscale(grads, self.loss_scale)

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        """Returns ``self``: a static scale does not adapt."""
        del grads_finite  # Nothing to adapt.
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicLossScale:
    """A loss scale that grows while gradients stay finite and shrinks when they don't.

    Attributes:
      loss_scale: The current multiplier S, a float32 scalar (Python numbers are
        converted). Leaf.
      counter: Consecutive finite steps since S last changed, an int32 scalar. Leaf.
      min_scale: S never drops below this. Static.
      period: S is multiplied by ``factor`` after this many consecutive finite
        steps. Static.
      factor: Growth and back-off factor, > 1. Static.
    """

    loss_scale: jax.Array = dataclasses.field(default_factory=lambda: jnp.float32(2.0**15))
    counter: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(0))
    min_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    period: int = dataclasses.field(default=2000, metadata=dict(static=True))
    factor: float = dataclasses.field(default=2.0, metadata=dict(static=True))

    def __post_init__(self) -> None:
        _set_scalar_leaf(self, "loss_scale", jnp.float32)
        _set_scalar_leaf(self, "counter", jnp.int32)
        # Normalised to Python scalars: they are hashed as jit cache keys.
        object.__setattr__(self, "min_scale", _positive_float("min_scale", self.min_scale, above=0.0))
        object.__setattr__(self, "factor", _positive_float("factor", self.factor, above=1.0))
        if isinstance(self.period, bool) or not isinstance(self.period, numbers.Integral) or self.period < 1:
            raise ValueError(f"period must be an integer >= 1, got {self.period!r}")
        object.__setattr__(self, "period", int(self.period))

    def scale(self, loss: jax.Array) -> jax.Array:
        """Returns ``loss * S`` in the loss dtype."""
        return loss * self.loss_scale.astype(loss.dtype)

    def unscale(self, grads: Any) -> Any:
        """Returns ``grads / S``, each floating leaf divided in float32 and cast back."""
        return _unscale(grads, self.loss_scale)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """Returns the scale for the next step.

        Args:
          grads_finite: Scalar bool, e.g. ``all_finite(grads)`` of this step.

        Returns:
          Finite: the counter advances; on reaching ``period`` S is multiplied by
          ``factor`` (unless that overflows float32) and the counter restarts.
          Non-finite: S is divided by ``factor``, clamped at ``min_scale``, and the
          counter restarts.
        """
        counter = self.counter + 1
        grow = counter >= self.period
        grown = self.loss_scale * self.factor
        # An infinite scale would turn every later loss into inf, and inf / factor
        # never recovers, so growth stops at the float32 maximum.
        grown = jnp.where(grow & jnp.isfinite(grown), grown, self.loss_scale)
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        return dataclasses.replace(
            self,
            loss_scale=jnp.where(grads_finite, grown, shrunk),
            counter=jnp.where(grads_finite & ~grow, counter, 0),
        )


def _is_floating(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _unscale(grads: Any, loss_scale: jax.Array) -> Any:
    def unscale_leaf(g: Any) -> Any:
        if not _is_floating(g):
            return g
        # ml_dtypes' finfo (jnp.finfo: it knows bfloat16) has no annotations, so mypy counts it untyped.
        wide = jnp.float64 if jnp.finfo(g.dtype).bits > 32 else jnp.float32  # type: ignore[no-untyped-call]
        return (g.astype(wide) / loss_scale.astype(wide)).astype(g.dtype)

    return jax.tree.map(unscale_leaf, grads)


def _set_scalar_leaf(obj: Any, name: str, dtype: Any) -> None:
    # Only Python numbers are converted: during tree_unflatten jax passes tracers,
    # arrays or placeholder objects as leaves, and those must stay as they are.
    value = getattr(obj, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        object.__setattr__(obj, name, jnp.asarray(value, dtype))


def _positive_float(name: str, value: Any, *, above: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= above:
        raise ValueError(f"{name} must be a finite number > {above:g}, got {value!r}")
    return float(value)
