"""Static calibration: an optax-style observer (explicit pytree state) and ``calibrate``.

The running statistic per scale source:

* ``absmax``: running max of ``|x|`` (signed range: running min and max of ``x``);
  exactly the statistic of all batches concatenated.
* ``kl``: a running histogram of nonzero ``|x|`` (2048 bins over a power-of-two range
  that doubles, merging bin pairs exactly, when a batch outgrows it), so it
  equals the histogram of all batches at once; the threshold is searched once,
  in ``Observer.scale``.
* ``percentile``, ``mse``: the running mean of the per-batch clips (a
  percentile or an MSE search needs the batch itself; the mean works at any
  granularity).
* ``ptf``: running per-channel min/max; each channel's factor is then the
  smallest that covers its range (the data are gone by then).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from lowbit.formats._checks import check_float_input
from lowbit.quant import scales
from lowbit.quant.layout import layout
from lowbit.quant.params import QParams, from_clip
from lowbit.quant.sources import DATA_SCALES, KL, Absmax

if TYPE_CHECKING:
    from lowbit.quant.quantizer import Quantizer


class CalibrationState(NamedTuple):
    """Running calibration statistics of one tensor (a pytree).

    Attributes:
      count: int32 scalar, batches observed.
      lo, hi: float32 clips in the scales' kept-dims shape: running min/max
        (``absmax``, ``kl``; ``lo = -hi`` for a magnitude) or running means of
        the per-batch clips (``percentile``, ``mse``).
      hist: int32 ``(2048,)`` counts of nonzero ``|x|`` over ``[0, hist_range)`` (``kl``), else ``(0,)``.
      hist_range: float32 scalar, a power of two (0 before the first batch).
    """

    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as NamedTuples may
    lo: jax.Array
    hi: jax.Array
    hist: jax.Array
    hist_range: jax.Array


class Observer(NamedTuple):
    """Pure functions over a ``CalibrationState`` (like an optax ``GradientTransformation``).

    Attributes:
      init: ``(x) -> state`` for tensors shaped like ``x`` (an array or
        ``jax.ShapeDtypeStruct``).
      update: ``(state, x) -> state``: fold one batch's tensor in (jit-able).
      scale: ``(state) -> QParams``: the static quantization parameters.
    """

    init: Callable[[Any], CalibrationState]
    update: Callable[[CalibrationState, jax.Array], CalibrationState]
    scale: Callable[[CalibrationState], QParams]


def _not_static(q: Quantizer) -> ValueError:
    return ValueError(
        f"Quantizer.scale={q.scale!r} is invalid for calibration; allowed: a data-driven source with "
        "static=True, e.g. Absmax(static=True) (a dynamic quantizer takes its scale from every call)"
    )


def _require_static(q: Quantizer) -> None:
    if not q.static:
        raise _not_static(q)


def init(q: Quantizer, x: jax.Array | jax.ShapeDtypeStruct) -> CalibrationState:
    shape = layout(q, x.shape).scale_shape
    zeros = jnp.zeros(shape, jnp.float32)
    nbins = scales.KL_BINS if isinstance(q.scale, KL) else 0
    return CalibrationState(
        jnp.zeros((), jnp.int32), zeros, zeros, jnp.zeros(nbins, jnp.int32), jnp.zeros((), jnp.float32)
    )


def update(q: Quantizer, state: CalibrationState, x: jax.Array) -> CalibrationState:
    x = check_float_input(x)
    lay = layout(q, x.shape)
    xw = x.astype(jnp.float32).reshape(lay.work)
    count = state.count + 1
    if isinstance(q.scale, (Absmax, KL)):
        lo, hi = scales.absmax(q, xw, lay.reduce)
        lo, hi = jnp.minimum(state.lo, lo), jnp.maximum(state.hi, hi)
    elif isinstance(q.scale, DATA_SCALES):
        lo, hi = q.scale.clip(q, xw, lay.reduce)
        n = count.astype(jnp.float32)
        lo, hi = state.lo + (lo - state.lo) / n, state.hi + (hi - state.hi) / n
    else:  # Fixed, Learned, Delayed: no clip to calibrate
        raise _not_static(q)
    hist, hist_range = state.hist, state.hist_range
    if isinstance(q.scale, KL):
        hist_range = jnp.maximum(hist_range, scales.histogram_range(jnp.max(hi)))
        hist = scales.rebin(hist, state.hist_range, hist_range) + scales.histogram(xw, hist_range)
    return CalibrationState(count, lo, hi, hist, hist_range)


def scale(q: Quantizer, state: CalibrationState) -> QParams:
    lo, hi = state.lo, state.hi
    if isinstance(q.scale, KL):
        hi = jnp.minimum(scales.kl_threshold(state.hist, state.hist_range, scales.kl_levels(q.format)), hi)
        lo = -hi
    return from_clip(q, lo, hi)


_update_jit = jax.jit(update, static_argnums=0)
_scale_jit = jax.jit(scale, static_argnums=0)


def observer(q: Quantizer) -> Observer:
    """The observer of static quantizer ``q``.

    Raises:
      ValueError: ``q`` is not static.
    """
    _require_static(q)
    return Observer(functools.partial(init, q), functools.partial(_update_jit, q), functools.partial(_scale_jit, q))


def calibrate(q: Quantizer, fn: Callable[[Any], Any], batches: Iterable[Any]) -> Any:
    """Run ``fn`` over ``batches`` and fold every tensor it returns into running statistics.

    Args:
      q: a static quantizer (a data-driven source with ``static=True``).
      fn: ``batch -> tensor`` (or a pytree of tensors, e.g. every activation a
        model records); each tensor keeps its own statistics.
      batches: an iterable of whatever ``fn`` takes.

    Returns:
      A ``CalibrationState`` (a pytree of them, shaped like ``fn``'s output):
      pass it as ``state=`` to ``fake_quant`` / ``quantize``, or turn it into
      ``QParams`` once with ``observer(q).scale(state)``.

    Raises:
      ValueError: ``q`` is not static, or ``batches`` is empty.
    """
    _require_static(q)
    states, treedef = None, None
    for batch in batches:
        leaves, treedef = jax.tree_util.tree_flatten(fn(batch))
        if states is None:
            states = [init(q, x) for x in leaves]
        states = [_update_jit(q, s, x) for s, x in zip(states, leaves)]
    if states is None:
        raise ValueError("calibrate needs at least one batch; batches was empty")
    return jax.tree_util.tree_unflatten(treedef, states)


def params_from_state(q: Quantizer, state: CalibrationState | QParams) -> QParams:
    """``QParams`` from a ``CalibrationState`` (or ``QParams`` as they are)."""
    if isinstance(state, QParams):
        return state
    if isinstance(state, CalibrationState):
        p: QParams = _scale_jit(q, state)  # jax.jit drops the return type
        return p
    raise TypeError(f"state has type {type(state).__name__}; allowed: CalibrationState or QParams")
