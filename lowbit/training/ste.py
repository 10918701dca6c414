"""Straight-through estimators (STE) for quantization-aware training.

Every rule here is a :func:`jax.custom_vjp`: the forward pass is the quantizer and
the backward pass is the published surrogate gradient, so rules compose with
``jax.jit``, ``jax.vmap`` and ``jax.grad`` like any other JAX function.

Dtype policy: the output and the gradient of ``x`` keep the dtype of ``x``, and
the gradient of a learned parameter (LSQ step/offset, PACT clip) keeps that
parameter's dtype. Half-precision inputs are computed in float32 internally and
cast back, because dividing and rounding in bfloat16 double-rounds: ``x / s`` is
first rounded to 8 significant bits, which moves values across rounding ties.

Boundary convention: where a paper splits the domain into an "inside" region
(gradient passes) and clipped regions, the boundary points follow the paper
(LSQ, PACT: the clip value itself counts as clipped); the generic
:func:`clipped_ste` and :func:`sawb_quantize` pass the gradient on the closed
range.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from lowbit import formats

__all__ = [
    "SAWB_COEFFICIENTS",
    "binary_weight",
    "clipped_ste",
    "lsq",
    "lsq_init_step",
    "pact",
    "sawb_clip",
    "sawb_quantize",
    "ste",
    "ternary_weight",
]

SAWB_COEFFICIENTS: Mapping[int, tuple[float, float]] = types.MappingProxyType(
    {
        2: (3.12, -2.064),
        3: (7.509, -6.892),
        4: (12.68, -12.80),
        5: (17.74, -18.64),
        8: (31.76, -35.04),
    }
)
"""SAWB (c1, c2) per bit width (Choi et al. 2018), fitted for 2^bits levels on [-α, α]."""

QuantizeFn = Callable[[jax.Array], jax.Array]
"""A static quantizer ``x -> quantized x`` of the same shape (see :func:`ste`)."""


# --------------------------------------------------------------------------- helpers


def _float_array(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _compute_dtype(dtype: DTypeLike) -> np.dtype:
    # Not jnp.promote_types: under strict promotion it refuses bfloat16 -> float32.
    # ml_dtypes' finfo (jnp.finfo: it knows bfloat16) has no annotations, so mypy counts it untyped.
    narrow = jnp.finfo(dtype).bits < 32  # type: ignore[no-untyped-call]
    cdt: np.dtype = np.dtype(jnp.float32) if narrow else np.dtype(dtype)
    return cdt


def _const(value: float, dtype: DTypeLike) -> jax.Array:
    return jnp.asarray(value, dtype=dtype)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    return int(bits)


def _check_positive(value: object, name: str) -> None:
    # Only concrete host values can be checked; traced values are the caller's job.
    if isinstance(value, (numbers.Real, np.ndarray)) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_broadcasts_to(param: jax.Array, shape: tuple[int, ...], name: str) -> None:
    try:
        ok = jnp.broadcast_shapes(param.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {param.shape} does not broadcast to x's shape {shape}")


def _sum_to_shape(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Adjoint of broadcasting ``shape`` up to ``a.shape``: sum the broadcast axes."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and a.shape[lead + i] != 1)
    return jnp.sum(a, axis=axes).reshape(shape)


def _int_levels(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): the integer grid is [-Q_N, Q_P]."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# --------------------------------------------------------------------------- plain and clipped STE


def _apply_quantizer(x: jax.Array, quantize_fn: QuantizeFn) -> jax.Array:
    y = jnp.asarray(quantize_fn(x))
    if y.shape != x.shape:
        raise ValueError(f"quantize_fn changed the shape from {x.shape} to {y.shape}")
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste(x: jax.Array, quantize_fn: QuantizeFn) -> jax.Array:
    return _apply_quantizer(x, quantize_fn)


def _ste_fwd(x: jax.Array, quantize_fn: QuantizeFn) -> tuple[jax.Array, None]:
    return _apply_quantizer(x, quantize_fn), None


def _ste_bwd(quantize_fn: QuantizeFn, _: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


_ste.defvjp(_ste_fwd, _ste_bwd)


def ste(x: jax.Array, quantize_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Straight-through estimator around an arbitrary quantizer.

    Forward: ``y = quantize_fn(x)``, cast back to ``x.dtype``.

    Backward: ``dL/dx = dL/dy`` (identity).

    Args:
        x: Floating-point input.
        quantize_fn: Static callable ``x -> quantized x`` of the same shape. It is
            called at trace time and is never differentiated, so it may use
            non-differentiable ops (bit casts, integer conversion); for the same
            reason it must not close over values being differentiated (learned
            scales belong in :func:`lsq` or :func:`pact`). Its result may have
            another dtype (e.g. float8); it is cast back.

    Returns:
        The quantized ``x`` in ``x``'s dtype.
    """
    return _ste(_float_array(x, "x"), quantize_fn)


def _in_closed_range(x: jax.Array, lo: float, hi: float) -> jax.Array:
    cdt = _compute_dtype(x.dtype)
    xc = x.astype(cdt)
    return (xc >= _const(lo, cdt)) & (xc <= _const(hi, cdt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _clipped_ste(x: jax.Array, quantize_fn: QuantizeFn, lo: float, hi: float) -> jax.Array:
    return _apply_quantizer(x, quantize_fn)


def _clipped_ste_fwd(x: jax.Array, quantize_fn: QuantizeFn, lo: float, hi: float) -> tuple[jax.Array, jax.Array]:
    return _apply_quantizer(x, quantize_fn), _in_closed_range(x, lo, hi)


def _clipped_ste_bwd(
    quantize_fn: QuantizeFn, lo: float, hi: float, inside: jax.Array, g: jax.Array
) -> tuple[jax.Array]:
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_clipped_ste.defvjp(_clipped_ste_fwd, _clipped_ste_bwd)


def clipped_ste(x: jax.Array, quantize_fn: Callable[[jax.Array], jax.Array], lo: float, hi: float) -> jax.Array:
    """Clipped straight-through estimator: identity gradient only inside ``[lo, hi]``.

    Forward: ``y = quantize_fn(x)``, cast back to ``x.dtype``.

    Backward: ``dL/dx = dL/dy · 1[lo ≤ x ≤ hi]``.

    Args:
        x: Floating-point input.
        quantize_fn: Static callable ``x -> quantized x`` of the same shape (see
            :func:`ste`).
        lo: Lower end of the representable range, a Python float (it comes from
            the format, e.g. ``-448.0`` for FP8 E4M3).
        hi: Upper end of the representable range, a Python float.

    Returns:
        The quantized ``x`` in ``x``'s dtype.

    Raises:
        ValueError: If ``lo >= hi`` or either is not finite.
    """
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}")
    return _clipped_ste(_float_array(x, "x"), quantize_fn, lo, hi)


# --------------------------------------------------------------------------- LSQ / LSQ+


def _lsq_scaled(x: jax.Array, step: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    cdt = _compute_dtype(x.dtype)
    s = step.astype(cdt)
    beta = offset.astype(cdt)
    return (x.astype(cdt) - beta) / s, s, beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq(x: jax.Array, step: jax.Array, offset: jax.Array, q_n: int, q_p: int, grad_scale: float) -> jax.Array:
    v, s, beta = _lsq_scaled(x, step, offset)
    cdt = v.dtype
    q = jnp.round(jnp.clip(v, _const(-q_n, cdt), _const(q_p, cdt))) * s + beta
    return q.astype(x.dtype)


def _lsq_fwd(
    x: jax.Array, step: jax.Array, offset: jax.Array, q_n: int, q_p: int, grad_scale: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _lsq(x, step, offset, q_n, q_p, grad_scale), (x, step, offset)


def _lsq_bwd(
    q_n: int, q_p: int, grad_scale: float, res: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, step, offset = res
    v, _, _ = _lsq_scaled(x, step, offset)
    cdt = v.dtype
    low = v <= _const(-q_n, cdt)
    high = v >= _const(q_p, cdt)
    inside = ~(low | high)
    gc = g.astype(cdt)
    zero = jnp.zeros_like(gc)
    dq_ds = jnp.where(low, _const(-q_n, cdt), jnp.where(high, _const(q_p, cdt), jnp.round(v) - v))
    gs = _const(grad_scale, cdt)
    d_step = _sum_to_shape(gc * dq_ds, step.shape) * gs
    d_offset = _sum_to_shape(jnp.where(inside, zero, gc), offset.shape) * gs
    d_x = jnp.where(inside, g, jnp.zeros_like(g))
    return d_x, d_step.astype(step.dtype), d_offset.astype(offset.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(
    x: jax.Array,
    step: ArrayLike,
    *,
    bits: int,
    signed: bool = True,
    offset: ArrayLike | None = None,
    grad_scale: float | None = None,
) -> jax.Array:
    """Learned Step size Quantization (LSQ, Esser et al. 2019) and LSQ+ (Bhalgat et al. 2020).

    With ``Q_N, Q_P = 2^(b-1), 2^(b-1)-1`` (signed) or ``0, 2^b-1`` (unsigned),
    step ``s``, offset ``β`` (0 for plain LSQ) and ``v = (x - β) / s``:

    Forward: ``q = round(clip(v, -Q_N, Q_P)) · s + β`` with round-half-to-even.

    Backward, with upstream gradient ``G = dL/dq`` and gradient scale ``g``:

    * ``dL/dx = G · 1[-Q_N < v < Q_P]``
    * ``dL/ds = g · Σ G · (-Q_N if v ≤ -Q_N; Q_P if v ≥ Q_P; round(v) - v otherwise)``
    * ``dL/dβ = g · Σ G · 1[v ≤ -Q_N or v ≥ Q_P]``

    The sums run over the elements each entry of ``s`` / ``β`` was broadcast to, so
    scalar and per-channel parameters both work. The default ``g = 1/sqrt(N · Q_P)``
    with ``N = x.size`` is the paper's choice for weights; activations should pass
    ``grad_scale=1/sqrt(features · Q_P)`` (features per example).

    Args:
        x: Floating-point input.
        step: Positive step size ``s``, broadcastable to ``x``.
        bits: Bit width, 2..16.
        signed: Signed (two's-complement range) or unsigned grid.
        offset: LSQ+ learned offset ``β``, broadcastable to ``x``; ``None`` for LSQ.
        grad_scale: Override for ``g``, a positive Python float.

    Returns:
        The fake-quantized ``x`` in ``x``'s dtype.

    Raises:
        ValueError: On bits outside 2..16, a concrete ``step <= 0``, a
            non-positive ``grad_scale`` or a parameter that does not broadcast to ``x``.
    """
    q_n, q_p = _int_levels(_check_bits(bits), signed)
    _check_positive(step, "step")
    x = _float_array(x, "x")
    step = _float_array(step, "step")
    _check_broadcasts_to(step, x.shape, "step")
    if offset is None:
        offset = jnp.zeros((), step.dtype)
    offset = _float_array(offset, "offset")
    _check_broadcasts_to(offset, x.shape, "offset")
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(x.size * q_p)
    else:
        _check_positive(grad_scale, "grad_scale")
        grad_scale = float(grad_scale)
    return _lsq(x, step, offset, q_n, q_p, grad_scale)


def lsq_init_step(x: jax.Array, bits: int, signed: bool = True) -> jax.Array:
    """LSQ step initialisation ``s0 = 2 · mean|x| / sqrt(Q_P)`` (Esser et al. 2019).

    Args:
        x: Floating-point tensor (weights, or a first batch of activations).
        bits: Bit width, 2..16.
        signed: Signed or unsigned grid (sets ``Q_P``, see :func:`lsq`).

    Returns:
        A scalar in ``x``'s dtype; 0 if ``x`` is all zeros, which :func:`lsq` cannot use.

    Raises:
        ValueError: On bits outside 2..16.
    """
    _, q_p = _int_levels(_check_bits(bits), signed)
    x = _float_array(x, "x")
    cdt = _compute_dtype(x.dtype)
    s0 = _const(2.0, cdt) * jnp.mean(jnp.abs(x.astype(cdt))) / jnp.sqrt(_const(q_p, cdt))
    return s0.astype(x.dtype)


# --------------------------------------------------------------------------- PACT


def _pact_levels(bits: int, signed: bool) -> int:
    levels: int = 2 ** (bits - 1) - 1 if signed else 2**bits - 1  # (int ** int is typed Any)
    return levels


def _pact_regions(x: jax.Array, alpha: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks (clipped high, clipped low, inside); the clip values count as clipped."""
    cdt = _compute_dtype(x.dtype)
    xc, a = x.astype(cdt), alpha.astype(cdt)
    high = xc >= a
    low = xc <= -a if signed else xc < _const(0, cdt)
    return high, low, ~(high | low)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pact(x: jax.Array, alpha: jax.Array, bits: int, signed: bool) -> jax.Array:
    cdt = _compute_dtype(x.dtype)
    a = alpha.astype(cdt)
    n = _const(_pact_levels(bits, signed), cdt)
    y = jnp.clip(x.astype(cdt), -a if signed else _const(0, cdt), a)
    return (jnp.round(y * n / a) * a / n).astype(x.dtype)


def _pact_fwd(x: jax.Array, alpha: jax.Array, bits: int, signed: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _pact(x, alpha, bits, signed), (x, alpha)


def _pact_bwd(bits: int, signed: bool, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, alpha = res
    high, low, inside = _pact_regions(x, alpha, signed)
    gc = g.astype(_compute_dtype(g.dtype))
    zero = jnp.zeros_like(gc)
    # Unsigned PACT's lower clip is the fixed 0, so only the upper clip moves with α.
    below = jnp.where(low, -gc, zero) if signed else zero
    d_alpha = jnp.where(high, gc, below)
    d_x = jnp.where(inside, g, jnp.zeros_like(g))
    return d_x, _sum_to_shape(d_alpha, alpha.shape).astype(alpha.dtype)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x: jax.Array, alpha: ArrayLike, *, bits: int, signed: bool = False) -> jax.Array:
    """PACT: learned clipping level α with uniform quantization (Choi et al. 2018).

    Forward, with ``n = 2^k - 1`` steps on ``[0, α]`` (unsigned) or ``n = 2^(k-1) - 1``
    steps on each side of 0 (signed):

    * unsigned: ``y = clip(x, 0, α)``; ``q = round(y · n / α) · α / n``
    * signed: ``y = clip(x, -α, α)``; ``q = round(y · n / α) · α / n``

    Backward, with upstream gradient ``G = dL/dq`` (the STE ignores the rounding
    error term, as in the paper):

    * unsigned: ``dL/dx = G · 1[0 ≤ x < α]``; ``dL/dα = Σ G · 1[x ≥ α]``
    * signed: ``dL/dx = G · 1[-α < x < α]``;
      ``dL/dα = Σ G · 1[x ≥ α] - Σ G · 1[x ≤ -α]``

    Args:
        x: Floating-point activations.
        alpha: Positive clip level α, broadcastable to ``x`` (scalar or per channel).
        bits: Bit width ``k``, 2..16.
        signed: Clip to ``[-α, α]`` instead of ``[0, α]``.

    Returns:
        The fake-quantized ``x`` in ``x``'s dtype.

    Raises:
        ValueError: On bits outside 2..16, a concrete ``alpha <= 0`` or an ``alpha``
            that does not broadcast to ``x``.
    """
    bits = _check_bits(bits)
    _check_positive(alpha, "alpha")
    x = _float_array(x, "x")
    alpha = _float_array(alpha, "alpha")
    _check_broadcasts_to(alpha, x.shape, "alpha")
    return _pact(x, alpha, bits, bool(signed))


# --------------------------------------------------------------------------- SAWB


def _check_sawb_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SAWB_COEFFICIENTS:
        raise ValueError(f"SAWB supports bits in {sorted(SAWB_COEFFICIENTS)}, got {bits!r}")


def _sawb_alpha(w: jax.Array, bits: int) -> jax.Array:
    c1, c2 = SAWB_COEFFICIENTS[bits]
    cdt = _compute_dtype(w.dtype)
    wc = w.astype(cdt)
    return _const(c1, cdt) * jnp.sqrt(jnp.mean(wc * wc)) + _const(c2, cdt) * jnp.mean(jnp.abs(wc))


def sawb_clip(w: jax.Array, bits: int) -> jax.Array:
    """SAWB clipping level ``α = c1 · sqrt(E[w²]) + c2 · E|w|`` (Choi et al. 2018).

    ``(c1, c2)`` come from :data:`SAWB_COEFFICIENTS`. For 4 bits and up ``c1 + c2 < 0``,
    so α can be ≤ 0 when ``|w|`` has little spread (``sqrt(E[w²]) / E|w|`` near 1);
    :func:`sawb_quantize` guards against that.

    Args:
        w: Floating-point weights (statistics are per tensor).
        bits: One of 2, 3, 4, 5, 8.

    Returns:
        Scalar α in ``w``'s dtype.

    Raises:
        ValueError: If ``bits`` has no coefficients; the message lists the supported ones.
    """
    _check_sawb_bits(bits)
    w = _float_array(w, "w")
    return _sawb_alpha(w, bits).astype(w.dtype)


def _sawb_safe_alpha(w: jax.Array, bits: int) -> jax.Array:
    alpha = _sawb_alpha(w, bits)
    return jnp.where(alpha > 0, alpha, jnp.max(jnp.abs(w.astype(alpha.dtype))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sawb_quantize(w: jax.Array, bits: int) -> jax.Array:
    alpha = _sawb_safe_alpha(w, bits)
    cdt = alpha.dtype
    # All-zero w gives α = 0; dividing by 1 instead keeps q = 0 rather than NaN.
    denom = jnp.where(alpha > 0, alpha, jnp.ones_like(alpha))
    n = _const(2**bits - 1, cdt)
    two = _const(2, cdt)
    u = (jnp.clip(w.astype(cdt), -alpha, alpha) / denom + _const(1, cdt)) * (n / two)
    # The odd integer 2·round(u) - n is exact, so q is exactly symmetric in w.
    return ((two * jnp.round(u) - n) * (alpha / n)).astype(w.dtype)


def _sawb_quantize_fwd(w: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    alpha = _sawb_safe_alpha(w, bits)
    return _sawb_quantize(w, bits), jnp.abs(w.astype(alpha.dtype)) <= alpha


def _sawb_quantize_bwd(bits: int, inside: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_sawb_quantize.defvjp(_sawb_quantize_fwd, _sawb_quantize_bwd)


def sawb_quantize(w: jax.Array, bits: int) -> jax.Array:
    """Symmetric uniform weight quantization on ``[-α, α]`` with the SAWB α.

    Forward, with ``α = sawb_clip(w, bits)`` (replaced by ``max|w|`` when it is
    ≤ 0) and ``n = 2^bits - 1`` steps:
    ``u = (clip(w, -α, α) / α + 1) · n / 2``; ``q = (2 · round(u) - n) · α / n``.
    This is the grid the SAWB coefficients were fitted for: 2^bits levels
    ``±α/n, ±3α/n, …, ±α``, evenly spaced and without a zero level (2 bits:
    ``{-α, -α/3, α/3, α}``).

    Backward: ``dL/dw = dL/dq · 1[|w| ≤ α]``; α is treated as a constant
    (stop-gradient).

    Args:
        w: Floating-point weights.
        bits: One of 2, 3, 4, 5, 8.

    Returns:
        The fake-quantized ``w`` in ``w``'s dtype.

    Raises:
        ValueError: If ``bits`` has no SAWB coefficients.
    """
    _check_sawb_bits(bits)
    return _sawb_quantize(_float_array(w, "w"), bits)


# --------------------------------------------------------------------------- ternary / binary


def _ternary_forward(w: jax.Array, axis: int | None) -> jax.Array:
    cdt = _compute_dtype(w.dtype)
    q: jax.Array = formats.ternarize(w.astype(cdt), axis)
    return q.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ternary(w: jax.Array, axis: int | None) -> jax.Array:
    return _ternary_forward(w, axis)


def _ternary_fwd(w: jax.Array, axis: int | None) -> tuple[jax.Array, None]:
    return _ternary_forward(w, axis), None


def _ternary_bwd(axis: int | None, _: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


_ternary.defvjp(_ternary_fwd, _ternary_bwd)


def ternary_weight(w: jax.Array, *, axis: int | None = None) -> jax.Array:
    """Ternary weights (TWN, Li et al. 2016) with a straight-through gradient.

    Forward, per tensor (``axis=None``) or per slice along output axis ``axis``:
    ``Δ = 0.7 · mean|w|``; ``α = mean(|w| where |w| > Δ)``;
    ``q = α · sign(w) · 1[|w| > Δ]``.

    Backward: ``dL/dw = dL/dq`` (identity).

    Args:
        w: Floating-point weights.
        axis: Output-channel axis kept when computing Δ and α (all other axes are
            reduced), or ``None`` for one Δ and α per tensor.

    Returns:
        Values in ``{-α, 0, α}`` with ``w``'s dtype.

    Raises:
        ValueError: If ``axis`` is out of range.
    """
    return _ternary(_float_array(w, "w"), axis)


def _binary_forward(w: jax.Array, axis: int | None) -> jax.Array:
    cdt = _compute_dtype(w.dtype)
    wc = w.astype(cdt)
    alpha = formats.binary_scale(wc, axis)
    # sign(0) = +1 so every weight is one of exactly two values.
    return jnp.where(wc >= _const(0, cdt), alpha, -alpha).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _binary(w: jax.Array, axis: int | None, clip: bool) -> jax.Array:
    return _binary_forward(w, axis)


def _binary_fwd(w: jax.Array, axis: int | None, clip: bool) -> tuple[jax.Array, jax.Array | None]:
    cdt = _compute_dtype(w.dtype)
    inside = jnp.abs(w.astype(cdt)) <= _const(1, cdt) if clip else None
    return _binary_forward(w, axis), inside


def _binary_bwd(axis: int | None, clip: bool, inside: jax.Array | None, g: jax.Array) -> tuple[jax.Array]:
    return (g if inside is None else jnp.where(inside, g, jnp.zeros_like(g)),)  # inside: only with clip


_binary.defvjp(_binary_fwd, _binary_bwd)


def binary_weight(w: jax.Array, *, axis: int | None = -1, clip: bool = False) -> jax.Array:
    """Binary weights with a per-channel scale (XNOR-Net, Rastegari et al. 2016).

    Forward: ``α = mean|w|`` over every axis except ``axis``;
    ``q = α · sign(w)`` with ``sign(0) = +1``.

    Backward: ``dL/dw = dL/dq`` (identity), or with ``clip=True``
    ``dL/dw = dL/dq · 1[|w| ≤ 1]`` (BinaryConnect's hard-tanh STE).

    Args:
        w: Floating-point weights.
        axis: Output-channel axis (default last, Flax's kernel layout), or ``None``
            for one α per tensor.
        clip: Zero the gradient where ``|w| > 1``.

    Returns:
        Values in ``{-α, α}`` with ``w``'s dtype.

    Raises:
        ValueError: If ``axis`` is out of range.
    """
    return _binary(_float_array(w, "w"), axis, bool(clip))
