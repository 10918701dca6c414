"""``Quantizer``: a scaled quantization described as data (hashable, a static jit argument)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lowbit import formats
from lowbit.formats._checks import ROUNDINGS, check_bool, check_int, require

GRANULARITIES = ("tensor", "channel", "group", "block")
SCALES = ("absmax", "percentile", "mse", "kl", "fixed", "learned", "delayed", "none")
DATA_SCALES = ("absmax", "percentile", "mse", "kl")  # the sources a static quantizer calibrates
AMAX_REDUCTIONS = ("max", "most_recent")  # how scale="delayed" reads its amax history
DEFAULT_AMAX_HISTORY = 16
SCALE_FORMATS = ("float32", "e8m0", "e4m3")
ZERO_POINT_RANGES = ("full", "restricted")
KINDS = ("uniform", "log2", "twin_uniform", "ptf")
TWIN_SPLITS = ("magnitude", "sign")
KL_BINS = 2048

_OWN = "Quantizer"


def _resolve_format(fmt):
    if not isinstance(fmt, str):
        return fmt
    try:
        return formats.get(fmt)
    except ValueError:
        require(False, _OWN, "format", fmt, "a registered format name: " + ", ".join(formats.names()))


def is_block(fmt) -> bool:
    """Block formats (MX, NVFP4) carry their own per-block scales."""
    return hasattr(fmt, "block_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer:
    """How to quantize one tensor: element format, scale granularity and source, rounding.

    Fake quantization is ``Q(x / step) * step`` per scale group, where ``Q`` rounds
    onto the element format's grid and ``step = clip / format.max_value`` maps
    the group's clip (its absmax, a percentile, an MSE- or KL-optimal threshold)
    onto the format's largest value.

    Attributes:
      format: element format, by name or as a format object (any
        ``lowbit.formats.Format``, a user's included); stored resolved.
        Block formats (``mxfp4_e2m1``, ``nvfp4``, ...) bring their own block
        scales: the quantizer then only moves ``axis`` to the last axis (where
        the blocks run), or with ``granularity="block"`` gathers each 2-D tile
        into one block; the scale fields must keep their defaults.
      granularity: ``tensor`` (one scale; a block format's 1-D blocks along
        ``axis``), ``channel`` (one per index of ``axis``), ``group`` (one per
        ``group_size`` consecutive elements along ``axis``, for every index of
        the other axes) or ``block`` (one per ``block_shape`` tile of the last
        two axes, for every index of the others: 2-D block scaling, e.g.
        NVFP4's 16x16 or DeepSeek-V3's 128x128 weight blocks; a block format's
        tile replaces its 1-D block, so one E8M0/E4M3 scale covers the tile).
      axis: the channel axis, or the axis the groups run along; negative counts
        from the end. Checked against the array's rank at call time. Must stay
        -1 with ``granularity="block"`` (tiles span the last two axes, where a
        weight keeps both of its GEMM axes: in and out features).
      group_size: elements per group (``granularity="group"`` only), >= 1.
      block_shape: ``(rows, cols)`` of a 2-D tile over the last two axes
        (``granularity="block"`` only), each >= 1 and dividing its axis.
      scale: where the clip comes from: ``absmax``; ``percentile`` (of ``|x|``
        per scale group, or of ``x`` at ``100 - q`` and ``q`` when asymmetric);
        ``mse`` (the clip ratio in [0.3, 1] of absmax with the least
        fake-quantization error); ``kl`` (TensorRT entropy calibration, per
        tensor, symmetric); ``fixed`` (the step is ``fixed_scale``); ``learned``
        (the caller passes the step: ``fake_quant(q, x, scale=step)``);
        ``delayed`` (TransformerEngine's delayed scaling, per tensor: the clip
        is the reduced amax history of earlier steps, kept as op state by
        ``lowbit.training.qdot``; see ``lowbit.training.delayed``; called
        directly, ``fake_quant`` takes the step as ``scale=`` as for
        ``learned``); ``none`` (step 1: the bare format).
      percentile: ``q`` in (0, 100] for ``scale="percentile"``.
      scale_format: how the step is stored: ``float32``; ``e8m0`` (a power of
        two, rounded up so nothing clips); ``e4m3`` (an E4M3 value, nearest,
        under a float32 tensor-wide step ``max(step) / 448``, as NVFP4).
      symmetric: zero at code 0; ``False`` adds an integer zero point so that
        ``[min(x, 0), max(x, 0)]`` spans the integer grid (integer formats only).
      zero_point_range: ``full`` uses every code of an integer format;
        ``restricted`` drops the most negative one (int8: [-127, 127]).
      rounding: ``nearest`` (half to even), ``stochastic`` (needs a key) or
        ``toward_zero``.
      saturate: clip overflow to the largest value (``False`` follows the
        element format's own overflow; integer grids always clip).
      static: ``True`` takes the clip from calibration (``state=``) instead of
        from each call's ``x``; needs a data-driven ``scale``.
      fixed_scale: the step for ``scale="fixed"``, a positive finite number.
      kind: ``uniform`` (step times the format's grid); ``log2`` (levels
        ``step * 2^-k``, FQ-ViT, for post-softmax attention); ``twin_uniform``
        (PTQ4ViT: two uniform ranges, see ``twin_split``); ``ptf`` (FQ-ViT
        power-of-two factor: channel ``c`` of ``axis`` uses ``step * 2^a_c``,
        ``a_c`` in ``0..ptf_max_power``, for post-LayerNorm activations).
        The non-uniform kinds take an integer format for their code width.
      twin_split: ``magnitude`` (a fine step below ``2^-twin_shift`` of the
        range, a coarse step above: post-softmax) or ``sign`` (one step for
        negatives, one for positives, in a power-of-two ratio: post-GELU).
      twin_shift: the fine step is the coarse step times ``2^-twin_shift``.
      ptf_max_power: ``K``, the largest power-of-two factor exponent of ``ptf``.
      amax_history: ``scale="delayed"`` only (default 16): how many steps of
        amaxes the history keeps, 1..65536.
      amax_reduction: ``scale="delayed"`` only (default ``max``): the clip is the
        largest amax of the history (``max``) or the last step's
        (``most_recent``).
    """

    format: Any
    granularity: str = "tensor"
    axis: int = -1
    group_size: int | None = None
    block_shape: tuple[int, int] | None = None
    scale: str = "absmax"
    percentile: float = 99.99
    scale_format: str = "float32"
    symmetric: bool = True
    zero_point_range: str = "full"
    rounding: str = "nearest"
    saturate: bool = True
    static: bool = False
    fixed_scale: float | None = None
    kind: str = "uniform"
    twin_split: str = "magnitude"
    twin_shift: int = 3
    ptf_max_power: int = 3
    amax_history: int | None = None
    amax_reduction: str | None = None

    def __post_init__(self):
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
        require(self.granularity in GRANULARITIES, _OWN, "granularity", self.granularity, ", ".join(GRANULARITIES))
        check_int(_OWN, "axis", self.axis, -64, 63)
        if self.granularity == "group":
            check_int(_OWN, "group_size", self.group_size, 1)
        else:
            require(self.group_size is None, _OWN, "group_size", self.group_size, "None unless granularity='group'")
        self._check_block_shape()
        require(self.scale in SCALES, _OWN, "scale", self.scale, ", ".join(SCALES))
        p = self.percentile
        require(
            isinstance(p, (int, float, np.floating, np.integer)) and not isinstance(p, bool) and 0 < p <= 100,
            _OWN,
            "percentile",
            p,
            "a number in (0, 100]",
        )
        require(self.scale_format in SCALE_FORMATS, _OWN, "scale_format", self.scale_format, ", ".join(SCALE_FORMATS))
        check_bool(_OWN, "symmetric", self.symmetric)
        require(
            self.zero_point_range in ZERO_POINT_RANGES,
            _OWN,
            "zero_point_range",
            self.zero_point_range,
            ", ".join(ZERO_POINT_RANGES),
        )
        require(self.rounding in ROUNDINGS, _OWN, "rounding", self.rounding, ", ".join(ROUNDINGS))
        check_bool(_OWN, "saturate", self.saturate)
        check_bool(_OWN, "static", self.static)
        require(self.kind in KINDS, _OWN, "kind", self.kind, ", ".join(KINDS))
        require(self.twin_split in TWIN_SPLITS, _OWN, "twin_split", self.twin_split, ", ".join(TWIN_SPLITS))
        check_int(_OWN, "twin_shift", self.twin_shift, 1, 30)
        check_int(_OWN, "ptf_max_power", self.ptf_max_power, 1, 8)
        self._check_fixed_scale()
        self._check_delayed()
        self._check_combinations(fmt)

    def _check_delayed(self):
        """``amax_history`` / ``amax_reduction``: defaults filled in with ``scale="delayed"``, refused otherwise."""
        if self.scale != "delayed":
            for field in ("amax_history", "amax_reduction"):
                require(getattr(self, field) is None, _OWN, field, getattr(self, field), "None unless scale='delayed'")
            return
        if self.amax_history is None:
            object.__setattr__(self, "amax_history", DEFAULT_AMAX_HISTORY)
        if self.amax_reduction is None:
            object.__setattr__(self, "amax_reduction", "max")
        check_int(_OWN, "amax_history", self.amax_history, 1, 1 << 16)
        require(
            self.amax_reduction in AMAX_REDUCTIONS,
            _OWN,
            "amax_reduction",
            self.amax_reduction,
            ", ".join(AMAX_REDUCTIONS),
        )
        # One amax per tensor, a magnitude: what the history holds.
        for field, want in (("granularity", "tensor"), ("kind", "uniform"), ("symmetric", True)):
            require(
                getattr(self, field) == want,
                _OWN,
                field,
                getattr(self, field),
                f"{want!r} with scale='delayed' (the amax history holds one magnitude per tensor)",
            )

    def _check_block_shape(self):
        bs = self.block_shape
        if self.granularity != "block":
            require(bs is None, _OWN, "block_shape", bs, "None unless granularity='block'")
            return
        ok = (
            isinstance(bs, tuple)
            and len(bs) == 2
            and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= 1 << 16 for n in bs)
        )
        require(
            ok,
            _OWN,
            "block_shape",
            bs,
            "a tuple (rows, cols) of two integers in [1, 65536] with "
            "granularity='block' (1-D blocks are granularity='group')",
        )
        require(
            self.axis == -1,
            _OWN,
            "axis",
            self.axis,
            "-1 with granularity='block' (the tiles span the last two axes: move other axes there)",
        )

    def _check_fixed_scale(self):
        s = self.fixed_scale
        if self.scale != "fixed":
            require(s is None, _OWN, "fixed_scale", s, "None unless scale='fixed'")
            return
        ok = isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool)
        require(
            ok and math.isfinite(s) and s > 0,
            _OWN,
            "fixed_scale",
            s,
            "a positive finite number (the step) with scale='fixed'",
        )

    def _check_combinations(self, fmt):
        integer = isinstance(fmt, formats.IntFormat)
        if is_block(fmt):
            require(
                self.granularity in ("tensor", "block"),
                _OWN,
                "granularity",
                self.granularity,
                f"'tensor' (1-D blocks along axis) or 'block' (2-D tiles) with block format {fmt.name}",
            )
            for field, default in (
                ("scale", "absmax"),
                ("scale_format", "float32"),
                ("symmetric", True),
                ("static", False),
                ("kind", "uniform"),
            ):
                require(
                    getattr(self, field) == default,
                    _OWN,
                    field,
                    getattr(self, field),
                    f"{default!r} with block format {fmt.name} (its blocks carry their own scales)",
                )
            return
        if self.static:
            require(
                self.scale in DATA_SCALES,
                _OWN,
                "static",
                True,
                "False unless scale is data-driven (" + ", ".join(DATA_SCALES) + ")",
            )
        if self.zero_point_range == "restricted":
            require(
                integer and fmt.signed,
                _OWN,
                "zero_point_range",
                "restricted",
                "'full' unless the format is a signed integer",
            )
        if not self.symmetric:
            require(
                integer and self.kind in ("uniform", "ptf"),
                _OWN,
                "symmetric",
                False,
                "True unless kind is uniform or ptf with an integer format",
            )
        if self.scale == "kl":
            require(
                self.granularity == "tensor" and self.symmetric and self.kind == "uniform",
                _OWN,
                "scale",
                "kl",
                "kl with granularity='tensor', symmetric=True and kind='uniform' only",
            )
            require(fmt.bits <= 8, _OWN, "scale", "kl", "kl with formats of at most 8 bits (128 levels for int8)")
        if self.kind == "uniform":
            return
        require(integer, _OWN, "format", fmt, f"an IntFormat (the code width) with kind={self.kind!r}")
        if self.kind == "log2":
            require(self.rounding == "nearest", _OWN, "rounding", self.rounding, "nearest with kind='log2'")
            require(
                fmt.bits - fmt.signed >= 2,
                _OWN,
                "format",
                fmt.name,
                "a format with at least 2 magnitude bits with kind='log2'",
            )
        elif self.kind == "twin_uniform":
            if self.twin_split == "sign":
                require(fmt.signed, _OWN, "format", fmt.name, "a signed integer format with twin_split='sign'")
            require(
                fmt.bits - fmt.signed >= 2,
                _OWN,
                "format",
                fmt.name,
                "a format with at least 2 magnitude bits with kind='twin_uniform'",
            )
        else:  # ptf
            require(
                self.granularity == "channel",
                _OWN,
                "granularity",
                self.granularity,
                "channel with kind='ptf' (axis holds the channels)",
            )
            require(
                self.scale in ("absmax", "percentile"),
                _OWN,
                "scale",
                self.scale,
                "absmax or percentile with kind='ptf'",
            )

    # ----- derived, static properties -----------------------------------------------
    @property
    def signed_range(self) -> bool:
        """Whether the clip is a (min, max) pair rather than one magnitude."""
        return not self.symmetric or (self.kind == "twin_uniform" and self.twin_split == "sign")

    @property
    def int_range(self) -> tuple[int, int]:
        """(lowest, highest) integer code value of an integer grid."""
        fmt = self.format
        return fmt.min_int + (self.zero_point_range == "restricted"), fmt.max_int

    @property
    def max_level(self) -> float:
        """The grid value the clip maps to (``step = clip / max_level``)."""
        if self.kind == "log2":
            return 1.0
        if self.kind == "twin_uniform":
            return float(2**self.index_bits - 1)
        return float(self.format.max_value)

    @property
    def index_bits(self) -> int:
        """Bits of the uniform index inside one range of ``twin_uniform``."""
        return self.format.bits - 1 - (self.format.signed and self.twin_split == "magnitude")

    @property
    def bits(self) -> int:
        """Bits per element code."""
        return self.format.bits

    @property
    def pow2_step(self) -> bool:
        """Whether every step is a power of two (then x * (1/step) is exact)."""
        return self.scale_format == "e8m0" or (self.scale == "none" and self.scale_format == "float32")
