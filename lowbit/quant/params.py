"""Quantization parameters: the step (in its scale format), zero point and power-of-two factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from lowbit import formats
from lowbit.quant import _arith

if TYPE_CHECKING:
    from lowbit.quant.kinds import PTF
    from lowbit.quant.quantizer import Quantizer


def _float_format(name: str) -> formats.FloatFormat:
    """The registered ``FloatFormat`` ``name`` (the scale formats: their codes are one array)."""
    fmt = formats.get(name)
    assert isinstance(fmt, formats.FloatFormat), fmt
    return fmt


E8M0 = _float_format("float8_e8m0fnu")
E4M3 = _float_format("float8_e4m3fn")
_TWIN_SHIFT_LIMIT = 24  # twin 'sign' ratio 2^m: a wider ratio would leave one range empty


class QParams(NamedTuple):
    """The parameters of one quantized tensor (a pytree; arrays in the scales' kept-dims shape).

    Attributes:
      scale: float32 step per scale group, on the scale format's grid (for
        ``e4m3`` the E4M3 value; the step is ``scale * tensor_scale``).
      zero_point: float32 integer-valued zero points (asymmetric), else None.
      tensor_scale: float32 scalar second level of ``e4m3`` scales, else None.
      exponent: int32 power-of-two factors: ``ptf`` channel ``c`` uses
        ``step * 2^exponent[c]``; ``twin_uniform``'s fine step is
        ``step * 2^-exponent``. None for the other kinds.
    """

    scale: jax.Array
    zero_point: jax.Array | None = None
    tensor_scale: jax.Array | None = None
    exponent: jax.Array | None = None

    def step(self) -> jax.Array:
        """The float32 step ``scale * tensor_scale`` (before any power-of-two factor)."""
        return self.scale if self.tensor_scale is None else self.scale * self.tensor_scale


def _positive(v: jax.Array) -> jax.Array:
    """``v`` where it is a positive finite number, else 1 (an all-zero group keeps a usable step)."""
    return jnp.where((v > 0) & jnp.isfinite(v), v, jnp.float32(1))


def round_step(q: Quantizer, num: ArrayLike, den: float) -> tuple[jax.Array, jax.Array | None]:
    """The step ``num / den`` rounded to ``q.scale_format``: ``(scale, tensor_scale)``.

    ``e8m0`` takes the smallest power of two ``2^k`` with ``num <= den * 2^k``,
    exactly (exponent and mantissa compares), so nothing clips.
    """
    raw = jnp.asarray(num, jnp.float32)
    num = _positive(raw)
    if q.scale_format == "e8m0":
        num = jnp.maximum(num, jnp.float32(2.0**-126))  # the exact ratio needs normals
        return _arith.pow2(_arith.ceil_log2_ratio(num, jnp.float32(den))), None
    step = _arith.div(num, jnp.full(num.shape, den, jnp.float32))
    if q.scale_format == "float32":
        return step, None
    # The tensor scale comes from the groups that hold data: an all-zero group's placeholder step
    # must not set it (it would make the real groups' steps depend on an empty one).
    real = (raw > 0) & jnp.isfinite(raw)
    ts = _positive(_arith.div(jnp.max(jnp.where(real, step, jnp.float32(0))), jnp.float32(E4M3.max_value)))
    scale = formats.quantize(E4M3, _arith.div(step, ts))
    # A step under E4M3's smallest value would round to 0: round it up instead (no clipping).
    # An empty group quantizes to zeros at any step: it takes the tensor scale itself.
    return jnp.where(real, jnp.maximum(scale, jnp.float32(E4M3.min_value)), jnp.float32(1)), ts


def _symmetric(q: Quantizer, num: ArrayLike, den: float) -> QParams:
    scale, ts = round_step(q, num, den)
    exponent = jnp.full(scale.shape, q.kind.shift, jnp.int32) if q.kind.name == "twin" else None
    return QParams(scale, None, ts, exponent)


def from_step(q: Quantizer, step: ArrayLike) -> QParams:
    """Parameters from a given step (``Fixed``, ``Learned``, ``Delayed``): symmetric, no data."""
    return _symmetric(q, step, 1.0)


def from_clip(
    q: Quantizer, lo: jax.Array, hi: jax.Array, exponent_fn: Callable[[QParams], jax.Array] | None = None
) -> QParams:
    """Parameters that map the clip range ``[lo, hi]`` of every scale group onto the grid.

    Args:
      q: the quantizer.
      lo, hi: float32 clips in the scales' kept-dims shape (``lo = -hi`` when
        ``q.signed_range`` is False).
      exponent_fn: ``ptf`` only: ``(params) -> exponent`` choosing each
        channel's factor from the data; None uses the no-clipping rule on
        ``[lo, hi]`` (static calibration keeps no data).
    """
    lo, hi = jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    if q.kind.name == "ptf":
        return _ptf(q, q.kind, lo, hi, exponent_fn)
    if q.kind.name == "twin" and q.kind.split == "sign":
        scale, ts = round_step(q, hi, q.max_level)
        p = QParams(scale, None, ts)
        # Fine (negative) step s * 2^-m: the largest m whose range still covers |lo|.
        neg = _arith.div(jnp.maximum(-lo, jnp.float32(2.0**-100)), jnp.full(lo.shape, q.max_level, jnp.float32))
        m = jnp.clip(_arith.floor_log2_ratio(p.step(), neg), -_TWIN_SHIFT_LIMIT, _TWIN_SHIFT_LIMIT)
        return p._replace(exponent=m)
    if not q.signed_range:
        return _symmetric(q, hi, q.max_level)
    qmin, qmax = q.int_range
    scale, ts = round_step(q, hi - lo, float(qmax - qmin))
    p = QParams(scale, None, ts)
    return p._replace(zero_point=zero_point(q, lo, p.step()))


def zero_point(q: Quantizer, lo: jax.Array, step: jax.Array) -> jax.Array:
    """Integer zero point (float32) that puts ``lo`` on the grid's lowest code."""
    qmin, qmax = q.int_range
    zp = jnp.float32(qmin) - _arith.round_int(_arith.div(lo, step), "nearest", None)
    return jnp.clip(zp, jnp.float32(qmin), jnp.float32(qmax))


def _ptf(
    q: Quantizer, kind: PTF, lo: jax.Array, hi: jax.Array, exponent_fn: Callable[[QParams], jax.Array] | None
) -> QParams:
    """FQ-ViT PTF: one layer step ``s = range / levels / 2^K``; channel ``c`` uses ``s * 2^a_c``."""
    k = kind.max_power
    lo_t, hi_t = jnp.min(lo, keepdims=True), jnp.max(hi, keepdims=True)
    if kind.symmetric:
        scale, ts = round_step(q, hi_t, q.max_level * 2.0**k)
        p = QParams(scale, None, ts)
    else:
        qmin, qmax = q.int_range
        scale, ts = round_step(q, hi_t - lo_t, float(qmax - qmin) * 2.0**k)
        p = QParams(scale, None, ts)
        # FQ-ViT takes the zero point from the widest step s * 2^K.
        p = p._replace(zero_point=zero_point(q, lo_t, p.step() * jnp.float32(2.0**k)))
    exponent = exponent_fn(p) if exponent_fn is not None else _ptf_cover(q, kind, p, lo, hi)
    return p._replace(exponent=exponent)


def _ptf_cover(q: Quantizer, kind: PTF, p: QParams, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Smallest factor exponent whose range covers each channel's ``[lo, hi]`` (clipped to 0..K)."""
    qmin, qmax = q.int_range
    zp = jnp.float32(0) if p.zero_point is None else p.zero_point
    s = p.step()
    tiny = jnp.float32(2.0**-100)
    need_hi = _arith.ceil_log2_ratio(jnp.maximum(hi, tiny), jnp.maximum((jnp.float32(qmax) - zp) * s, tiny))
    need_lo = _arith.ceil_log2_ratio(jnp.maximum(-lo, tiny), jnp.maximum((zp - jnp.float32(qmin)) * s, tiny))
    need = jnp.maximum(jnp.where(hi > 0, need_hi, 0), jnp.where(lo < 0, need_lo, 0))
    return jnp.clip(need, 0, kind.max_power)
