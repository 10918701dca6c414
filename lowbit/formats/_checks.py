"""Argument checks shared by every format: clear errors at call time, not trace time."""

from typing import Any

import jax.numpy as jnp
import numpy as np

ROUNDINGS = ("nearest", "stochastic", "toward_zero")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def require(ok: bool, owner: str, field: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError`` naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: {allowed}")


def check_int(owner: str, field: str, value: Any, lo: int, hi: int | None = None) -> None:
    """An integer field inside [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: an integer")
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    require(value >= lo and (hi is None or value <= hi), owner, field, value, allowed)


def check_float_input(x: Any, what: str = "x") -> jnp.ndarray:
    """Return ``x`` as an array of float32, bfloat16 or float16, else ``TypeError``."""
    x = jnp.asarray(x)
    if x.dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(
            f"{what} has dtype {x.dtype}; allowed: float32, bfloat16 or float16 "
            "(cast integers explicitly, e.g. x.astype(jnp.float32))"
        )
    return x


def check_rounding(rounding: str, key: Any) -> None:
    """``rounding`` is one of ROUNDINGS and stochastic rounding has its key."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is invalid; allowed: {', '.join(ROUNDINGS)}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs an explicit jax.random key (key=...)")


def check_codes(codes: Any) -> jnp.ndarray:
    """Codes are unsigned (or signed) integers."""
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes have dtype {codes.dtype}; allowed: an integer dtype (uint8 or uint16)")
    return codes
