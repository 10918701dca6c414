"""``Quantizer``: a scaled quantization described as data (hashable, a static jit argument).

A quantizer is made of typed parts, each checking itself and owning its
kernel: the element ``format``, the ``granularity`` (``lowbit.quant.granularity``),
the scale ``source`` (``lowbit.quant.sources``) and the grid ``kind``
(``lowbit.quant.kinds``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowbit import formats
from lowbit.formats._checks import ROUNDINGS, check_bool, require
from lowbit.quant.granularity import GRANULARITIES, Granularity, Group, Tensor, is_block
from lowbit.quant.kinds import KINDS, Kind, Uniform
from lowbit.quant.sources import SCALES, Absmax, Fixed, Scale

SCALE_FORMATS = ("float32", "e8m0", "e4m3")

_OWN = "Quantizer"


def _resolve_format(fmt: object) -> Any:
    if not isinstance(fmt, str):
        return fmt
    try:
        return formats.get(fmt)
    except ValueError:
        require(False, _OWN, "format", fmt, "a registered format name: " + ", ".join(formats.names()))


def _default_granularity(fmt: Any) -> Granularity:
    """One scale per tensor; a block format's own 1-D blocks along the last axis."""
    return Group(size=fmt.block_size, axis=-1) if is_block(fmt) else Tensor()


def _names(classes: tuple[type, ...]) -> str:
    return " | ".join(c.__name__ + "()" for c in classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer:
    """How to quantize one tensor: element format, granularity, scale source, grid kind, rounding.

    Fake quantization is ``Q(x / step) * step`` per scale group, where ``Q`` rounds
    onto the element format's grid and ``step = clip / format.max_value`` maps
    the group's clip (its absmax, a percentile, an MSE- or KL-optimal threshold)
    onto the format's largest value.

    Attributes:
      format: element format, by name or as a format object (any
        ``lowbit.formats.Format``, a user's included); stored resolved.
        Block formats (``mxfp4_e2m1``, ``nvfp4``, ...) bring their own block
        scales: their granularity is ``Group(axis=...)`` (their 1-D blocks
        along an axis; the default, along the last) or ``Block(shape)`` (one
        block scale per 2-D tile), and the other parts keep their defaults.
      granularity: ``Tensor()`` (one scale), ``Channel(axis)`` (one per index
        of ``axis``), ``Group(size, axis)`` (one per ``size`` consecutive
        elements along ``axis``) or ``Block(shape)`` (one per ``(rows, cols)``
        tile of the last two axes: NVFP4's 16x16, DeepSeek-V3's 128x128).
        Default: ``Tensor()``; for a block format ``Group(size=block, axis=-1)``.
      scale: where the clip comes from: ``Absmax()``, ``Percentile(q)``,
        ``MSE()``, ``KL()`` (data-driven; ``static=True`` takes it from
        calibration, ``state=``), ``Fixed(step)``, ``Learned()`` or
        ``Delayed(history, reduction)`` (the caller passes the step,
        ``scale=``). See ``lowbit.quant.sources``.
      kind: ``Uniform(symmetric, zero_point_range)`` (step times the format's
        grid), ``Log2()``, ``Twin(split, shift)`` or ``PTF(max_power)`` (the
        ViT activation grids, on an integer format's code width). See
        ``lowbit.quant.kinds``.
      scale_format: how the step is stored: ``float32``; ``e8m0`` (a power of
        two, rounded up so nothing clips); ``e4m3`` (an E4M3 value, nearest,
        under a float32 tensor-wide step ``max(step) / 448``, as NVFP4).
      rounding: ``nearest`` (half to even), ``stochastic`` (needs a key) or
        ``toward_zero``.
      saturate: clip overflow to the largest value (``False`` follows the
        element format's own overflow; integer grids always clip).
    """

    format: Any
    granularity: Granularity = None  # type: ignore[assignment]  # filled in by __post_init__
    scale: Scale = Absmax()
    kind: Kind = Uniform()
    scale_format: str = "float32"
    rounding: str = "nearest"
    saturate: bool = True

    def __post_init__(self) -> None:
        fmt = _resolve_format(self.format)
        object.__setattr__(self, "format", fmt)
        element = isinstance(fmt, formats.Format) and not isinstance(fmt, formats.AdaptiveFloat)
        require(
            element or is_block(fmt),
            _OWN,
            "format",
            fmt,
            "an element format (lowbit.formats.Format: FloatFormat, IntFormat, BinaryFormat, "
            "CodebookFormat or a user's) or a block format (AdaptiveFloat scales itself: "
            "use its base format with scale_format='e8m0')",
        )
        g = _default_granularity(fmt) if self.granularity is None else self.granularity
        for field, value, allowed in (
            ("granularity", g, GRANULARITIES),
            ("scale", self.scale, SCALES),
            ("kind", self.kind, KINDS),
        ):
            if not isinstance(value, allowed):
                raise TypeError(f"{_OWN}.{field}={value!r} is invalid; allowed: {_names(allowed)}")
        object.__setattr__(self, "granularity", g.resolved(fmt) if isinstance(g, Group) else g)
        require(self.scale_format in SCALE_FORMATS, _OWN, "scale_format", self.scale_format, ", ".join(SCALE_FORMATS))
        require(self.rounding in ROUNDINGS, _OWN, "rounding", self.rounding, ", ".join(ROUNDINGS))
        check_bool(_OWN, "saturate", self.saturate)
        if is_block(fmt):
            self._check_block_format()
        for part in (self.granularity, self.scale, self.kind):
            part.check(self)

    def _check_block_format(self) -> None:
        for field, default in (("scale", Absmax()), ("scale_format", "float32"), ("kind", Uniform())):
            require(
                getattr(self, field) == default,
                _OWN,
                field,
                getattr(self, field),
                f"{default!r} with block format {self.format.name} (its blocks carry their own scales)",
            )

    # ----- derived, static properties -----------------------------------------------
    @property
    def static(self) -> bool:
        """Whether the clip comes from calibration (``state=``) rather than from each call's ``x``."""
        return self.scale.static

    @property
    def signed_range(self) -> bool:
        """Whether the clip is a (min, max) pair rather than one magnitude."""
        return self.kind.signed_range

    @property
    def int_range(self) -> tuple[int, int]:
        """(lowest, highest) integer code value of an integer grid."""
        fmt = self.format
        restricted = getattr(self.kind, "zero_point_range", "full") == "restricted"
        return fmt.min_int + restricted, fmt.max_int

    @property
    def max_level(self) -> float:
        """The grid value the clip maps to (``step = clip / max_level``)."""
        return self.kind.max_level(self)

    @property
    def bits(self) -> int:
        """Bits per element code."""
        bits: int = self.format.bits
        return bits

    @property
    def pow2_step(self) -> bool:
        """Whether every step is a power of two (then x * (1/step) is exact)."""
        if self.scale_format == "e8m0":
            return True
        return isinstance(self.scale, Fixed) and self.scale.pow2 and self.scale_format == "float32"

    def along(self, axis: int) -> Quantizer:
        """This quantizer with its granularity's axis (channels, groups, 1-D blocks) set to ``axis``."""
        g = self.granularity.along(axis)
        return self if g is self.granularity else dataclasses.replace(self, granularity=g)

    def __str__(self) -> str:
        parts = [getattr(self.format, "name", str(self.format))]
        if self.granularity != _default_granularity(self.format):
            parts.append(str(self.granularity))
        if self.scale != Absmax():
            parts.append(str(self.scale))
        if self.kind != Uniform():
            parts.append(str(self.kind))
        if self.scale_format != "float32":
            parts.append(f"{self.scale_format} scales")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return " ".join(parts)
