"""``QTensor``: packed codes plus the stored scales, a pytree whose bytes are the honest size.

``partition_specs`` lays a ``QTensor`` out on a device mesh: given the
``PartitionSpec`` of the logical (unquantized) array, the spec of each of its
arrays. The codes are one flat array, stored row-major in the order of
``codes_axis``'s layout, so only a split of the outermost stored axis is a
contiguous range of them; the scales follow the logical spec axis by axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, PartitionSpec
from jax.typing import DTypeLike

from lowbit import formats
from lowbit.quant import packing
from lowbit.quant.granularity import Block, Group, is_block
from lowbit.quant.layout import layout, normalize_axis
from lowbit.quant.params import E4M3, E8M0, QParams

if TYPE_CHECKING:
    from lowbit.quant.quantizer import Quantizer

_SCALE_STORAGE = {"e8m0": E8M0, "e4m3": E4M3}


@dataclasses.dataclass(frozen=True)
class QTensor:
    """A really quantized array (a pytree: the arrays are leaves, the rest is static).

    Attributes:
      codes: packed element codes, 1-D (``lowbit.quant.packing``): ``uint8``,
        or ``uint16`` for 16-bit codes.
      scale: the stored steps: float32, or ``uint8`` E8M0 / E4M3 codes; in the
        scales' kept-dims shape (block formats: one per block along the last axis).
      zero_point: integer zero points (``int8``/``uint8``; 16 bits for 16-bit
        formats), or None.
      tensor_scale: float32 scalar second scale level (E4M3 scales, NVFP4), or None.
      exponent: ``int8`` power-of-two factors (``ptf``, ``twin_uniform``), or None.
      quantizer: the ``Quantizer`` (format, granularity, axis, kind; static).
      shape: the logical shape (static).
      dtype: the dtype ``dequantize`` returns (static; the input's).
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    exponent: jax.Array | None
    quantizer: Quantizer
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def format(self) -> Any:
        """The element (or block) format."""
        return self.quantizer.format

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes + scales + zero points + factors."""
        arrays = (self.codes, self.scale, self.zero_point, self.tensor_scale, self.exponent)
        return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays if a is not None))


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "scale", "zero_point", "tensor_scale", "exponent"],
    meta_fields=["quantizer", "shape", "dtype"],
)


def pack_codes(q: Quantizer, codes: jax.Array) -> jax.Array:
    packed: jax.Array = packing.pack(codes, packing.container_bits(q.bits))  # jax.jit drops the return type
    return packed


def unpack_codes(q: Quantizer, packed: jax.Array, n: int) -> jax.Array:
    codes: jax.Array = packing.unpack(packed, packing.container_bits(q.bits), n)  # (jax.jit drops it)
    return codes


def _zero_point_dtype(fmt: Any) -> DTypeLike:
    small = fmt.bits <= 8
    dtype: DTypeLike
    if fmt.signed:
        dtype = jnp.int8 if small else jnp.int16
    else:
        dtype = jnp.uint8 if small else jnp.uint16
    return dtype


class Stored(TypedDict):
    """``QTensor``'s fields that hold ``QParams`` (``store``'s result)."""

    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    exponent: jax.Array | None


def store(q: Quantizer, p: QParams) -> Stored:
    """The stored form of ``p``: scale codes, integer zero points, int8 exponents."""
    fmt = _SCALE_STORAGE.get(q.scale_format)
    return Stored(
        scale=p.scale if fmt is None else formats.encode(fmt, p.scale),
        zero_point=None if p.zero_point is None else p.zero_point.astype(_zero_point_dtype(q.format)),
        tensor_scale=p.tensor_scale,
        exponent=None if p.exponent is None else p.exponent.astype(jnp.int8),
    )


def load(qt: QTensor) -> QParams:
    """Inverse of ``store`` (exact: every stored value is on its storage grid)."""
    fmt = _SCALE_STORAGE.get(qt.quantizer.scale_format)
    return QParams(
        scale=qt.scale if fmt is None else formats.decode(fmt, qt.scale),
        zero_point=None if qt.zero_point is None else qt.zero_point.astype(jnp.float32),
        tensor_scale=qt.tensor_scale,
        exponent=None if qt.exponent is None else qt.exponent.astype(jnp.int32),
    )


# ----- partition specs ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Axis:
    """One axis of a stored array: each step along it moves ``stride`` elements along logical axis ``logical``.

    ``logical`` is None for an axis of size 1 and for the inside of a 2-D tile
    (which runs along two logical axes at once).
    """

    logical: int | None
    stride: int


@dataclasses.dataclass(frozen=True)
class _Stored:
    """How a quantizer stores an array of one logical shape: the codes' order and the scales' axes."""

    codes: tuple[_Axis, ...]  # the codes' axes before packing, outermost first (flattened row-major)
    codes_shape: tuple[int, ...]
    scales: tuple[_Axis, ...]  # the axes of the scales, zero points and exponents (kept-dims: 1 where shared)
    scales_shape: tuple[int, ...]

    def block(self, d: int) -> int:
        """Consecutive elements of logical axis ``d`` that share one scale entry (1: none shared)."""
        return max((a.stride for a in self.scales if a.logical == d), default=1)


def _reshape_axes(shape: tuple[int, ...], work: tuple[int, ...]) -> tuple[_Axis, ...]:
    """The axes of ``work``, a row-major reshape of ``shape`` that only splits axes (``Layout.work``)."""
    todo = [(d, n) for d, n in enumerate(shape) if n > 1]
    axes, i, left = [], 0, todo[0][1] if todo else 1
    for w in work:
        if w == 1:
            axes.append(_Axis(None, 1))
            continue
        d = todo[i][0]
        assert left % w == 0, (shape, work)
        left //= w
        axes.append(_Axis(d, left))
        if left == 1:
            i += 1
            left = todo[i][1] if i < len(todo) else 1
    return tuple(axes)


def _stored(q: Quantizer, shape: tuple[int, ...]) -> _Stored:
    """Where each logical axis lies in the codes and scales of ``quantize(q, x)`` for ``x`` of ``shape``."""
    nd = len(shape)
    if not is_block(q.format):
        # Element formats: codes and kept-dims scales in Layout.work, a row-major reshape of the array.
        work = layout(q, shape).work
        axes = _reshape_axes(shape, work)
        return _Stored(axes, work, axes, work)
    g = q.granularity

    def one(d: int) -> _Axis:
        return _Axis(d if shape[d] > 1 else None, 1)

    if isinstance(g, Group):
        # Group.to_blocks moves the blocks' axis last; the format's blocks split it, one scale per block.
        a = normalize_axis(g.axis, nd)
        order = [d for d in range(nd) if d != a] + [a]
        codes = tuple(one(d) for d in order)
        codes_shape = tuple(shape[d] for d in order)
        size = q.format.block_size
        scales = (*codes[:-1], _Axis(a, size))
        return _Stored(codes, codes_shape, scales, (*codes_shape[:-1], -(-shape[a] // size)))
    assert isinstance(g, Block)  # Tensor / Channel refuse block formats
    # Block.to_blocks: (..., M // bm, N // bn, bm * bn), one scale per tile (its last axis kept as 1).
    (bm, bn), lead = g.shape, tuple(one(d) for d in range(nd - 2))
    tiles = (_Axis(nd - 2, bm), _Axis(nd - 1, bn), _Axis(None, 1))
    grid = (*shape[:-2], shape[-2] // bm, shape[-1] // bn)
    return _Stored((*lead, *tiles), (*grid, bm * bn), (*lead, *tiles), (*grid, 1))


def codes_axis(qt: QTensor) -> int | None:
    """The logical axis of ``qt`` whose splits are contiguous ranges of its flat codes, or None (no axis).

    The codes are stored row-major in the quantizer's layout: the array's own
    order for element formats (axis 0 outermost, or the first axis longer
    than 1), the blocks' axis moved last for a block format's ``Group``, 2-D
    tiles for ``Block``. A split of the outermost stored axis cuts the codes
    into contiguous ranges; a split of any other axis would give every
    device strided pieces of them, which no ``PartitionSpec`` of a 1-D array
    can express.
    """
    stored = _stored(qt.quantizer, tuple(qt.shape))
    for ax, n in zip(stored.codes, stored.codes_shape, strict=True):
        if n > 1:
            d = ax.logical
            return d if d is not None and ax.stride * n == qt.shape[d] else None
    return None


def mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry (a name or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_shards(spec: PartitionSpec, mesh: Mesh | AbstractMesh) -> list[int]:
    """How many shards each entry of ``spec`` splits its axis into (1 for ``None``).

    Raises:
      ValueError: an entry names a mesh axis the mesh lacks.
    """
    sizes = dict(mesh.shape)
    unknown = [a for e in spec if e is not None for a in mesh_axes(e) if a not in sizes]
    if unknown:
        raise ValueError(f"spec {spec}: mesh axes {unknown} are not in the mesh ({', '.join(sizes)})")
    return [1 if e is None else math.prod(sizes[a] for a in mesh_axes(e)) for e in spec]


def _spec(*entries: Any) -> PartitionSpec:
    spec: PartitionSpec = PartitionSpec(*entries)  # type: ignore[no-untyped-call]  # (unannotated in jax 0.10)
    return spec


def partition_specs(qt: QTensor, spec: PartitionSpec, mesh: Mesh | AbstractMesh) -> Any:
    """The ``PartitionSpec`` of each array of ``qt`` when its logical array is laid out as ``spec`` on ``mesh``.

    * ``codes`` (1-D): split over the mesh axes of ``codes_axis(qt)`` (a
      contiguous range per device), which must leave every device a whole
      number of bytes (or 6-bit triples, uint16 words); replicated when that
      axis is not split.
    * ``scale``, ``zero_point``, ``exponent`` (kept-dims): split where they have
      an entry per block of a split logical axis, replicated along axes they
      share (per-channel scales along the other axis, a per-tensor scale).
    * ``tensor_scale``: replicated (one number).

    Mesh axes of size 1 are dropped (nothing to split). A group as long as its
    axis is one scale for the whole axis: like a per-channel scale along the
    other axis, it is replicated along a split of that axis.

    Args:
      qt: the ``QTensor`` (its arrays may be ``jax.ShapeDtypeStruct``).
      spec: the logical array's spec: one entry (None, a mesh axis name or a
        tuple of them) per axis of ``qt.shape``, missing trailing entries None.
      mesh: the ``Mesh`` or ``jax.sharding.AbstractMesh`` (only its axis sizes are read).

    Returns:
      A ``QTensor`` whose arrays are ``PartitionSpec`` (None fields stay None):
      a pytree of ``qt``'s structure, e.g. for ``jax.device_put`` after mapping
      each spec to a ``NamedSharding``.

    Raises:
      TypeError: ``spec`` is not a ``PartitionSpec``.
      ValueError: more entries than axes, a mesh axis the mesh lacks, a split
        that does not divide its axis, one that would cut a scale block or
        group, a split of an axis other than ``codes_axis(qt)``, or shards that
        are not whole bytes of codes; each naming the axis.
    """
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"spec has type {type(spec).__name__}; allowed: a jax.sharding.PartitionSpec")
    shape = tuple(qt.shape)
    if len(spec) > len(shape):
        raise ValueError(f"spec {spec} has {len(spec)} entries; allowed: at most {len(shape)} (qt.shape={shape})")
    # logical axis -> (spec entry, number of shards)
    splits = {d: (spec[d], n) for d, n in enumerate(spec_shards(spec, mesh)) if n > 1}
    stored = _stored(qt.quantizer, shape)
    for d, (entry, n) in splits.items():
        if shape[d] % n:
            raise ValueError(
                f"axis {d} of size {shape[d]} is split over {entry!r} ({n} shards), which does not divide it"
            )
        block = stored.block(d)
        if (shape[d] // n) % block:
            raise ValueError(
                f"axis {d} of size {shape[d]} split over {entry!r} leaves {shape[d] // n} elements per shard, not a "
                f"multiple of the quantizer's {block}-element scale blocks ({qt.quantizer.granularity}): a shard "
                "boundary would fall inside a block"
            )
    lead = codes_axis(qt)
    for d, (entry, _) in splits.items():
        if d != lead:
            where = "no axis can be split" if lead is None else f"only axis {lead} can be split"
            raise ValueError(
                f"axis {d} of shape {shape} is split over {entry!r}, but the codes are one flat array stored "
                f"row-major in the order {stored.codes_shape} (axis {lead} outermost): a split of axis {d} would "
                f"give each device strided pieces of them, not a range; {where}"
            )
    codes_spec = _spec()
    if lead in splits:
        entry, n = splits[lead]
        bits = packing.container_bits(qt.quantizer.bits)
        per_word = 4 if bits == 6 else max(1, 8 // bits)  # codes per byte (a 6-bit triple, a uint16 word)
        count = math.prod(shape) // n
        if count % per_word:
            raise ValueError(
                f"axis {lead} split over {entry!r} leaves {count} {bits}-bit codes per shard, not whole bytes "
                f"({per_word} codes per {'3 bytes' if bits == 6 else 'byte'})"
            )
        codes_spec = _spec(entry)

    def follow(name: str, a: jax.Array) -> PartitionSpec:
        if a.ndim == len(stored.scales) and all(m in (1, k) for m, k in zip(a.shape, stored.scales_shape)):
            return _spec(
                *(
                    splits[ax.logical][0]
                    if ax.logical in splits and m > 1 and ax.stride == stored.block(ax.logical)
                    else None
                    for ax, m in zip(stored.scales, a.shape, strict=True)
                )
            )
        if a.size == 1:
            return _spec()
        raise ValueError(f"{name} has shape {tuple(a.shape)}; expected the scales' layout {stored.scales_shape}")

    leaves = [codes_spec, follow("scale", qt.scale)]
    if qt.zero_point is not None:
        leaves.append(follow("zero_point", qt.zero_point))
    if qt.tensor_scale is not None:
        leaves.append(_spec())  # one number: every device needs it
    if qt.exponent is not None:
        leaves.append(follow("exponent", qt.exponent))
    return jax.tree_util.tree_unflatten(jax.tree.structure(qt), leaves)
