"""AWQ (Lin et al., MLSys 2024): activation-aware per-input-channel weight scales, searched.

Inputs with large activations matter more: scaling input channel ``j`` of the
weight by ``s_j > 1`` before quantization (and the input by ``1 / s_j``) shrinks
its relative rounding error. AWQ takes ``s = mean|x|^alpha`` (normalised so that
``max(s) * min(s) = 1``) and picks ``alpha`` from a grid by the output error of
the quantized product ``(x / s) Q(diag(s) w)`` against ``x w`` on calibration
inputs, as the reference implementation (mit-han-lab/llm-awq, ``auto_scale``)
does: ``alpha = i / grid`` for ``i = 0 .. grid - 1``, so ``alpha = 0`` (plain
RTN) is a candidate and AWQ's calibration error is never above RTN's.

Differences from the reference: the error is the op's own output error
(``lowbit.ptq.rtn.output_error``, from the inputs' Hessian), not that of the
transformer block around it, and ops that read one input keep their own scales.

Then, as the reference's ``auto_clip``, each group of the scaled weight (each
output channel's ``size`` inputs, or all ``K`` per channel) is clipped to
``±(1 - i / clip_grid) max|w|`` for the ``i < max_shrink * clip_grid`` that
gives that group the least output error, ``e_gᵀ H_gg e_g`` (the group's block
of the scaled inputs' Hessian; the reference measures the same product on
sampled inputs). An absmax quantizer then takes its scale from the clipped
range. The clipped result is kept only if its full output error is below the
unclipped one's, so AWQ's error still never exceeds RTN's.

Where the scale goes: this returns the effective weight ``Q(diag(s) w) / s``,
which computes ``(x / s) Q(diag(s) w)`` from the unscaled input: folding
``1 / s`` into the op that produces ``x`` (a LayerNorm, the previous linear
layer) is left to packed inference, which keeps ``s`` beside the codes
(``AWQResult.scales``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowbit import quant
from lowbit.formats._checks import check_int, require
from lowbit.ptq.rtn import check_weights, oriented, output_error
from lowbit.quant import Absmax, Channel, Group, Quantizer

__all__ = ["AWQ", "AWQResult", "quantize", "scales"]

_MIN_SCALE = 1e-4  # the reference's clamp: an input never active keeps a finite scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ:
    """The AWQ search.

    Attributes:
      grid: candidate exponents ``alpha = i / grid``, ``i = 0 .. grid - 1`` (the reference's ``n_grid``).
      clip_grid: candidate clip ratios ``1 - i / clip_grid`` per group (the reference's ``n_grid``);
        0 turns the clip search off. Only for ``Absmax`` weight scales on ``Group`` / ``Channel`` grids.
      max_shrink: the smallest ratio tried is ``1 - max_shrink`` (the reference's 0.5), in [0, 1).
    """

    grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    name = "awq"

    def __post_init__(self) -> None:
        check_int("AWQ", "grid", self.grid, 1, 1000)
        check_int("AWQ", "clip_grid", self.clip_grid, 0, 1000)
        m = self.max_shrink
        require(
            isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1,
            "AWQ",
            "max_shrink",
            m,
            "a number in [0, 1) (the largest fraction of a group's range clipped away)",
        )


class AWQResult(NamedTuple):
    """A weight quantized by AWQ.

    Attributes:
      weight: float32 ``(K, N)``: ``Q(c) / s``, the effective dequantized weight.
      scaled: float32 ``(K, N)``: ``c``, the scaled weight ``diag(s) w`` as quantized (clipped per
        group where the clip search chose to): what packed inference encodes.
      scales: float32 ``(K,)`` per-input-channel scales ``s`` (``x / s`` meets ``Q(c)``).
      alpha: float32 scalar, the chosen exponent.
      error: float32 scalar, its output error (``lowbit.ptq.rtn.output_error``).
    """

    weight: jax.Array
    scaled: jax.Array
    scales: jax.Array
    alpha: jax.Array
    error: jax.Array


def scales(act_mean: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """``s = mean|x|^alpha``, clamped at 1e-4 and normalised to ``max(s) * min(s) = 1``.

    Args:
      act_mean: float32 ``(K,)`` mean ``|x|`` per input channel (input units).
      alpha: the exponent (a scalar, may be traced).

    Returns:
      float32 ``(K,)`` scales (dimensionless).
    """
    s = jnp.maximum(jnp.power(jnp.asarray(act_mean, jnp.float32), alpha), _MIN_SCALE)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnums=0)
def _candidate(
    q: Quantizer, w: jax.Array, h: jax.Array, act_mean: jax.Array, alpha: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(Q(diag(s) w) / s, its output error, s)`` for one exponent (``s`` exactly as used: packing stores it)."""
    s = scales(act_mean, alpha)
    w_q = quant.fake_quant(q, w * s[:, None]) / s[:, None]
    return w_q, output_error(w, w_q, h), s


def _search(q: Quantizer, grid: int, w: jax.Array, h: jax.Array, act_mean: jax.Array) -> AWQResult:
    # One compiled candidate, the grid walked in Python: the best is kept, never a stack of `grid` weights.
    best = None
    for i in range(grid):
        alpha = jnp.float32(i / grid)
        w_q, err, s = _candidate(q, w, h, act_mean, alpha)
        if best is None or float(err) < float(best.error):
            best = AWQResult(w_q, w * s[:, None], s, alpha, err)
    assert best is not None  # grid >= 1
    return best


def _group_size(q: Quantizer, k: int) -> int | None:
    """Rows per clip group of a ``(K, N)`` weight, or None where the clip search does not apply."""
    if not isinstance(q.scale, Absmax) or q.static:
        return None
    if isinstance(q.granularity, Group) and q.granularity.size is not None:
        return q.granularity.size
    return k if isinstance(q.granularity, Channel) else None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _clip_candidate(
    q: Quantizer, size: int, c: jax.Array, hb: jax.Array, ratio: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(clipped c, per-group output error (K / size, N))`` at one clip ratio."""
    k, n = c.shape
    groups = c.reshape(k // size, size, n)
    bound = ratio * jnp.max(jnp.abs(groups), axis=1, keepdims=True)
    clipped = jnp.clip(groups, -bound, bound).reshape(k, n)
    c_q = quant.fake_quant(q, clipped)
    e = (c - c_q).reshape(k // size, size, n)
    err = jnp.einsum("gij,gjn,gin->gn", hb, e, e, precision=jax.lax.Precision.HIGHEST)
    return clipped, err


def _clip(q: Quantizer, config: AWQ, best: AWQResult, w: jax.Array, h: jax.Array) -> AWQResult:
    """``best`` with each group of its scaled weight clipped to the range of least output error (``auto_clip``)."""
    k = w.shape[0]
    size = _group_size(q, k)
    if size is None or config.clip_grid == 0:
        return best
    s = best.scales
    hs = h / (s[:, None] * s[None, :])  # the Hessian of the scaled inputs x / s
    g = k // size
    hb = hs.reshape(g, size, g, size)[jnp.arange(g), :, jnp.arange(g), :]  # (g, size, size) diagonal blocks
    c, err = best.scaled, None
    steps = max(1, int(config.max_shrink * config.clip_grid))
    for i in range(steps):
        cand, cand_err = _clip_candidate(q, size, best.scaled, hb, jnp.float32(1 - i / config.clip_grid))
        if err is None:
            c, err = cand, cand_err
            continue
        better = (cand_err < err)[:, None, :]  # per (group, output channel)
        shape = (g, size, -1)
        c = jnp.where(better, cand.reshape(shape), c.reshape(shape)).reshape(k, -1)
        err = jnp.minimum(err, cand_err)
    # Groups quantize independently, so this is the chosen candidates' quantization; computed by the public
    # fake_quant (not inside the search's fused jit), whose values a packed QTensor reproduces bit for bit.
    weight = quant.fake_quant(q, c) / s[:, None]
    total = output_error(w, weight, h)
    if float(total) >= float(best.error):  # the per-group choice ignores cross-group terms: keep what is better
        return best
    return AWQResult(weight, c, s, best.alpha, total)


def quantize(
    w: jax.Array, h: jax.Array, act_mean: jax.Array, quantizer: Quantizer, config: AWQ = AWQ(), *, name: str = "weight"
) -> AWQResult:
    """Quantize one weight with AWQ's scale search, then its clip search.

    Args:
      w: float32 ``(K, N)`` weight, ``y = x @ w``.
      h: ``(K, K)`` Hessian ``2 xᵀx / n`` of the calibration inputs (``lowbit.ptq.gptq.hessian``).
      act_mean: ``(K,)`` mean ``|x|`` of each input channel on the calibration inputs.
      quantizer: the weight quantizer (any that ``lowbit.ptq.rtn.quantize`` takes).
      config: the search.
      name: the weight's name in errors.

    Returns:
      An ``AWQResult``.

    Raises:
      ValueError: mismatched shapes, or a group size that does not divide ``K``.
    """
    check_weights(quantizer)
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    h, act_mean = jnp.asarray(h, jnp.float32), jnp.asarray(act_mean, jnp.float32)
    if h.shape != (k, k) or act_mean.shape != (k,):
        raise ValueError(
            f"{name}: Hessian {h.shape} and act_mean {act_mean.shape} do not fit a weight of shape {w.shape}; "
            f"allowed: ({k}, {k}) and ({k},)"
        )
    q = oriented(quantizer, k, name)
    return _clip(q, config, _search(q, config.grid, w, h, act_mean), w, h)
