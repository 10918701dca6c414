"""Where the scales sit: one per tensor, per channel, per group of an axis, or per 2-D tile.

Each granularity is a frozen dataclass that checks its own fields, checks what
it needs of the rest of its quantizer (``check``), and lays itself out on an
array shape (``layout``). Block formats (MX, NVFP4), which carry their own
per-block scales, run along an axis (``Group``) or over 2-D tiles (``Block``):
``to_blocks`` puts each block on the last axis, where they scale it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.formats._checks import check_int, require
from lowbit.quant.layout import Layout, from_tiles, normalize_axis, tiled_shape, to_tiles

if TYPE_CHECKING:
    from lowbit.formats import BlockFormat
    from lowbit.quant.quantizer import Quantizer


def is_block(fmt: object) -> bool:
    """Block formats (MX, NVFP4) carry their own per-block scales."""
    return hasattr(fmt, "block_size")


def _int_field(obj: object, field: str, lo: int, hi: int | None = None) -> None:
    """Check an integer field and store it as a Python int (NumPy integers print and hash as ints then)."""
    value = getattr(obj, field)
    check_int(type(obj).__name__, field, value, lo, hi)
    object.__setattr__(obj, field, int(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tensor:
    """One scale for the whole tensor."""

    def check(self, q: Quantizer) -> None:
        require(
            not is_block(q.format),
            "Quantizer",
            "granularity",
            self,
            f"Group(axis=...) (1-D blocks) or Block(shape=...) (2-D tiles) with block format {q.format.name}",
        )

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return Layout(shape, shape, tuple(range(len(shape))), None)

    def along(self, axis: int) -> Tensor:
        """The same granularity along ``axis`` (a per-tensor scale has no axis)."""
        return self

    def __str__(self) -> str:
        return "tensor"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Channel:
    """One scale per index of ``axis`` (negative counts from the end; checked against the rank at call time)."""

    axis: int = -1

    def __post_init__(self) -> None:
        _int_field(self, "axis", -64, 63)

    def check(self, q: Quantizer) -> None:
        require(
            not is_block(q.format),
            "Quantizer",
            "granularity",
            self,
            f"Group(axis=...) or Block(shape=...) with block format {q.format.name} (its blocks carry the scales)",
        )

    def layout(self, shape: tuple[int, ...]) -> Layout:
        a = normalize_axis(self.axis, len(shape))
        return Layout(shape, shape, tuple(i for i in range(len(shape)) if i != a), a)

    def along(self, axis: int) -> Channel:
        return self if self.axis == axis else dataclasses.replace(self, axis=axis)

    def __str__(self) -> str:
        return f"channel(axis {self.axis})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Group:
    """One scale per ``size`` consecutive elements along ``axis``, for every index of the other axes.

    With a block format the groups are its own 1-D blocks: ``size`` is the
    format's block size (``None`` fills it in).
    """

    size: int | None = None
    axis: int = -1

    def __post_init__(self) -> None:
        if self.size is not None:
            _int_field(self, "size", 1)
        _int_field(self, "axis", -64, 63)

    def check(self, q: Quantizer) -> None:
        if is_block(q.format):
            n = q.format.block_size
            require(
                self.size in (None, n),
                "Group",
                "size",
                self.size,
                f"None or {n} (the block size of {q.format.name})",
            )
        else:
            require(self.size is not None, "Group", "size", None, "an integer >= 1 (elements per group)")

    def resolved(self, fmt: Any) -> Group:
        """``size`` filled in from a block format (``fmt``: any format, as ``Quantizer.format``)."""
        return dataclasses.replace(self, size=fmt.block_size) if self.size is None and is_block(fmt) else self

    def layout(self, shape: tuple[int, ...]) -> Layout:
        a = normalize_axis(self.axis, len(shape))
        n, g = shape[a], self.size
        assert g is not None  # a Quantizer fills in Group.size; a bare Group(size=None) never lays out
        if n % g:
            raise ValueError(
                f"Group.size={g} does not divide axis {self.axis} of shape {shape}; allowed: a divisor of {n}"
            )
        return Layout(shape, shape[:a] + (n // g, g) + shape[a + 1 :], (a + 1,), a)

    def along(self, axis: int) -> Group:
        return self if self.axis == axis else dataclasses.replace(self, axis=axis)

    def to_blocks(self, x: jax.Array) -> jax.Array:
        """``x`` with ``axis`` last, where a block format's blocks run."""
        return jnp.moveaxis(x, normalize_axis(self.axis, x.ndim), -1)

    def from_blocks(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jnp.moveaxis(y, -1, normalize_axis(self.axis, len(shape)))

    def block_format(self, fmt: BlockFormat) -> BlockFormat:
        return fmt

    def __str__(self) -> str:
        return f"group({self.size}, axis {self.axis})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block:
    """One scale per ``shape = (rows, cols)`` tile of the last two axes, for every index of the others.

    2-D block scaling: NVFP4's 16x16 or DeepSeek-V3's 128x128 weight blocks.
    The tiles span the last two axes, where a weight keeps both of its GEMM
    axes (in and out features). With a block format one E8M0/E4M3 scale covers
    a tile: the tile replaces the format's 1-D block.
    """

    shape: tuple[int, int]

    def __post_init__(self) -> None:
        bs = self.shape
        ok = (
            isinstance(bs, tuple)
            and len(bs) == 2
            and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= 1 << 16 for n in bs)
        )
        require(
            ok,
            "Block",
            "shape",
            bs,
            "a tuple (rows, cols) of two integers in [1, 65536] (1-D blocks are Group(size, axis))",
        )
        object.__setattr__(self, "shape", (int(bs[0]), int(bs[1])))

    def check(self, q: Quantizer) -> None:
        pass

    def layout(self, shape: tuple[int, ...]) -> Layout:
        n = len(shape)
        return Layout(shape, tiled_shape(shape, self.shape), (n - 1, n + 1), None)

    def along(self, axis: int) -> Block:
        """Tiles span both of the last two axes whatever the product's contraction."""
        return self

    def to_blocks(self, x: jax.Array) -> jax.Array:
        return to_tiles(x, self.shape)

    def from_blocks(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return from_tiles(y, shape, self.shape)

    def block_format(self, fmt: BlockFormat) -> BlockFormat:
        """The block format as it runs on tiles: one block of ``rows * cols`` elements per tile."""
        bm, bn = self.shape
        return dataclasses.replace(fmt, block_size=bm * bn, name=f"{fmt.name}_{bm}x{bn}")

    def __str__(self) -> str:
        return f"block({self.shape[0]}x{self.shape[1]})"


Granularity = Tensor | Channel | Group | Block
GRANULARITIES = (Tensor, Channel, Group, Block)
