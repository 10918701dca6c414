"""The public format functions: encode, decode, quantize, values.

Every format class implements ``_encode``, ``_decode``, ``_quantize`` and
``_values``; these wrappers validate arguments once, outside any trace.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.formats._checks import check_codes, check_float_input, check_rounding
from lowbit.formats.registry import get


def _resolve(fmt):
    return get(fmt) if isinstance(fmt, str) else fmt


def encode(fmt, x, *, saturate: bool = False, rounding: str = "nearest", key: jax.Array | None = None):
    """Round ``x`` to ``fmt`` and return its bit patterns.

    Args:
      fmt: a format or its registered name.
      x: float32, bfloat16 or float16 array, any shape.
      saturate: map finite overflow and +-inf to +-max; ``False`` follows the
        format's own overflow (inf or NaN), exactly ml_dtypes' cast.
      rounding: ``nearest`` (half to even), ``stochastic`` (needs ``key``) or
        ``toward_zero``.
      key: a ``jax.random`` key for stochastic rounding.

    Returns:
      Codes of ``x``'s shape, ``uint8`` for formats of at most 8 bits (value in
      the low bits, sign at bit ``bits-1``), else ``uint16``. Scaled formats
      return a tuple that ``decode`` takes back: adaptive bias ``(codes, bias)``,
      MX ``(codes, e8m0_scale_codes)``, NVFP4 ``(codes, e4m3_block_scale_codes,
      tensor_scale)``.
    """
    fmt = _resolve(fmt)
    x = check_float_input(x)
    check_rounding(rounding, key)
    return fmt._encode(x, saturate, rounding, key)


def decode(fmt, codes, *, dtype: Any = jnp.float32):
    """Values of ``codes`` (what ``encode`` returned) as ``dtype`` (float32 default)."""
    fmt = _resolve(fmt)
    if isinstance(codes, tuple):
        return fmt._decode(tuple(check_codes(c) if i == 0 else jnp.asarray(c) for i, c in enumerate(codes)), dtype)
    return fmt._decode(check_codes(codes), dtype)


def quantize(fmt, x, *, saturate: bool = True, rounding: str = "nearest", key: jax.Array | None = None):
    """Round ``x`` onto ``fmt``'s grid; the result has ``x``'s shape and dtype.

    Equal to ``decode(fmt, encode(fmt, x, ...))`` except that NaN always stays
    NaN (a format without a NaN code encodes it as zero, as ml_dtypes does) and
    the result is cast back to ``x``'s dtype.
    """
    fmt = _resolve(fmt)
    x = check_float_input(x)
    check_rounding(rounding, key)
    return fmt._quantize(x, saturate, rounding, key)


def values(fmt) -> np.ndarray:
    """Every finite representable value of ``fmt``, ascending, as float32 numpy."""
    return _resolve(fmt)._values()
