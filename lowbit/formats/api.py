"""The public format functions: encode, decode, quantize, values.

Each takes a format object implementing ``lowbit.formats.Format`` or a
registered name, and validates its arguments once, outside any trace. lowbit's
own formats then run their private kernels (``_encode`` etc.); any other format
runs its public protocol methods.
"""

from __future__ import annotations

import functools
from typing import Any, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from lowbit.formats._checks import check_bool, check_codes, check_dtype, check_float_input, check_rounding
from lowbit.formats.integer import BinaryFormat, IntFormat
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.protocol import AnyFormat, BuiltinFormat, C, Encoded, Format, codes_array, missing_members
from lowbit.formats.registry import get


# lowbit's encode and quantize kernels, each compiled as one program per (format, shapes, dtypes, flags).
# Outside any trace this makes a call one fused kernel instead of dozens of op-by-op dispatches, each
# compiled on first use (an eager nvfp4 quantize of a new shape compiled ~40 programs); inside a caller's
# trace, a call with abstract values already seen reuses its traced program. The format is a static
# argument: every BuiltinFormat is a frozen, hashable dataclass (tuples, not lists or arrays). decode
# stays unjitted: it checks concrete scale codes (an E8M0 code of 300 is an error), which a jitted
# kernel would see only as tracers.
@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def _kernel(
    f: BuiltinFormat[Any], kernel: str, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None
) -> Any:
    """``f._encode`` or ``f._quantize`` (``kernel``) of ``x``, compiled."""
    return getattr(f, kernel)(x, saturate, rounding, key)


def _resolve(fmt: str | AnyFormat) -> AnyFormat:
    """The format object of ``fmt`` (a name or a format); ``TypeError`` for anything else."""
    if isinstance(fmt, str):
        return get(fmt)
    missing = missing_members(fmt)
    if missing:
        raise TypeError(
            f"fmt={fmt!r} is not a format (it lacks {', '.join(missing)}); allowed: a registered "
            "name or an object implementing lowbit.formats.Format"
        )
    return fmt


# The overloads say what each kind of format encodes to: lowbit's own formats their ``C`` (codes,
# or codes and scales), a user's Format codes, a name either.
@overload
def encode(
    fmt: BuiltinFormat[C], x: ArrayLike, *, saturate: bool = ..., rounding: str = ..., key: jax.Array | None = ...
) -> C: ...
@overload
def encode(
    fmt: Format, x: ArrayLike, *, saturate: bool = ..., rounding: str = ..., key: jax.Array | None = ...
) -> jax.Array: ...
@overload
def encode(
    fmt: str | AnyFormat, x: ArrayLike, *, saturate: bool = ..., rounding: str = ..., key: jax.Array | None = ...
) -> Encoded: ...
def encode(
    fmt: str | Format | BuiltinFormat[C],
    x: ArrayLike,
    *,
    saturate: bool = False,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> Encoded:
    """Round ``x`` to ``fmt`` and return its bit patterns.

    Args:
      fmt: a format or its registered name.
      x: float32, bfloat16 or float16 array (jax or numpy), any shape.
        float64, Python floats and lists are a ``TypeError``: rounding is done
        in float32, and narrowing float64 first would round twice (a value
        just past a midpoint can land on the other neighbour); cast explicitly.
      saturate: map finite overflow and +-inf to +-max; ``False`` follows the
        format's own overflow (inf or NaN), exactly ml_dtypes' cast. A bool.
      rounding: ``nearest`` (half to even), ``stochastic`` (needs ``key``) or
        ``toward_zero``.
      key: one ``jax.random`` key for stochastic rounding: ``jax.random.key``
        or a legacy uint32[2] ``PRNGKey`` (anything else, a batch of keys
        included, is an error; other roundings ignore a valid key).

    Returns:
      Codes of ``x``'s shape, ``uint8`` for formats of at most 8 bits (value in
      the low bits, sign at bit ``bits-1``), ``uint16`` up to 16 bits, else
      ``uint32`` (``FloatFormat`` goes up to 32 bits). Scaled formats
      return a tuple that ``decode`` takes back: adaptive bias ``(codes, bias)``,
      MX ``(codes, e8m0_scale_codes)``, NVFP4 ``(codes, e4m3_block_scale_codes,
      tensor_scale)``.
    """
    f = _resolve(fmt)
    xa = check_float_input(x)
    check_bool("", "saturate", saturate)
    check_rounding(rounding, key)
    if isinstance(f, BuiltinFormat):
        return cast(Encoded, _kernel(f, "_encode", xa, saturate, rounding, key))
    return f.encode(xa, saturate=saturate, rounding=rounding, key=key)


def decode(fmt: str | AnyFormat, codes: Encoded | ArrayLike, *, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Values of ``codes`` (what ``encode`` returned) as ``dtype`` (float32, bfloat16 or float16).

    Codes are integers in ``[0, 2^bits - 1]``; concrete codes outside that
    range (``0xFFFF`` or ``-1`` for an 8-bit format, ``0xFF`` for a 4-bit one)
    are a ``ValueError``. Under ``jit`` the codes are tracers whose values
    cannot be checked: lowbit's formats then read only their low ``bits`` bits
    (``code & (2^bits - 1)``), as they do the scale codes of block formats.
    """
    fmt = _resolve(fmt)
    out_dtype = check_dtype(dtype)
    if isinstance(codes, tuple) and isinstance(fmt, (FloatFormat, IntFormat, BinaryFormat)):
        codes_array(codes, fmt.name)  # the error for a tuple
    checked: Encoded
    if isinstance(codes, tuple) and codes:
        checked = (check_codes(codes[0], fmt.bits), *(jnp.asarray(c) for c in codes[1:]))
    else:
        checked = check_codes(codes, fmt.bits)
    if isinstance(fmt, BuiltinFormat):
        return fmt._decode(checked, out_dtype)
    # A user format's codes are one array; a tuple goes to it as given (its own decode refuses it).
    return fmt.decode(cast(jax.Array, checked), dtype=out_dtype)


def quantize(
    fmt: str | AnyFormat,
    x: ArrayLike,
    *,
    saturate: bool = True,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Round ``x`` onto ``fmt``'s grid; the result has ``x``'s shape and dtype.

    Equal to ``decode(fmt, encode(fmt, x, ...))`` except that NaN always stays
    NaN (a format without a NaN code encodes it as zero, as ml_dtypes does) and
    the result is cast back to ``x``'s dtype.
    """
    fmt = _resolve(fmt)
    x = check_float_input(x)
    check_bool("", "saturate", saturate)
    check_rounding(rounding, key)
    if isinstance(fmt, BuiltinFormat):
        return cast(jax.Array, _kernel(fmt, "_quantize", x, saturate, rounding, key))
    return fmt.quantize(x, saturate=saturate, rounding=rounding, key=key)


def values(fmt: str | AnyFormat) -> np.ndarray:
    """Every finite representable value of ``fmt``, ascending, as float32 numpy (zero as +0.0)."""
    fmt = _resolve(fmt)
    v = np.asarray(fmt._values() if isinstance(fmt, BuiltinFormat) else fmt.values(), np.float32)
    return np.where(v == 0, np.float32(0), v)  # a format with -0 and +0 lists one zero: +0
