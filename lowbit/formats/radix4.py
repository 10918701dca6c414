"""Two-phase rounding (TPR) on the radix-4 FP4 grid (Sun et al., NeurIPS 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from lowbit.formats._bits import split_key
from lowbit.formats._checks import check_float_input, check_rounding
from lowbit.formats.api import quantize
from lowbit.formats.registry import get


def two_phase(x: ArrayLike, *, rounding: str = "nearest", key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x`` on the even grid {4^k} and on the odd grid {2 * 4^k}.

    The odd grid is ``fp4_radix4`` scaled by 2: ``2 * quantize(fp4_radix4, x / 2)``.

    Returns:
      ``(even, odd)``, each with ``x``'s shape and dtype.

    Raises:
      TypeError: ``x`` is not float32/bfloat16/float16 (as ``formats.quantize``),
        or ``key`` is not one ``jax.random`` key.
    """
    x = check_float_input(x)
    check_rounding(rounding, key)
    fmt = get("fp4_radix4")
    two = jnp.asarray(2, x.dtype)
    k_even, k_odd = (None, None) if key is None else split_key(key, 2)
    even = quantize(fmt, x, rounding=rounding, key=k_even)
    odd = quantize(fmt, x / two, rounding=rounding, key=k_odd) * two
    return even, odd
