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
transformer block around it, and ops that read one input keep their own scales;
the reference's weight-clipping search (``auto_clip``) is not done (an ``MSE()``
weight quantizer searches a clip per group instead).

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
from lowbit.formats._checks import check_int
from lowbit.ptq.rtn import check_weights, oriented, output_error
from lowbit.quant import Quantizer

__all__ = ["AWQ", "AWQResult", "quantize", "scales"]

_MIN_SCALE = 1e-4  # the reference's clamp: an input never active keeps a finite scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ:
    """The AWQ search.

    Attributes:
      grid: candidate exponents ``alpha = i / grid``, ``i = 0 .. grid - 1`` (the reference's ``n_grid``).
    """

    grid: int = 20
    name = "awq"

    def __post_init__(self) -> None:
        check_int("AWQ", "grid", self.grid, 1, 1000)


class AWQResult(NamedTuple):
    """A weight quantized by AWQ.

    Attributes:
      weight: float32 ``(K, N)``: ``Q(diag(s) w) / s``, the effective dequantized weight.
      scales: float32 ``(K,)`` per-input-channel scales ``s`` (``x / s`` meets ``Q(diag(s) w)``).
      alpha: float32 scalar, the chosen exponent.
      error: float32 scalar, its output error (``lowbit.ptq.rtn.output_error``).
    """

    weight: jax.Array
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
            best = AWQResult(w_q, s, alpha, err)
    assert best is not None  # grid >= 1
    return best


def quantize(
    w: jax.Array, h: jax.Array, act_mean: jax.Array, quantizer: Quantizer, config: AWQ = AWQ(), *, name: str = "weight"
) -> AWQResult:
    """Quantize one weight with AWQ's scale search.

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
    return _search(oriented(quantizer, k, name), config.grid, w, h, act_mean)
