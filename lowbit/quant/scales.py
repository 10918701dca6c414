"""Where the clip comes from: absmax, percentile, MSE search, KL (entropy) calibration.

Every function returns float32 clips in the scales' kept-dims shape: ``(lo, hi)``
with ``lo = -hi`` for quantizers that only need a magnitude. Non-finite entries
are ignored (an inf then saturates to the clip instead of wiping out its group).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import formats
from lowbit.formats import _bits
from lowbit.quant import _arith
from lowbit.quant.params import from_clip
from lowbit.quant.vit import ptf_search

if TYPE_CHECKING:
    from lowbit.quant.params import QParams
    from lowbit.quant.quantizer import Quantizer
    from lowbit.quant.sources import DataScale

Reduce = tuple[int, ...] | None
"""The axes of ``x`` that share one scale (``None``: all of them)."""
Clip = tuple[jax.Array, jax.Array]
"""``(lo, hi)`` float32 clips in the scales' kept-dims shape."""

KL_BINS = 2048
"""Histogram bins of the KL (entropy) search."""

MSE_RATIOS = np.linspace(0.3, 1.0, 100, dtype=np.float32)
"""Clip ratios (of the absmax range) that the ``mse`` source tries."""


def _finite(x: jax.Array, fill: float) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.float32(fill))


def _finite_extreme(op: Callable[..., jax.Array], x: jax.Array, reduce: Reduce, magnitude: bool = False) -> jax.Array:
    """``op`` (jnp.max or jnp.min) over ``reduce`` of the finite entries of ``x`` (or ``|x|``) and 0.

    Non-finite entries count as 0, as does an empty group. XLA:CPU reduces ``max(|x|)`` in one fused
    pass but writes a select in front of a reduction out as a full temporary;
    there the plain reduction runs first and the filtered one only if its
    result is not finite. Both read ``x`` itself, so nothing is materialized.
    """

    def filtered(v: jax.Array) -> jax.Array:
        return op(_finite(jnp.abs(v) if magnitude else v, 0), axis=reduce, keepdims=True, initial=0)

    def cpu(v: jax.Array) -> jax.Array:
        r = op(jnp.abs(v) if magnitude else v, axis=reduce, keepdims=True, initial=0)
        y: jax.Array = jax.lax.cond(jnp.all(jnp.isfinite(r)), lambda: r, lambda: filtered(v))
        return y

    y: jax.Array = jax.lax.platform_dependent(x, cpu=cpu, default=filtered)
    return y


def absmax(q: Quantizer, x: jax.Array, reduce: Reduce) -> Clip:
    """Largest finite magnitude (or min and max, for a signed range) per scale group."""
    if q.signed_range:
        return _finite_extreme(jnp.min, x, reduce), _finite_extreme(jnp.max, x, reduce)
    hi = _finite_extreme(jnp.max, x, reduce, magnitude=True)
    return -hi, hi


def percentile(q: Quantizer, x: jax.Array, reduce: Reduce, p: float) -> Clip:
    """The ``p``-th percentile of ``|x|`` (signed range: of ``x`` at ``100 - p`` and ``p``)."""
    if q.signed_range:
        xs = _finite(x, jnp.nan)
        lo = jnp.nanpercentile(xs, 100.0 - p, axis=reduce, keepdims=True)
        hi = jnp.nanpercentile(xs, p, axis=reduce, keepdims=True)
        return jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    hi = jnp.nanpercentile(_finite(jnp.abs(x), jnp.nan), p, axis=reduce, keepdims=True)
    return -hi, hi


def _params(q: Quantizer, x: jax.Array, reduce: tuple[int, ...], lo: jax.Array, hi: jax.Array) -> QParams:
    exponent_fn = ptf_search(q, q.kind, x, reduce) if q.kind.name == "ptf" else None
    return from_clip(q, lo, hi, exponent_fn)


def mse(q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
    """The clip ``r * absmax`` (``r`` in ``MSE_RATIOS``) with the least fake-quantization error.

    Each candidate is one fused pass over ``x`` (``lax.map`` keeps one
    candidate in memory at a time); the search rounds to nearest.
    """
    lo, hi = absmax(q, x, reduce)
    finite = jnp.isfinite(x)

    def error(r: jax.Array) -> jax.Array:
        p = _params(q, x, reduce, lo * r, hi * r)
        d = jnp.where(finite, q.kind.fake(q, x, p, "nearest", None) - x, jnp.float32(0))
        return jnp.sum(d * d, axis=reduce, keepdims=True)

    errs = jax.lax.map(error, jnp.asarray(MSE_RATIOS))
    best = jnp.take(jnp.asarray(MSE_RATIOS), jnp.argmin(errs, axis=0))
    return lo * best, hi * best


# ----- KL / entropy calibration ---------------------------------------------------------
def histogram_range(amax: jax.Array) -> jax.Array:
    """The histogram's range: the smallest power of two strictly above ``amax``.

    Power-of-two ranges nest, so a running histogram that grows its range merges
    pairs of bins exactly (see ``rebin``).
    """
    amax = jnp.maximum(_finite(amax, 0), jnp.float32(2.0**-126))
    return _arith.pow2(_bits.exponent(amax) + 1)


@jax.jit
def histogram(x: jax.Array, hist_range: jax.Array) -> jax.Array:
    """int32 counts of finite nonzero ``|x|`` in ``KL_BINS`` equal bins over ``[0, hist_range)``.

    Exact zeros are left out: every symmetric grid holds zero exactly, so they
    cost nothing at any clip, while a spike of them in the first bin (ReLU
    outputs, image background) would drive the KL search to a tiny clip that
    isolates it.
    """
    a = jnp.abs(x).ravel()
    counted = jnp.isfinite(a) & (a != 0)
    # bins / range is a power of two: the product is exact and floor() bins it exactly.
    idx = jnp.floor(a * (jnp.float32(KL_BINS) / hist_range))
    idx = jnp.clip(jnp.where(counted, idx, 0), 0, KL_BINS - 1).astype(jnp.int32)
    return jnp.zeros(KL_BINS, jnp.int32).at[idx].add(counted.astype(jnp.int32))


def rebin(hist: jax.Array, old_range: jax.Array, new_range: jax.Array) -> jax.Array:
    """``hist`` over ``[0, old_range)`` re-binned onto ``[0, new_range)`` (both powers of two, new >= old)."""
    shift = jnp.clip(_bits.exponent(new_range) - _bits.exponent(old_range), 0, 31)
    target = jax.lax.shift_right_logical(jnp.arange(KL_BINS, dtype=jnp.int32), shift)
    return jnp.zeros(KL_BINS, jnp.int32).at[target].add(hist)


def kl_levels(fmt: formats.Format) -> int:
    """Quantization levels of the KL search: the format's non-negative values (int8: 128)."""
    if isinstance(fmt, formats.IntFormat):
        return fmt.max_int + 1
    vals = formats.values(fmt)
    return int(np.sum(vals >= 0))


@functools.partial(jax.jit, static_argnums=2)
def kl_threshold(hist: jax.Array, hist_range: jax.Array, levels: int) -> jax.Array:
    """TensorRT entropy calibration: the clip minimizing KL(P || Q) over a histogram of ``|x|``.

    For every candidate ``i`` (kept bins, ``levels <= i <= bins``): ``P`` is
    the first ``i`` bins with the outliers beyond them added to bin ``i-1``;
    ``Q`` merges the same ``i`` bins (without outliers) into ``levels`` groups
    of ``i // levels`` bins (the last group takes the rest) and spreads each
    group's count evenly over its non-empty bins. Both are then smoothed as
    MXNet/TensorRT do (``_smooth``): every empty bin of the kept range gets
    ``KL_EPS``, so a bin ``P`` fills and ``Q`` leaves empty (outliers folded
    into an empty last bin, gaps in a histogram of 8-bit data) costs a finite
    amount instead of ruling the candidate out. A candidate must also keep at
    least half the counts (clip at or above the median of ``|x|``): on a gappy
    histogram (8-bit pixels, the 17 values of digits) a clip below most of the
    data folds it into a last bin that the normalized ``P`` and ``Q`` then agree
    on, a KL near zero at a degenerate clip. All candidates are scored at once.

    Returns:
      The float32 clip ``i* * hist_range / bins``: the upper edge of the last kept bin.
    """
    bins = hist.shape[0]
    zero = jnp.zeros(1, jnp.int32)
    csum = jnp.concatenate([zero, jnp.cumsum(hist)])
    cnz = jnp.concatenate([zero, jnp.cumsum((hist > 0).astype(jnp.int32))])
    i = jnp.arange(levels, bins + 1, dtype=jnp.int32)[:, None]
    j = jnp.arange(bins, dtype=jnp.int32)[None, :]
    width = i // levels
    g = jnp.minimum(j // width, levels - 1)
    start = g * width
    end = jnp.where(g == levels - 1, i, start + width)
    gsum = (csum[end] - csum[start]).astype(jnp.float32)
    gnz = (cnz[end] - cnz[start]).astype(jnp.float32)
    inside = j < i
    h = hist.astype(jnp.float32)[None, :]
    qv = jnp.where(inside & (h > 0), gsum / jnp.maximum(gnz, jnp.float32(1)), jnp.float32(0))
    outliers = (csum[-1] - csum[i]).astype(jnp.float32)
    pv = jnp.where(inside, h, jnp.float32(0)) + jnp.where(j == i - 1, outliers, jnp.float32(0))
    pn, qn = _smooth(pv, inside), _smooth(qv, inside)
    ratio = jnp.where(pn > 0, pn / jnp.where(qn > 0, qn, jnp.float32(1)), jnp.float32(1))
    kl = jnp.sum(jnp.where(pn > 0, pn * jnp.log(ratio), jnp.float32(0)), axis=1)
    enough = 2 * csum[i[:, 0]] >= csum[-1]
    kl = jnp.where(enough, kl, jnp.float32(jnp.inf))
    best = jnp.argmin(kl).astype(jnp.int32) + levels
    bin_width: jax.Array = hist_range / jnp.float32(bins)
    return best.astype(jnp.float32) * bin_width


KL_EPS = 1e-4
"""Probability every empty kept bin receives when the KL search smooths P and Q."""


def _smooth(v: jax.Array, inside: jax.Array) -> jax.Array:
    """Normalize each row of counts ``v`` over its kept bins and give every empty one ``KL_EPS``.

    MXNet's ``_smooth_distribution`` (the TensorRT recipe) adds eps to the empty
    bins and takes it back uniformly from the others; here it is taken back in
    proportion, so no bin turns negative (at most 2048 * 1e-4 of the mass moves).
    """
    total = jnp.sum(v, axis=1, keepdims=True)
    n = v / jnp.where(total > 0, total, jnp.float32(1))
    empty = inside & (n == 0)
    moved = jnp.float32(KL_EPS) * jnp.sum(empty, axis=1, keepdims=True).astype(jnp.float32)
    s = jnp.where(empty, jnp.float32(KL_EPS), n * (1 - moved))
    return s / jnp.sum(s, axis=1, keepdims=True)  # exact 1 again where a row was all empty


def kl(q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
    """Per-tensor KL clip of ``x`` (histogram over a power-of-two range above its absmax).

    The threshold is capped at the absmax: a bin edge past the data clips nothing.
    """
    _, amax = absmax(q, x, reduce)
    r = histogram_range(jnp.max(amax))
    hi = jnp.minimum(kl_threshold(histogram(x, r), r, kl_levels(q.format)), amax)
    return -hi, hi


def params(q: Quantizer, source: DataScale, x: jax.Array, reduce: tuple[int, ...]) -> QParams:
    """Dynamic parameters: the clip of ``x`` (from ``source``, ``q.scale``: a data source) mapped onto the grid."""
    lo, hi = source.clip(q, x, reduce)
    return _params(q, x, reduce, lo, hi)
