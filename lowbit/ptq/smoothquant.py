"""SmoothQuant (Xiao et al., ICML 2023): activation outliers migrated into the weights, then W8A8.

An op ``y = x @ w`` (``w`` of shape ``(K, N)``) computes the same output from
``x / s`` and ``diag(s) w`` for any positive per-input-channel ``s``. With

    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)

(``max|x_j|`` over the calibration inputs, ``max|w_j|`` over the outputs of input
row ``j``, both clamped at 1e-5 as in the reference, mit-han-lab/smoothquant)
the per-channel ranges of input and weight meet halfway (``alpha = 0.5``), so
a per-tensor (or per-token) activation quantizer loses less to outlier
channels. Then both operands are quantized: W8A8 (``int8`` weights per
channel, ``int8`` activations) or W4A8.

The smoothed weight is rounded to nearest, or with ``then=GPTQ(...)`` quantized
by GPTQ (``lowbit.ptq.gptq``), the W4A8 recipe of the paper, qwix and
llm-compressor: GPTQ needs the Hessian of the inputs the smoothed weight meets,
``x / s``, which is the captured one rescaled, ``H' = H / (s sᵀ)`` (elementwise;
``smoothed_hessian``), so nothing is recaptured.

``smooth`` is exact up to float rounding (the float output does not change);
the quantized op needs ``x / s`` as its input, which ``lowbit.ptq.weights``
applies on the op's input (an explicit scale; folding it into the previous op is
not done here).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.formats._checks import require
from lowbit.ptq import gptq, rtn
from lowbit.ptq.gptq import GPTQ, GPTQResult
from lowbit.quant import Quantizer

__all__ = ["SmoothQuant", "SmoothResult", "quantize", "smooth", "smoothed_hessian", "smoothing_scales"]

_CLAMP = 1e-5  # the reference's floor on both maxima and on the scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuant:
    """The migration strength, and how the smoothed weight is quantized.

    Attributes:
      alpha: in [0, 1]: 0 leaves the activations as they are, 1 moves all of
        their range into the weights (the paper's default 0.5).
      then: None rounds the smoothed weight to nearest; ``GPTQ(...)``
        quantizes it with GPTQ on the smoothed inputs' Hessian (``smoothquant+gptq``).
    """

    alpha: float = 0.5
    then: GPTQ | None = None

    def __post_init__(self) -> None:
        a = self.alpha
        require(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1,
            "SmoothQuant",
            "alpha",
            a,
            "a number in [0, 1]",
        )
        require(
            self.then is None or isinstance(self.then, GPTQ),
            "SmoothQuant",
            "then",
            self.then,
            "None (round to nearest) or GPTQ(...) (GPTQ on the smoothed weight)",
        )

    @property
    def name(self) -> str:
        """The method's name (``lowbit ptq --method``, report rows): ``smoothquant`` or ``smoothquant+gptq``."""
        return "smoothquant" if self.then is None else f"smoothquant+{self.then.name}"


class SmoothResult(NamedTuple):
    """A weight smoothed and quantized by SmoothQuant.

    Attributes:
      weight: float32 ``(K, N)``: ``Q(diag(s) w)``, the dequantized smoothed weight (it meets ``x / s``).
      scales: float32 ``(K,)`` smoothing scales ``s`` (dimensionless).
      gptq: with ``then=GPTQ(...)``, GPTQ's result on ``diag(s) w`` (its ``weight`` is ``weight``; its
        grid parameters and groups are what packing needs); None with round to nearest.
    """

    weight: jax.Array
    scales: jax.Array
    gptq: GPTQResult | None = None


@jax.jit
def smoothing_scales(act_max: jax.Array, w: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` (clamped at 1e-5).

    Args:
      act_max: float32 ``(K,)`` largest ``|x|`` of each input channel on the calibration inputs.
      w: float32 ``(K, N)`` weight.
      alpha: migration strength in [0, 1].

    Returns:
      float32 ``(K,)`` scales.
    """
    a = jnp.maximum(jnp.asarray(act_max, jnp.float32), _CLAMP)
    m = jnp.maximum(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1), _CLAMP)
    return jnp.maximum(jnp.power(a, alpha) / jnp.power(m, 1 - alpha), _CLAMP)


def smooth(x: jax.Array, w: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x / s, diag(s) w)``: the same product ``x @ w``, the range moved from ``x`` to ``w``.

    Args:
      x: ``(..., K)`` inputs.
      w: ``(K, N)`` weight.
      s: ``(K,)`` positive scales.
    """
    s = jnp.asarray(s)
    return x / s.astype(x.dtype), w * s[:, None].astype(w.dtype)


def smoothed_hessian(h: np.ndarray | jax.Array, s: np.ndarray | jax.Array) -> np.ndarray:
    """``H / (s sᵀ)`` (elementwise), float64: the Hessian of the smoothed inputs ``x / s``.

    ``(x / s)ᵀ(x / s) = diag(1/s) xᵀx diag(1/s)``, so the captured Hessian of
    ``x`` gives it without another pass; float64, as GPTQ factorises in float64.

    Args:
      h: ``(K, K)`` Hessian ``2 xᵀx / n`` of the op's inputs.
      s: ``(K,)`` positive smoothing scales.
    """
    s64 = np.asarray(s, np.float64)
    return np.asarray(h, np.float64) / (s64[:, None] * s64[None, :])


def quantize(
    w: jax.Array,
    act_max: jax.Array,
    quantizer: Quantizer,
    config: SmoothQuant = SmoothQuant(),
    *,
    h: np.ndarray | jax.Array | None = None,
    name: str = "weight",
) -> SmoothResult:
    """Smooth one weight with SmoothQuant's scales and quantize it (round to nearest, or ``config.then``'s GPTQ).

    Args:
      w: float32 ``(K, N)`` weight, ``y = x @ w``.
      act_max: ``(K,)`` largest ``|x|`` of each input channel on the calibration inputs.
      quantizer: the weight quantizer (``int8`` per channel for W8A8, ``int4`` per group for W4A8).
      config: the migration strength, and GPTQ's settings if it quantizes.
      h: ``(K, K)`` Hessian ``2 xᵀx / n`` of the (unsmoothed) calibration inputs; needed with ``then``.
      name: the weight's name in errors.

    Returns:
      A ``SmoothResult``: apply ``x / scales`` to the op's input.

    Raises:
      ValueError: mismatched shapes, a group size that does not divide ``K``,
        ``then`` without ``h``, or GPTQ's errors (a quantizer it cannot use, a
        Hessian singular even after damping).
    """
    w = jnp.asarray(w, jnp.float32)
    act_max = jnp.asarray(act_max, jnp.float32)
    if act_max.shape != (w.shape[0],):
        raise ValueError(f"{name}: act_max has shape {act_max.shape}; allowed: ({w.shape[0]},) for weight {w.shape}")
    s = smoothing_scales(act_max, w, config.alpha)
    if config.then is None:
        return SmoothResult(rtn.quantize(w * s[:, None], quantizer, name=name), s)
    if h is None:
        raise ValueError(f"{name}: SmoothQuant(then=GPTQ(...)) needs h, the Hessian of the op's calibration inputs")
    res = gptq.quantize(w * s[:, None], smoothed_hessian(h, s), quantizer, config.then, name=name)
    return SmoothResult(res.weight, s, res)
