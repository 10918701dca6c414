"""Random-Hadamard rotation of an op's contracted dimension for PTQ (QuaRot / QuIP#-style incoherence processing).

An op ``y = x w`` with inputs ``x`` viewed as ``(n, K)`` rows and its weight as
``(K, N)`` (``lowbit.ptq.weights``) computes the same product as
``(x R)(Rᵀ w)`` for any orthogonal ``R``. Here

    ``R = D · blockdiag(H_b, ..., H_b) / sqrt(b)``

with ``D = diag(d)`` a random ±1 sign per input channel (``d`` of length ``K``)
and ``H_b`` the Sylvester Hadamard matrix of order ``b``: the largest power of
two dividing ``K``, capped at ``MAX_BLOCK``. The Hadamard blocks are
``lowbit.training.hadamard``'s (the one RHT of the library, applied with no
signs of its own), the signs ``rht_signs``' coin flips under a key made from the
seed and the op's name, so one seed gives every op its own fixed ``R``.

A weight row (input channel) with one huge outlier, or an input channel that
is always large, is spread over the ``b`` channels of its block: the rotated
weight ``Rᵀ w`` and the rotated input ``x R`` are incoherent (no channel stands
out), which is what round-to-nearest grids, per-channel weight scales and
per-tensor activation scales want.

A multi-axis contraction (an einsum over ``(h, d)``) is rotated on its
flattened ``K``, the contracted axes taken in the op's own order (the order
``lowbit.ptq.weights`` flattens rows and weights in), so that ``x`` and ``w``
meet the same ``R``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.training.hadamard import rht, rht_inverse, rht_signs

__all__ = [
    "MAX_BLOCK",
    "block_size",
    "matrix",
    "rotate_lhs",
    "rotate_rows",
    "rotate_weight",
    "signs",
    "unrotate_rows",
    "unrotate_weight",
]

# The largest Hadamard block: QuaRot rotates whole hidden sizes, QuIP# in power-of-two blocks; 256 spreads an
# outlier over 256 channels (its share of the norm drops 16x) at 256 multiply-adds per element.
MAX_BLOCK = 256


def block_size(k: int) -> int:
    """The Hadamard block of a ``K``-wide contraction: the largest power of two dividing ``k``, at most ``MAX_BLOCK``.

    1 for an odd ``k``: such an op has no Hadamard block and is not rotated.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"block_size: k={k!r} is invalid; allowed: an integer >= 1")
    return int(min(int(k) & -int(k), MAX_BLOCK))


def _key(seed: int, name: str) -> jax.Array:
    # Both halves of a 64-bit seed count (jax.random.key keeps only 32 bits of a Python int without x64).
    key = jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)
    return jax.random.fold_in(key, zlib.crc32(name.encode()))


def signs(seed: int, name: str, k: int) -> jax.Array:
    """``d``, the diagonal of ``D``: float32 ±1 of shape ``(k,)`` for op ``name`` under ``seed``.

    Deterministic in ``(seed, name)``; the first ``k`` coin flips of ``rht_signs``
    (each flip depends on its index and the key only, so ``k`` does not change them).
    """
    n = 1 << max(1, (int(k) - 1).bit_length())  # a power of two >= k (rht_signs' sizes)
    return rht_signs(_key(int(seed), name), n)[:k]


def _check(x: jax.Array, d: jax.Array) -> int:
    k = x.shape[-1]
    if d.shape != (k,):
        raise ValueError(f"signs have shape {d.shape}; allowed: ({k},), one per input channel")
    b = block_size(k)
    if b < 2:
        raise ValueError(f"an odd contraction K={k} has no Hadamard block; allowed: an even K")
    return b


def rotate_rows(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x R``: rows ``x`` (``(..., K)``) rotated along their last axis; ``x``'s dtype (computed in float32)."""
    x = jnp.asarray(x)
    d = jnp.asarray(d)
    b = _check(x, d)
    return rht(x.astype(jnp.float32) * d.astype(jnp.float32), -1, None, b).astype(x.dtype)


def unrotate_rows(y: jax.Array, d: jax.Array) -> jax.Array:
    """``y Rᵀ``, the inverse of ``rotate_rows``."""
    y = jnp.asarray(y)
    d = jnp.asarray(d)
    b = _check(y, d)
    return (rht_inverse(y.astype(jnp.float32), -1, None, b) * d.astype(jnp.float32)).astype(y.dtype)


def matrix(d: jax.Array) -> jax.Array:
    """``R`` itself, ``(K, K)`` float32 (tests and inspection; the transforms never form it)."""
    return rotate_rows(jnp.eye(len(d), dtype=jnp.float32), d)


def _along(x: jax.Array, axes: Sequence[int], d: jax.Array, fn) -> jax.Array:
    """``fn`` applied to ``x``'s ``axes`` flattened in the given order (the op's contracted ``K``), in place."""
    axes = [a % x.ndim for a in axes]
    free = [a for a in range(x.ndim) if a not in axes]
    order = free + list(axes)
    moved = jnp.transpose(x, order)
    k = int(np.prod([x.shape[a] for a in axes]))
    out = fn(moved.reshape(moved.shape[: len(free)] + (k,)), d).reshape(moved.shape)
    return jnp.transpose(out, [int(i) for i in np.argsort(order)])


def rotate_lhs(x: jax.Array, lc: Sequence[int], d: jax.Array) -> jax.Array:
    """An op's input with its contracted axes ``lc`` (flattened in that order) rotated: ``x R``, ``x``'s shape."""
    return _along(x, lc, d, rotate_rows)


def rotate_weight(w: jax.Array, rc: Sequence[int], d: jax.Array) -> jax.Array:
    """``Rᵀ w``: an op's weight with its contracted axes ``rc`` (in the order paired with ``lc``) rotated.

    ``Rᵀ w`` as a ``(K, N)`` matrix is ``(wᵀ R)ᵀ``: each output column is rotated
    like an input row, so ``rotate_lhs(x, lc, d)`` contracted with it gives ``x w``.
    """
    return _along(w, rc, d, rotate_rows)


def unrotate_weight(w: jax.Array, rc: Sequence[int], d: jax.Array) -> jax.Array:
    """``R w``, the inverse of ``rotate_weight``: a rotated weight in the op's original input basis."""
    return _along(w, rc, d, unrotate_rows)
