"""The public quantization functions: ``fake_quant``, ``quantize``, ``dequantize``, ``qparams``.

``dequantize(quantize(q, x))`` equals ``fake_quant(q, x)`` bit for bit (for
finite ``x``; integer codes cannot hold NaN): both compute the parameters the
same way and run the same float32 operations on them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from lowbit import formats
from lowbit.formats._checks import check_float_input, check_rounding
from lowbit.quant import scales
from lowbit.quant.calibrate import CalibrationState, params_from_state
from lowbit.quant.granularity import Block, Group, is_block
from lowbit.quant.layout import Layout, layout
from lowbit.quant.params import QParams, from_step
from lowbit.quant.qtensor import QTensor, load, pack_codes, store, unpack_codes
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.sources import DATA_SCALES, Fixed

State = CalibrationState | QParams
"""A static quantizer's calibration (``state=``)."""


def _check_call(q: Quantizer, x: ArrayLike, scale: ArrayLike | None, state: State | None) -> jax.Array:
    if not isinstance(q, Quantizer):
        raise TypeError(f"quantizer has type {type(q).__name__}; allowed: lowbit.quant.Quantizer")
    x = check_float_input(x)
    if (scale is not None) != q.scale.given:
        raise ValueError(
            f"scale= is {'missing' if scale is None else 'given'} with Quantizer.scale={q.scale!r}; "
            "allowed: scale= exactly when the source is Learned() or Delayed()"
        )
    if (state is not None) != q.static:
        raise ValueError(
            f"state= is {'missing' if state is None else 'given'} with Quantizer.scale={q.scale!r}; "
            "allowed: state= (a CalibrationState or QParams) exactly when the source has static=True"
        )
    if scale is not None:
        scale = check_float_input(scale, "scale")
        want = layout(q, x.shape).scale_shape
        try:
            ok = np.broadcast_shapes(scale.shape, want) == want
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"scale has shape {scale.shape}; allowed: a shape that broadcasts to the scales' "
                f"kept-dims shape {want} (granularity={q.granularity!r} on x of shape {x.shape})"
            )
    return x


def _params(q: Quantizer, lay: Layout, xw: jax.Array, scale: jax.Array | None, state: State | None) -> QParams:
    if q.static:
        assert state is not None  # _check_call: state= exactly when q.static
        return params_from_state(q, state)
    if isinstance(q.scale, DATA_SCALES):  # q.scale.data
        return scales.params(q, q.scale, xw, lay.reduce)
    step = q.scale.step if isinstance(q.scale, Fixed) else scale
    return from_step(q, jnp.broadcast_to(jnp.asarray(step, jnp.float32), lay.scale_shape))


def _blocks(q: Quantizer) -> Group | Block:
    """A block format's granularity (``Tensor.check`` and ``Channel.check`` refuse block formats)."""
    g = q.granularity
    assert isinstance(g, (Group, Block)), g
    return g


def _prepare(
    q: Quantizer, x: jax.Array, scale: jax.Array | None, state: State | None
) -> tuple[Layout, jax.Array, QParams]:
    lay = layout(q, x.shape)
    xw = x.astype(jnp.float32).reshape(lay.work)
    return lay, xw, _params(q, lay, xw, scale, state)


@functools.partial(jax.jit, static_argnums=0)
def _fake(q: Quantizer, x: jax.Array, key: jax.Array | None, scale: jax.Array | None, state: State | None) -> jax.Array:
    if is_block(q.format):
        g = _blocks(q)
        if isinstance(g, Group) and isinstance(q.format, formats.BlockFormat):
            # Blocks cut along the axis where it lies: moving it last first costs a transposing read.
            return q.format._quantize(x, q.saturate, q.rounding, key, g.axis)
        y = formats.quantize(
            g.block_format(q.format), g.to_blocks(x), saturate=q.saturate, rounding=q.rounding, key=key
        )
        return g.from_blocks(y, x.shape)
    _, xw, p = _prepare(q, x, scale, state)
    return q.kind.fake(q, xw, p, q.rounding, key).reshape(x.shape).astype(x.dtype)


def fake_quant(
    quantizer: Quantizer,
    x: ArrayLike,
    key: jax.Array | None = None,
    *,
    scale: ArrayLike | None = None,
    state: State | None = None,
) -> jax.Array:
    """Quantize and dequantize ``x``: the values a quantized ``x`` stands for.

    Args:
      quantizer: the ``Quantizer``.
      x: float32, bfloat16 or float16 array (jax or numpy), any shape. float64
        (also Python floats and lists) is a ``TypeError``, never narrowed
        silently: the computation is float32, and narrowing first rounds twice.
      key: one ``jax.random`` key (``jax.random.key`` or a legacy uint32[2]
        ``PRNGKey``), required for ``rounding="stochastic"``.
      scale: the step for a ``Learned()`` source (or ``Delayed()``: the step from the
        amax history, ``lowbit.training.delayed.step``): a float32 (or bfloat16/float16)
        array broadcastable to the scales' kept-dims shape (per channel along
        axis 1 of a matrix: ``(1, C)`` or ``(C,)``); positive (not checked:
        it is usually traced).
      state: for a static source (``Absmax(static=True)``, ...): a ``CalibrationState`` (from ``calibrate`` or
        an ``Observer``) or the ``QParams`` derived from it.

    Returns:
      An array of ``x``'s shape and dtype (computed in float32).

    Raises:
      TypeError: ``quantizer`` is not a ``Quantizer``; ``x`` or ``scale`` is
        not float32/bfloat16/float16; ``key`` is not a key.
      ValueError: an axis out of range, a group size that does not divide the
        axis, a missing key or a batch of keys, ``scale``/``state`` given where
        not expected, or a ``scale`` of the wrong shape.
    """
    x = _check_call(quantizer, x, scale, state)
    check_rounding(quantizer.rounding, key)
    y: jax.Array = _fake(quantizer, x, key, scale, state)  # jax.jit drops the return type
    return y


@functools.partial(jax.jit, static_argnums=0)
def _qparams(q: Quantizer, x: jax.Array, scale: jax.Array | None, state: State | None) -> QParams:
    return _prepare(q, x, scale, state)[2]


def qparams(
    quantizer: Quantizer, x: ArrayLike, *, scale: ArrayLike | None = None, state: State | None = None
) -> QParams:
    """The ``QParams`` (steps, zero points, factors) that ``fake_quant(quantizer, x)`` uses.

    Raises:
      ValueError: a block format (its scales live inside its codes' encoding).
    """
    x = _check_call(quantizer, x, scale, state)
    if is_block(quantizer.format):
        raise ValueError(f"qparams: block format {quantizer.format.name} keeps its scales inside encode")
    p: QParams = _qparams(quantizer, x, scale, state)  # (jax.jit drops it)
    return p


@functools.partial(jax.jit, static_argnums=0)
def _quantize(
    q: Quantizer, x: jax.Array, key: jax.Array | None, scale: jax.Array | None, state: State | None
) -> QTensor:
    if is_block(q.format):
        g = _blocks(q)
        codes, *scales_ = formats.encode(
            g.block_format(q.format), g.to_blocks(x), saturate=q.saturate, rounding=q.rounding, key=key
        )
        ts = scales_[1] if len(scales_) > 1 else None
        return QTensor(pack_codes(q, codes), scales_[0], None, ts, None, q, x.shape, x.dtype)
    _, xw, p = _prepare(q, x, scale, state)
    codes = q.kind.encode(q, xw, p, q.rounding, key)
    return QTensor(pack_codes(q, codes), quantizer=q, shape=x.shape, dtype=x.dtype, **store(q, p))


def quantize(
    quantizer: Quantizer,
    x: ArrayLike,
    key: jax.Array | None = None,
    *,
    scale: ArrayLike | None = None,
    state: State | None = None,
) -> QTensor:
    """Really quantize ``x``: packed codes plus stored scales (arguments as ``fake_quant``)."""
    x = _check_call(quantizer, x, scale, state)
    check_rounding(quantizer.rounding, key)
    qt: QTensor = _quantize(quantizer, x, key, scale, state)  # (jax.jit drops it)
    return qt


def dequantize(qt: QTensor) -> jax.Array:
    """The values of ``qt`` in its original dtype; equals ``fake_quant`` bit for bit.

    Raises:
      TypeError: ``qt`` is not a ``QTensor``.
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt has type {type(qt).__name__}; allowed: a QTensor (from lowbit.quant.quantize)")
    y: jax.Array = _dequantize(qt)  # (jax.jit drops it)
    return y


@jax.jit
def _dequantize(qt: QTensor) -> jax.Array:
    q = qt.quantizer
    n = math.prod(qt.shape)
    if is_block(q.format):
        g = _blocks(q)
        # jax.ShapeDtypeStruct.__init__ has no annotations in jax 0.10 (so mypy counts it untyped).
        proto = jax.ShapeDtypeStruct(qt.shape, qt.dtype)  # type: ignore[no-untyped-call]
        moved = jax.eval_shape(g.to_blocks, proto).shape
        codes = unpack_codes(q, qt.codes, n).reshape(moved)
        parts = (codes, qt.scale) if qt.tensor_scale is None else (codes, qt.scale, qt.tensor_scale)
        return g.from_blocks(formats.decode(g.block_format(q.format), parts, dtype=qt.dtype), qt.shape)
    lay = layout(q, qt.shape)
    codes = unpack_codes(q, qt.codes, n).reshape(lay.work)
    return q.kind.decode(q, codes, load(qt)).reshape(qt.shape).astype(qt.dtype)
