"""Argument checks shared by every format: clear errors at call time, not trace time."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

ROUNDINGS = ("nearest", "stochastic", "toward_zero")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in FLOAT_DTYPES)
_ALLOWED_FLOATS = "float32, bfloat16 or float16"


def _label(owner: str, field: str) -> str:
    return f"{owner}.{field}" if owner else field


def require(ok: bool, owner: str, field: str, value: object, allowed: str) -> None:
    """Raise ``ValueError`` naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{_label(owner, field)}={value!r} is invalid; allowed: {allowed}")


def check_int(owner: str, field: str, value: object, lo: int, hi: int | None = None) -> None:
    """An integer field inside [lo, hi] (``ValueError``; bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{_label(owner, field)}={value!r} is invalid; allowed: an integer")
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if not (value >= lo and (hi is None or value <= hi)):
        # Python refuses to print ints past 4300 digits; the bound is what matters.
        shown = value if int(value).bit_length() <= 64 else f"<an integer of {int(value).bit_length()} bits>"
        raise ValueError(f"{_label(owner, field)}={shown} is invalid; allowed: {allowed}")


def checked_int(owner: str, field: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int, after ``check_int``."""
    check_int(owner, field, value, lo, hi)
    assert isinstance(value, (int, np.integer))  # check_int raised otherwise
    return int(value)


def check_bool(owner: str, field: str, value: object) -> None:
    """A flag that must be a real ``bool``: ``"no"``, ``0``, ``1`` or ``None`` are ``TypeError``.

    Flags read by truthiness turn ``"no"`` into True; numpy's ``bool_`` is
    refused too, so every flag hashes and prints as the Python bool it means.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{_label(owner, field)}={value!r} is invalid; allowed: True or False (a bool)")


def check_name(owner: str, value: object) -> None:
    """A display name: a string."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}.name={value!r} is invalid; allowed: a string")


def _is_key_dtype(dtype: DTypeLike) -> bool:
    """Whether ``dtype`` is a typed ``jax.random`` key dtype (``key<fry>``...)."""
    try:
        return bool(jnp.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def check_float_input(x: object, what: str = "x") -> jax.Array:
    """Return ``x`` as a jax array of float32, bfloat16 or float16, else ``TypeError``.

    float64 is refused rather than narrowed: lowbit rounds in float32, and
    narrowing first rounds twice (float64 -> float32 -> format), which can land
    on the other neighbour of a midpoint. Python floats and lists of them are
    float64 values, so they are refused too: the caller converts explicitly.
    """
    raw = dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"{what} has type {type(x).__name__}; allowed: a jax or numpy array of {_ALLOWED_FLOATS} "
            f"(Python floats are float64: convert explicitly, e.g. jnp.asarray({what}, jnp.float32), "
            "accepting that it rounds each value to float32)"
        )
    if _is_key_dtype(dtype):
        raise TypeError(
            f"{what} is an array of jax.random keys (dtype {dtype}); allowed: a jax or numpy array of "
            f"{_ALLOWED_FLOATS} (a key goes to key=..., not {what})"
        )
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype == jnp.dtype(np.float64):
        raise TypeError(
            f"{what} has dtype float64; allowed: {_ALLOWED_FLOATS}. lowbit rounds in float32 and never "
            "narrows float64 silently: rounding float64 -> float32 -> format rounds twice and can differ "
            f"from rounding once; cast explicitly ({what}.astype(np.float32)) if that is acceptable"
        )
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {raw}; allowed: {_ALLOWED_FLOATS} "
            f"(cast integers explicitly, e.g. {what}.astype(jnp.float32))"
        )
    return jnp.asarray(x)


def check_key(key: object, what: str = "key") -> None:
    """One ``jax.random`` key: a new-style ``jax.random.key`` (shape ``()``) or a legacy uint32[2] ``PRNGKey``."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    allowed = "one jax.random.key(seed) or one legacy jax.random.PRNGKey(seed) (uint32[2])"
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"{what} is a batch of keys of shape {shape}; allowed: {allowed} "
                "(to use one key per call, jax.vmap over the keys)"
            )
        return
    if dtype is not None and shape is not None and jnp.dtype(dtype) == jnp.uint32 and len(shape) >= 1:
        if shape != (2,):
            raise ValueError(
                f"{what} has shape {shape}; allowed: {allowed} (to use one key per call, jax.vmap over the keys)"
            )
        return
    desc = f"dtype {dtype} and shape {shape}" if dtype is not None else f"type {type(key).__name__}"
    raise TypeError(f"{what} has {desc}; allowed: {allowed}")


def check_rounding(rounding: str, key: object) -> None:
    """``rounding`` is one of ROUNDINGS, stochastic rounding has its key, and a given key is a key."""
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is invalid; allowed: {', '.join(ROUNDINGS)}")
    if key is not None:
        check_key(key)
    elif rounding == "stochastic":
        raise ValueError("rounding='stochastic' needs an explicit jax.random key (key=...)")


def check_dtype(dtype: DTypeLike, what: str = "dtype") -> np.dtype[np.floating]:
    """An output dtype: float32, bfloat16 or float16 (returned as a numpy dtype)."""
    d: np.dtype[np.floating] | None
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d not in _FLOAT_DTYPES:
        raise TypeError(f"{what}={dtype!r} is invalid; allowed: {_ALLOWED_FLOATS}")
    return d


def is_concrete(a: object) -> bool:
    """Whether ``a``'s values can be read now (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not isinstance(a, jax.core.Tracer)


def check_range(a: object, lo: int, hi: int, what: str, context: str) -> None:
    """Concrete integer ``a`` lies in [lo, hi]; tracers pass (their caller documents what it does there)."""
    if not is_concrete(a):
        return
    v = np.asarray(a)
    if v.size and (v.min() < lo or v.max() > hi):
        bad = v[(v < lo) | (v > hi)].ravel()[0]
        raise ValueError(f"{what} hold {int(bad)} (and maybe more) outside [{lo}, {hi}]; allowed: {context}")


def check_codes(codes: object, bits: int, what: str = "codes") -> jax.Array:
    """Integer codes of a ``bits``-bit format, as a jax array.

    Concrete codes outside ``[0, 2^bits - 1]`` are a ``ValueError``. Traced
    codes (under ``jit``) cannot be inspected: the formats' decoders read only
    their low ``bits`` bits (``code & (2^bits - 1)``).
    """
    if not hasattr(codes, "dtype"):
        if not isinstance(codes, (int, list, tuple)) or isinstance(codes, bool):
            raise TypeError(
                f"{what} have type {type(codes).__name__}; allowed: an integer array (uint8, uint16 or uint32)"
            )
        codes = np.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{what} have dtype {codes.dtype}; allowed: an integer dtype (uint8, uint16 or uint32)")
    check_range(
        codes,
        0,
        2**bits - 1,
        what,
        f"codes of a {bits}-bit format, 0 .. {2**bits - 1} (under jit only the low bits are read)",
    )
    return jnp.asarray(codes)
