"""The random Hadamard transform (RHT) of NVIDIA's NVFP4 training recipe, in blocks along one axis.

Outliers inside a 16-element block force a large block scale that flushes the
block's other elements to zero in FP4. Rotating each block by an orthogonal
matrix with entries of equal magnitude spreads an outlier over the whole block
(the values become roughly Gaussian) before quantization. Applying the same
rotation to both operands of a product along the contraction axis leaves the
product unchanged, ``(x M)(w M)^T = x M M^T w^T = x w^T``, so it costs nothing
but the rotation itself and the rounding it changes.

Definition (NVFP4 pretraining report, NVIDIA 2025, section 4.2; TransformerEngine's
``get_rht_matrix`` / ``apply_rht`` in ``transformer_engine/jax/quantize/hadamard.py``):
every block ``b`` of ``block`` consecutive elements along ``axis``, read as a row
vector, becomes ``b @ M`` with ``M = D H / sqrt(block)``, where ``H`` is the
Sylvester Hadamard matrix (symmetric, entries +-1, ``H H^T = block * I``) and
``D = diag(signs)``. As a column vector that is ``H D b / sqrt(block)``: flip
signs, then Hadamard. One sign vector of length ``block`` serves every block of
the transform; the report uses a single random sign vector shared by all
layers for the whole run (TransformerEngine hard-codes one), and the caller
gets that by passing the same key. The report applies 16x16 transforms to the
weight-gradient product's inputs (32x32 for MXFP4).

Signs come from ``lowbit.formats.random_bits``, the library's one random source.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import DotDimensionNumbers
from jax.typing import ArrayLike

from lowbit.formats import random_bits
from lowbit.formats._checks import check_int, require

__all__ = ["RHT", "rht", "rht_dot_operands", "rht_inverse", "rht_signs"]

PRODUCTS = ("fwd", "dlhs", "drhs")  # a quantized matmul's forward, input-gradient and weight-gradient products


@functools.cache
def _sylvester(block: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order ``block`` (a power of two) as float32 +-1 (read-only)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def _check_block(owner: str, block: int) -> None:
    check_int(owner, "block", block, 2)
    require(block & (block - 1) == 0, owner, "block", block, "a power of two >= 2 (a Sylvester Hadamard order)")


def rht_signs(key: jax.Array | None, block: int = 16) -> jax.Array:
    """The sign vector ``diag(D)`` a key gives: float32 +-1 of shape ``(block,)``.

    Args:
      key: one ``jax.random`` key (typed or legacy uint32[2]), or ``None`` for
        all +1 (the plain Hadamard transform, the report's non-random ablation).
      block: the transform size, a power of two >= 2.
    """
    _check_block("rht_signs", block)
    if key is None:
        return jnp.ones((block,), jnp.float32)
    # Each word is a hash of its index under the key (uniform bits): its top bit is a fair coin.
    negative = lax.shift_right_logical(random_bits(key, (block,)), jnp.uint32(31)) == 1
    return jnp.where(negative, jnp.float32(-1), jnp.float32(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RHT:
    """Which products of a quantized matmul rotate their operands (``DotQuantConfig.rht``).

    A rotated product transforms both of its operands by one RHT in blocks
    along its contraction (several contracted dims flattened, as its block
    quantizers see them) before their quantizers, with the signs of its own key
    (see ``lowbit.training.qdot``). The rotation cancels in the product.

    Attributes:
      products: a non-empty tuple of ``fwd`` (forward), ``dlhs`` (input
        gradient), ``drhs`` (weight gradient: NVIDIA's NVFP4 recipe, the default).
      block: the transform size, a power of two >= 2 (16 for NVFP4, 32 for MXFP4).
    """

    products: tuple[str, ...] = ("drhs",)
    block: int = 16

    def __post_init__(self) -> None:
        ok = (
            isinstance(self.products, tuple)
            and len(self.products) > 0
            and all(isinstance(p, str) and p in PRODUCTS for p in self.products)
            and len(set(self.products)) == len(self.products)
        )
        require(ok, "RHT", "products", self.products, f"a non-empty tuple of distinct names in {', '.join(PRODUCTS)}")
        _check_block("RHT", self.block)


def _apply(owner: str, x: ArrayLike, axis: int, key: jax.Array | None, block: int, inverse: bool) -> jax.Array:
    _check_block(owner, block)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{owner}: x has dtype {x.dtype}; allowed: a float dtype")
    check_int(owner, "axis", axis, -x.ndim, x.ndim - 1)
    axis = axis % x.ndim
    n = x.shape[axis]
    require(
        n % block == 0,
        owner,
        "axis",
        axis,
        f"an axis whose length is a multiple of block={block} (x has shape {x.shape}, length {n})",
    )
    # float64 stays float64 (tests under x64); narrower floats are rotated in float32.
    dtype = x.dtype if x.dtype.itemsize > 4 else jnp.dtype(jnp.float32)
    h = jnp.asarray(_sylvester(block), dtype)
    signs = rht_signs(key, block).astype(dtype)
    # Row-vector blocks: forward b @ (D H), inverse b @ (D H)^T = b @ (H D). Signs scale H's rows or columns.
    m = h * signs[None, :] if inverse else signs[:, None] * h
    # The blocks are cut where the axis lies and contracted there: moving the axis last first costs XLA:CPU a
    # transposing copy (3.6x the whole transform for a (1088, 768) array along axis 0); the sums are the same.
    blocks = x.astype(dtype).reshape(x.shape[:axis] + (n // block, block) + x.shape[axis + 1 :])
    y = lax.dot_general(blocks, m, (((axis + 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
    # The 1/sqrt(block) scale comes last: one rounding per element, and none when block is a power of 4.
    y = y * jnp.asarray(1 / math.sqrt(block), dtype)
    return jnp.moveaxis(y, -1, axis + 1).reshape(x.shape).astype(x.dtype)


def rht(x: ArrayLike, axis: int, key: jax.Array | None, block: int = 16) -> jax.Array:
    """The random Hadamard transform of ``x`` in blocks along ``axis`` (see the module docstring).

    Orthogonal: ``rht_inverse`` undoes it, and norms and dot products along
    ``axis`` are kept up to float rounding (exactly when ``block`` is a power
    of 4 and the sums are exact, e.g. small integers). Jit-able with ``axis``
    and ``block`` static; linear, so ``jax.grad`` goes through it.

    Args:
      x: float array of any shape; ``x.shape[axis]`` a multiple of ``block``.
      axis: the axis the blocks lie along (negative counts from the end).
      key: one ``jax.random`` key for the signs (``rht_signs``); the same key
        gives the same transform. ``None``: no signs (plain Hadamard).
      block: the transform size, a power of two >= 2 (16 for NVFP4, 32 for MXFP4).

    Returns:
      The transformed array, ``x``'s shape and dtype (computed in float32, or
      float64 for float64 input).

    Raises:
      ValueError: ``block`` not a power of two >= 2, ``axis`` out of range, or
        ``x.shape[axis]`` not a multiple of ``block``.
      TypeError: ``x`` is not a float array, or ``key`` is not one key.
    """
    return _apply("rht", x, axis, key, block, inverse=False)


def rht_inverse(y: ArrayLike, axis: int, key: jax.Array | None, block: int = 16) -> jax.Array:
    """The inverse (the transpose) of ``rht(., axis, key, block)``: each block ``b`` becomes ``b @ H D / sqrt(block)``.

    Arguments, result and errors as ``rht``.
    """
    return _apply("rht_inverse", y, axis, key, block, inverse=True)


def rht_dot_operands(
    lhs: ArrayLike,
    rhs: ArrayLike,
    dimension_numbers: DotDimensionNumbers,
    key: jax.Array | None,
    *,
    block: int = 16,
    pair: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Both operands of a ``lax.dot_general`` transformed by one RHT along a pair of contracting dims.

    ``lax.dot_general(*rht_dot_operands(lhs, rhs, dn, key), dn)`` equals
    ``lax.dot_general(lhs, rhs, dn)`` up to float rounding: the same rotation
    meets its transpose in the contraction. Quantizing the returned operands
    is what an RHT product does (NVFP4 recipe: on the weight-gradient
    product's inputs, blocks along its contraction axis).

    Args:
      lhs, rhs: float operands.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch,
        rhs_batch))``, as ``lax.dot_general``.
      key: one ``jax.random`` key (or ``None``), shared by both operands.
      block: the transform size, a power of two >= 2.
      pair: which contracting pair carries the blocks, an index into
        ``lhs_contracting`` / ``rhs_contracting`` (default: the last listed).

    Returns:
      ``(lhs_t, rhs_t)``, the operands' shapes and dtypes.

    Raises:
      ValueError: ``pair`` out of range (also when nothing is contracted), and
        ``rht``'s errors for either operand.
    """
    (lc, rc), _ = dimension_numbers
    if len(lc) != len(rc):
        raise ValueError(f"dimension_numbers={dimension_numbers!r}: lhs and rhs contracting dims must pair up")
    if not lc:
        raise ValueError(f"dimension_numbers={dimension_numbers!r} contracts no dims; allowed: at least one pair")
    check_int("rht_dot_operands", "pair", pair, -len(lc), len(lc) - 1)
    return rht(lhs, lc[pair], key, block), rht(rhs, rc[pair], key, block)
