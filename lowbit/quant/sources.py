"""Where a quantizer's clip (and so its step) comes from: the scale sources.

Data-driven sources (``Absmax``, ``Percentile``, ``MSE``, ``KL``) read the clip
from each call's ``x``, or with ``static=True`` from calibration (``state=``).
``Fixed`` is a constant step; ``Learned`` and ``Delayed`` take the step from
the caller (``scale=``): a trained parameter, or TransformerEngine's delayed
scaling from an amax history kept as op state by ``lowbit.training.qdot``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import jax
import numpy as np

from lowbit.formats._checks import check_bool, check_int, require
from lowbit.quant import scales
from lowbit.quant.granularity import Tensor

if TYPE_CHECKING:
    from lowbit.quant.quantizer import Quantizer
    from lowbit.quant.scales import Clip

AMAX_REDUCTIONS = ("max", "most_recent")  # how Delayed reads its amax history
DEFAULT_AMAX_HISTORY = 16


def _number(value: object) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


class _Source:
    """What every source answers: whether its clip comes from ``x`` (``data``), whether the
    caller passes the step (``given``, as ``scale=``), and what it needs of its quantizer."""

    data: ClassVar[bool] = False
    given: ClassVar[bool] = False
    static: ClassVar[bool] = False

    def check(self, q: Quantizer) -> None:
        pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Data(_Source):
    """A data-driven source; ``static=True`` takes the clip from calibration instead of each call's ``x``."""

    static: bool = False  # type: ignore[misc]  # a field here, a class constant on the other sources
    data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_bool(type(self).__name__, "static", self.static)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Absmax(_Data):
    """The largest finite magnitude per scale group (min and max for a signed range)."""

    def clip(self, q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
        return scales.absmax(q, x, reduce)

    def __str__(self) -> str:
        return "absmax" + " (static)" * self.static


@dataclasses.dataclass(frozen=True, kw_only=True)
class Percentile(_Data):
    """The ``q``-th percentile of ``|x|`` per scale group (of ``x`` at ``100 - q`` and ``q`` for a signed range)."""

    q: float = 99.99

    def __post_init__(self) -> None:
        super().__post_init__()
        require(_number(self.q) and 0 < self.q <= 100, "Percentile", "q", self.q, "a number in (0, 100]")
        object.__setattr__(self, "q", float(self.q))

    def clip(self, q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
        return scales.percentile(q, x, reduce, self.q)

    def __str__(self) -> str:
        return f"percentile({self.q:g})" + " (static)" * self.static


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSE(_Data):
    """The clip ratio in [0.3, 1] of absmax with the least fake-quantization error."""

    def clip(self, q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
        return scales.mse(q, x, reduce)

    def __str__(self) -> str:
        return "mse" + " (static)" * self.static


@dataclasses.dataclass(frozen=True, kw_only=True)
class KL(_Data):
    """TensorRT entropy calibration: per tensor, symmetric, formats of at most 8 bits."""

    def check(self, q: Quantizer) -> None:
        require(
            isinstance(q.granularity, Tensor) and not q.signed_range and q.kind.name == "uniform",
            "Quantizer",
            "scale",
            self,
            "KL() with granularity Tensor() and a symmetric Uniform() kind only",
        )
        require(q.format.bits <= 8, "Quantizer", "scale", self, "KL() with formats of at most 8 bits")

    def clip(self, q: Quantizer, x: jax.Array, reduce: tuple[int, ...]) -> Clip:
        return scales.kl(q, x, reduce)

    def __str__(self) -> str:
        return "kl" + " (static)" * self.static


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fixed(_Source):
    """A constant step: ``x`` is quantized as ``Q(x / step) * step`` (``Fixed(step=1.0)`` is the bare format)."""

    step: float = 1.0

    def __post_init__(self) -> None:
        s = self.step
        require(
            _number(s) and math.isfinite(s) and s > 0,
            "Fixed",
            "step",
            s,
            "a positive finite number",
        )
        object.__setattr__(self, "step", float(s))

    @property
    def pow2(self) -> bool:
        """Whether the step is a power of two (then ``x * (1 / step)`` is exact)."""
        return math.frexp(self.step)[0] == 0.5

    def __str__(self) -> str:
        return f"fixed({self.step:g})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Learned(_Source):
    """The caller passes the step: ``fake_quant(q, x, scale=step)`` (LSQ, PACT, SAWB, GradScale...)."""

    given: ClassVar[bool] = True

    def __str__(self) -> str:
        return "learned"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Delayed(_Source):
    """TransformerEngine's delayed scaling, per tensor: the clip is the reduced amax history of earlier steps.

    ``lowbit.training.qdot`` keeps the history as op state (see
    ``lowbit.training.delayed``); called directly, ``fake_quant`` takes the
    step as ``scale=``, as for ``Learned``.

    Attributes:
      history: steps of amaxes kept, 1..65536.
      reduction: the clip is the largest amax of the history (``max``) or the
        last step's (``most_recent``).
    """

    history: int = DEFAULT_AMAX_HISTORY
    reduction: str = "max"
    given: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("Delayed", "history", self.history, 1, 1 << 16)
        object.__setattr__(self, "history", int(self.history))
        require(self.reduction in AMAX_REDUCTIONS, "Delayed", "reduction", self.reduction, ", ".join(AMAX_REDUCTIONS))

    def check(self, q: Quantizer) -> None:
        # One amax per tensor, a magnitude: what the history holds.
        require(
            isinstance(q.granularity, Tensor) and q.kind.name == "uniform" and not q.signed_range,
            "Quantizer",
            "scale",
            self,
            "Delayed() with granularity Tensor() and a symmetric Uniform() kind (the history holds one "
            "magnitude per tensor)",
        )

    def __str__(self) -> str:
        return f"delayed({self.reduction}, {self.history})"


DataScale = Absmax | Percentile | MSE | KL
Scale = DataScale | Fixed | Learned | Delayed
SCALES = (Absmax, Percentile, MSE, KL, Fixed, Learned, Delayed)
DATA_SCALES = (Absmax, Percentile, MSE, KL)  # the sources a static quantizer calibrates
