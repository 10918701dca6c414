"""``QTensor``: packed codes plus the stored scales, a pytree whose bytes are the honest size."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from lowbit import formats
from lowbit.quant import packing
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
