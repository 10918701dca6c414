"""The format protocol: what any element format provides, lowbit's own or a user's.

A user format is any object with the members of :class:`Format`; it needs no
lowbit base class. ``formats.encode/decode/quantize/values``,
``testing.check_format``, ``formats.register`` and ``quant.Quantizer`` accept it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


@runtime_checkable
class Format(Protocol):
    """An element format: a finite set of values, their codes, and rounding onto them.

    Implement these members on any class (a hashable one: the format is a static
    ``jax.jit`` argument and a cache key). The methods receive validated
    arguments (``formats.encode`` etc. check them first) and must be traceable
    by ``jax.jit``: jnp operations only, no Python branching on array values.

    Attributes:
      name: display name (the registry name when registered).
      bits: storage width of one code, 1..16.
      max_value: the value a scaled quantizer maps its clip (e.g. absmax) to:
        the largest value, or the largest magnitude where the most negative
        value is larger in magnitude (a codebook).
      has_nan: whether some code decodes to NaN.

    Methods:
      encode(x, *, saturate, rounding, key): codes of ``x`` (float32, bfloat16
        or float16, any shape): ``uint8`` up to 8 bits, else ``uint16``, in
        ``x``'s shape. ``rounding`` is ``nearest`` (ties to the even code),
        ``stochastic`` (unbiased, random bits from ``key``) or ``toward_zero``.
        ``saturate=True`` maps overflow and +-inf to the end values; ``False``
        follows the format's overflow (an inf or NaN code; formats with neither
        saturate anyway).
      decode(codes, *, dtype): the values of integer ``codes`` as ``dtype``.
      quantize(x, *, saturate, rounding, key): ``decode(encode(x))`` in
        ``x``'s dtype, except that NaN stays NaN even without a NaN code.
      values(): every finite value, ascending, as a float32 numpy array (zero
        as +0.0).
    """

    name: str
    bits: int
    max_value: float
    has_nan: bool

    def encode(self, x: jax.Array, *, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array: ...

    def decode(self, codes: jax.Array, *, dtype: Any) -> jax.Array: ...

    def quantize(self, x: jax.Array, *, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array: ...

    def values(self) -> np.ndarray: ...


def missing_members(obj) -> list[str]:
    """The :class:`Format` members ``obj`` lacks (empty when it implements the protocol)."""
    return [
        m
        for m in ("name", "bits", "max_value", "has_nan", "encode", "decode", "quantize", "values")
        if not hasattr(obj, m)
    ]


class BuiltinFormat:
    """Base of lowbit's own format classes: the :class:`Format` methods over their private kernels.

    Each method is the matching ``lowbit.formats`` function (validation, then the
    kernel), so ``fmt.quantize(x)`` and ``formats.quantize(fmt, x)`` are one code
    path. ``formats.api`` calls the kernels (``_encode``, ``_decode``,
    ``_quantize``, ``_values``) of these classes directly and a user format's
    public methods otherwise.
    """

    def encode(self, x, *, saturate: bool = False, rounding: str = "nearest", key: jax.Array | None = None):
        """See ``lowbit.formats.encode``."""
        from lowbit.formats import api  # api imports the registry, which imports these classes

        return api.encode(self, x, saturate=saturate, rounding=rounding, key=key)

    def decode(self, codes, *, dtype: Any = jnp.float32):
        """See ``lowbit.formats.decode``."""
        from lowbit.formats import api

        return api.decode(self, codes, dtype=dtype)

    def quantize(self, x, *, saturate: bool = True, rounding: str = "nearest", key: jax.Array | None = None):
        """See ``lowbit.formats.quantize``."""
        from lowbit.formats import api

        return api.quantize(self, x, saturate=saturate, rounding=rounding, key=key)

    def values(self) -> np.ndarray:
        """See ``lowbit.formats.values``."""
        from lowbit.formats import api

        return api.values(self)
