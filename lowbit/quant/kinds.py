"""What the grid is: uniform steps of an element format, or the ViT activation grids (log2, twin, PTF).

Each kind checks its own fields and what it needs of its quantizer, and owns
its kernels: ``fake`` (fake quantization), ``encode`` (codes) and ``decode``,
all on float32 ``x`` in the work layout with ``QParams`` ``p``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import jax

from lowbit import formats
from lowbit.formats._checks import check_bool, check_int, require
from lowbit.quant import uniform, vit
from lowbit.quant.granularity import Channel
from lowbit.quant.sources import Absmax, Percentile

if TYPE_CHECKING:
    from lowbit.quant.params import QParams
    from lowbit.quant.quantizer import Quantizer

ZERO_POINT_RANGES = ("full", "restricted")
TWIN_SPLITS = ("magnitude", "sign")


def _integer(q: Quantizer) -> bool:
    return isinstance(q.format, formats.IntFormat)


def _require_integer(q: Quantizer, kind: str) -> None:
    require(_integer(q), "Quantizer", "format", q.format, f"an IntFormat (the code width) with kind {kind}")


def _require_magnitude_bits(q: Quantizer, kind: str) -> None:
    fmt = q.format
    require(fmt.bits - fmt.signed >= 2, "Quantizer", "format", fmt.name, f"at least 2 magnitude bits with kind {kind}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _IntegerGrid:
    """Fields of the grids that may carry a zero point.

    Attributes:
      symmetric: zero at code 0; ``False`` adds an integer zero point so that
        ``[min(x, 0), max(x, 0)]`` spans the integer grid (integer formats only).
      zero_point_range: ``full`` uses every code of an integer format;
        ``restricted`` drops the most negative one (int8: [-127, 127]).
    """

    symmetric: bool = True
    zero_point_range: str = "full"

    def __post_init__(self) -> None:
        check_bool(type(self).__name__, "symmetric", self.symmetric)
        require(
            self.zero_point_range in ZERO_POINT_RANGES,
            type(self).__name__,
            "zero_point_range",
            self.zero_point_range,
            ", ".join(ZERO_POINT_RANGES),
        )

    def _check_grid(self, q: Quantizer) -> None:
        if self.zero_point_range == "restricted":
            require(
                _integer(q) and q.format.signed,
                type(self).__name__,
                "zero_point_range",
                "restricted",
                "'full' unless the format is a signed integer",
            )
        if not self.symmetric:
            require(_integer(q), type(self).__name__, "symmetric", False, "True unless the format is an integer")

    @property
    def signed_range(self) -> bool:
        return not self.symmetric


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform(_IntegerGrid):
    """``step`` times the element format's grid (an integer grid, with a zero point when asymmetric)."""

    name: ClassVar[Literal["uniform"]] = "uniform"

    def check(self, q: Quantizer) -> None:
        self._check_grid(q)

    def max_level(self, q: Quantizer) -> float:
        return float(q.format.max_value)

    def fake(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        if _integer(q):
            return uniform.int_fake(q, x, p.step(), p.zero_point, rounding, key)
        return uniform.format_fake(q, x, p.step(), rounding, key)

    def encode(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        if _integer(q):
            return uniform.int_encode(q, x, p.step(), p.zero_point, rounding, key)
        return uniform.format_encode(q, x, p.step(), rounding, key)

    def decode(self, q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array:
        if _integer(q):
            return uniform.int_decode(q, codes, p.step(), p.zero_point)
        return uniform.format_decode(q, codes, p.step())

    def __str__(self) -> str:
        parts = [] if self.symmetric else ["asymmetric"]
        parts += [] if self.zero_point_range == "full" else ["restricted"]
        return "uniform" + (f"({', '.join(parts)})" if parts else "")


class _Codec(Protocol):
    """What ``_Coded.fake`` needs of the kind it is mixed into."""

    def encode(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array: ...

    def decode(self, q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array: ...


class _Coded:
    """Kinds whose fake quantization is ``decode(encode(x))`` with NaN passed through (codes hold no NaN)."""

    def fake(self: _Codec, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        return vit.with_nan(x, self.decode(q, self.encode(q, x, p, rounding, key), p))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Log2(_Coded):
    """FQ-ViT's log2 grid for post-softmax attention: levels ``step * 2^-k`` and zero."""

    name: ClassVar[Literal["log2"]] = "log2"
    signed_range: ClassVar[bool] = False

    def check(self, q: Quantizer) -> None:
        _require_integer(q, "Log2()")
        require(q.rounding == "nearest", "Quantizer", "rounding", q.rounding, "nearest with kind Log2()")
        _require_magnitude_bits(q, "Log2()")

    def max_level(self, q: Quantizer) -> float:
        return 1.0

    def encode(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        return vit.log2_encode(q, x, p)

    def decode(self, q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array:
        return vit.log2_decode(q, codes, p)

    def __str__(self) -> str:
        return "log2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Twin(_Coded):
    """PTQ4ViT's twin uniform grid: two uniform ranges.

    Attributes:
      split: ``magnitude`` (a fine step below ``2^-shift`` of the range, a
        coarse step above: post-softmax) or ``sign`` (one step for negatives,
        one for positives, in a power-of-two ratio: post-GELU).
      shift: the fine step is the coarse step times ``2^-shift``, 1..30.
    """

    split: str = "magnitude"
    shift: int = 3
    name: ClassVar[Literal["twin"]] = "twin"

    def __post_init__(self) -> None:
        require(self.split in TWIN_SPLITS, "Twin", "split", self.split, ", ".join(TWIN_SPLITS))
        check_int("Twin", "shift", self.shift, 1, 30)
        object.__setattr__(self, "shift", int(self.shift))

    def check(self, q: Quantizer) -> None:
        _require_integer(q, "Twin()")
        if self.split == "sign":
            require(
                q.format.signed, "Quantizer", "format", q.format.name, "a signed integer format with Twin(split='sign')"
            )
        _require_magnitude_bits(q, "Twin()")

    @property
    def signed_range(self) -> bool:
        return self.split == "sign"

    def index_bits(self, q: Quantizer) -> int:
        """Bits of the uniform index inside one range."""
        bits: int = q.format.bits
        return bits - 1 - (q.format.signed and self.split == "magnitude")

    def max_level(self, q: Quantizer) -> float:
        return float(2 ** self.index_bits(q) - 1)

    def encode(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        return vit.twin_encode(q, self, x, p, rounding, key)

    def decode(self, q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array:
        return vit.twin_decode(q, self, codes, p)

    def __str__(self) -> str:
        return f"twin({self.split}, shift {self.shift})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTF(_IntegerGrid):
    """FQ-ViT's power-of-two factor for post-LayerNorm activations.

    Channel ``c`` of the granularity's axis uses ``step * 2^a_c``, ``a_c`` in
    ``0..max_power``; needs ``Channel`` granularity and an integer format.
    """

    max_power: int = 3
    name: ClassVar[Literal["ptf"]] = "ptf"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("PTF", "max_power", self.max_power, 1, 8)
        object.__setattr__(self, "max_power", int(self.max_power))

    def check(self, q: Quantizer) -> None:
        _require_integer(q, "PTF()")
        self._check_grid(q)
        require(
            isinstance(q.granularity, Channel),
            "Quantizer",
            "granularity",
            q.granularity,
            "Channel(axis) with kind PTF() (the axis holds the channels)",
        )
        require(
            isinstance(q.scale, (Absmax, Percentile)),
            "Quantizer",
            "scale",
            q.scale,
            "Absmax() or Percentile() with kind PTF()",
        )

    def max_level(self, q: Quantizer) -> float:
        return float(q.format.max_value)

    def fake(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        return uniform.int_fake(q, x, vit.ptf_step(p), p.zero_point, rounding, key)

    def encode(self, q: Quantizer, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
        return uniform.int_encode(q, x, vit.ptf_step(p), p.zero_point, rounding, key)

    def decode(self, q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array:
        return uniform.int_decode(q, codes, vit.ptf_step(p), p.zero_point)

    def __str__(self) -> str:
        return f"ptf(K={self.max_power}" + ("" if self.symmetric else ", asymmetric") + ")"


Kind = Uniform | Log2 | Twin | PTF
KINDS = (Uniform, Log2, Twin, PTF)
