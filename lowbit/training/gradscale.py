"""Per-layer GradScale for radix-4 FP4 gradients (Sun et al., NeurIPS 2020).

Each quantized layer keeps one power-of-two scale ``s`` for its incoming
gradient. Before quantizing the gradient ``g`` the scale is updated from the
current gradient: keep ``s`` while ``max|g*s|`` lies in ``(max/2, max]``, double
it at or below ``max/2``, halve it above ``max``. ``s`` stays a power of two, so
scaling is exact.
"""

from __future__ import annotations

import jax.numpy as jnp

# Bounds keep s and 1/s normal float32 powers of two even when a layer's gradient
# is identically zero for many steps (which would otherwise double s forever).
MIN_SCALE = 2.0**-100
MAX_SCALE = 2.0**100


def gradscale_init(initial: float = 1.0) -> jnp.ndarray:
    """A fresh GradScale state: a float32 scalar power of two."""
    return jnp.asarray(initial, jnp.float32)


def gradscale_update(scale: jnp.ndarray, gmax: jnp.ndarray, fmt_max: float) -> jnp.ndarray:
    """One GradScale step.

    Args:
      scale: current scale ``s`` (float32 scalar).
      gmax: ``max|g|`` of the current gradient (any float dtype; cast to float32).
      fmt_max: the gradient format's largest value (64 for ``fp4_radix4``).

    Returns:
      The new scale: ``2s`` if ``gmax*s <= fmt_max/2``, ``s/2`` if
      ``gmax*s > fmt_max``, else ``s``; unchanged when ``gmax`` is not finite.
    """
    scaled = gmax.astype(jnp.float32) * scale
    two = jnp.float32(2.0)
    new = jnp.where(
        scaled <= jnp.float32(fmt_max / 2), scale * two, jnp.where(scaled > jnp.float32(fmt_max), scale / two, scale)
    )
    new = jnp.where(jnp.isfinite(scaled), new, scale)
    return jnp.clip(new, jnp.float32(MIN_SCALE), jnp.float32(MAX_SCALE))
