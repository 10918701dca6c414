"""The format protocol: what any element format provides, lowbit's own or a user's.

A user format is any object with the members of :class:`Format`; it needs no
lowbit base class. ``formats.encode/decode/quantize/values``,
``testing.check_format``, ``formats.register`` and ``quant.Quantizer`` accept it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

# What a lowbit format's encode returns: codes (element formats), or codes and
# scales (adaptive and block formats), which decode takes back.
Encoded = jax.Array | tuple[jax.Array, ...]
C = TypeVar("C", jax.Array, tuple[jax.Array, ...])


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

    # Read-only properties: frozen dataclasses (lowbit's own formats) implement them too.
    @property
    def name(self) -> str: ...

    @property
    def bits(self) -> int: ...

    @property
    def max_value(self) -> float: ...

    @property
    def has_nan(self) -> bool: ...

    def encode(self, x: jax.Array, *, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array: ...

    def decode(self, codes: jax.Array, *, dtype: DTypeLike) -> jax.Array: ...

    def quantize(self, x: jax.Array, *, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array: ...

    def values(self) -> np.ndarray: ...


def missing_members(obj: object) -> list[str]:
    """The :class:`Format` members ``obj`` lacks (empty when it implements the protocol)."""
    return [
        m
        for m in ("name", "bits", "max_value", "has_nan", "encode", "decode", "quantize", "values")
        if not hasattr(obj, m)
    ]


class BuiltinFormat(Generic[C], abc.ABC):
    """Base of lowbit's own format classes: the :class:`Format` methods over their private kernels.

    Each method is the matching ``lowbit.formats`` function (validation, then the
    kernel), so ``fmt.quantize(x)`` and ``formats.quantize(fmt, x)`` are one code
    path. ``formats.api`` calls the kernels (``_encode``, ``_decode``,
    ``_quantize``, ``_values``) of these classes directly and a user format's
    public methods otherwise. ``C`` is what ``encode`` returns: ``jax.Array``
    codes for element formats (which makes them :class:`Format` s), a tuple of
    codes and scales for adaptive and block formats.
    """

    if TYPE_CHECKING:  # the Format members every subclass has (fields, properties or class attributes)

        @property
        def name(self) -> str: ...

        @property
        def bits(self) -> int: ...

        @property
        def max_value(self) -> float: ...

        @property
        def has_nan(self) -> bool: ...

    # ----- the kernels, which every subclass implements (arguments already validated; abstract) -----
    @abc.abstractmethod
    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> C: ...

    @abc.abstractmethod
    def _decode(self, codes: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        """Values of ``codes``: what ``formats.decode`` received, checked (element formats take
        the array alone, scaled formats the tuple; ``codes_array`` narrows the former)."""

    @abc.abstractmethod
    def _quantize(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> jax.Array: ...

    @abc.abstractmethod
    def _values(self) -> np.ndarray: ...

    # ----- the public methods ----------------------------------------------------------------
    def encode(
        self, x: ArrayLike, *, saturate: bool = False, rounding: str = "nearest", key: jax.Array | None = None
    ) -> C:
        """See ``lowbit.formats.encode``."""
        from lowbit.formats import api  # api imports the registry, which imports these classes

        return api.encode(self, x, saturate=saturate, rounding=rounding, key=key)

    def decode(self, codes: C, *, dtype: DTypeLike = jnp.float32) -> jax.Array:
        """See ``lowbit.formats.decode``."""
        from lowbit.formats import api

        return api.decode(self, codes, dtype=dtype)

    def quantize(
        self, x: ArrayLike, *, saturate: bool = True, rounding: str = "nearest", key: jax.Array | None = None
    ) -> jax.Array:
        """See ``lowbit.formats.quantize``."""
        from lowbit.formats import api

        return api.quantize(self, x, saturate=saturate, rounding=rounding, key=key)

    def values(self) -> np.ndarray:
        """See ``lowbit.formats.values``."""
        from lowbit.formats import api

        return api.values(self)


def codes_array(codes: Encoded, name: str) -> jax.Array:
    """An element format's codes: one array (``formats.decode`` refuses a tuple first)."""
    if isinstance(codes, tuple):
        raise ValueError(
            f"codes is a tuple; allowed for {name}: the codes array encode returned "
            "(only scaled formats, adaptive and block, encode to a tuple)"
        )
    return codes


# Every format the registry and ``formats.encode/decode/quantize/values`` take: a user's
# element format, or one of lowbit's (element formats encode to arrays, scaled ones to tuples).
AnyFormat = Format | BuiltinFormat[jax.Array] | BuiltinFormat[tuple[jax.Array, ...]]
