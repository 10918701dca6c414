"""Where the scales sit: the granularity of a quantizer applied to one shape."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from lowbit.quant.quantizer import Quantizer


@dataclasses.dataclass(frozen=True)
class Layout:
    """A quantizer's granularity on one array shape.

    Attributes:
      shape: the logical shape of ``x``.
      work: the shape the kernels see; ``shape`` itself, except that per-group
        quantization splits ``axis`` into ``(groups, group_size)`` and 2-D
        blocks split each of the last two axes into ``(tiles, tile side)``.
      reduce: axes of ``work`` that share one scale.
      axis: the channel axis (or the groups' axis) in ``work``; None per tensor
        and for 2-D blocks.
    """

    shape: tuple[int, ...]
    work: tuple[int, ...]
    reduce: tuple[int, ...]
    axis: int | None

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scales: ``work`` with the reduced axes kept as 1."""
        return tuple(1 if i in self.reduce else n for i, n in enumerate(self.work))

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` in ``[0, ndim)``; ValueError outside ``[-ndim, ndim)``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for an array of rank {ndim}; allowed: an integer in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def layout(q: Quantizer, shape: Sequence[int]) -> Layout:
    """The layout of quantizer ``q`` on ``shape``.

    Raises:
      ValueError: an axis out of range, a group size that does not divide the
        axis, or a ``Block`` shape that does not tile the last two axes.
    """
    return q.granularity.layout(tuple(int(n) for n in shape))


def tiled_shape(shape: tuple[int, ...], block_shape: tuple[int, int]) -> tuple[int, ...]:
    """``(..., M, N)`` as ``(..., M // bm, bm, N // bn, bn)`` for ``block_shape = (bm, bn)``.

    Raises:
      ValueError: fewer than two axes, or a tile side that does not divide its axis.
    """
    (bm, bn), lead = block_shape, tuple(shape[:-2])
    if len(shape) < 2 or shape[-2] % bm or shape[-1] % bn:
        raise ValueError(
            f"Block.shape={block_shape} does not tile an array of shape {tuple(shape)}; "
            "allowed: at least two axes, the last two multiples of the tile's rows and columns"
        )
    return lead + (shape[-2] // bm, bm, shape[-1] // bn, bn)


def to_tiles(x: jax.Array, block_shape: tuple[int, int]) -> jax.Array:
    """``x`` of shape ``(..., M, N)`` as ``(..., M // bm, N // bn, bm * bn)``: each tile on the last axis.

    This is how a block format (which blocks along the last axis) scales 2-D
    tiles: one block of ``bm * bn`` elements per tile.
    """
    w = x.reshape(tiled_shape(x.shape, block_shape))
    n = w.ndim
    return w.transpose(*range(n - 4), n - 4, n - 2, n - 3, n - 1).reshape(*w.shape[:-4], w.shape[-4], w.shape[-2], -1)


def from_tiles(t: jax.Array, shape: tuple[int, ...], block_shape: tuple[int, int]) -> jax.Array:
    """Inverse of ``to_tiles``: ``(..., M // bm, N // bn, bm * bn)`` back to ``shape``."""
    bm, bn = block_shape
    w = t.reshape(*t.shape[:-1], bm, bn)  # (..., M // bm, N // bn, bm, bn)
    n = w.ndim
    return w.transpose(*range(n - 4), n - 4, n - 2, n - 3, n - 1).reshape(shape)
