"""Where the scales sit: the granularity of a quantizer applied to one shape."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Layout:
    """A quantizer's granularity on one array shape.

    Attributes:
      shape: the logical shape of ``x``.
      work: the shape the kernels see; ``shape`` itself, except that per-group
        quantization splits ``axis`` into ``(groups, group_size)``.
      reduce: axes of ``work`` that share one scale.
      axis: the channel axis (or the groups' axis) in ``work``; None per tensor.
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
        raise ValueError(f"Quantizer.axis={axis} is out of range for an array of rank {ndim}; "
                         f"allowed: an integer in [{-ndim}, {ndim - 1}]")
    return axis % ndim


def layout(q, shape) -> Layout:
    """The layout of quantizer ``q`` on ``shape``.

    Raises:
      ValueError: ``q.axis`` out of range, or a group size that does not divide
        the axis.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if q.granularity == "tensor":
        return Layout(shape, shape, tuple(range(ndim)), None)
    a = normalize_axis(q.axis, ndim)
    if q.granularity == "channel":
        return Layout(shape, shape, tuple(i for i in range(ndim) if i != a), a)
    n, g = shape[a], q.group_size
    if n % g:
        raise ValueError(f"Quantizer.group_size={g} does not divide axis {q.axis} of shape {shape}; "
                         f"allowed: a divisor of {n}")
    work = shape[:a] + (n // g, g) + shape[a + 1:]
    return Layout(shape, work, (a + 1,), a)
