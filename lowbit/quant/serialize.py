"""A ``Quantizer`` as JSON-ready data and back (what a packed model's manifest stores; no pickle).

``to_dict`` writes the format by its registry name and every other part
(granularity, scale source, grid kind) as ``{"type": class name, field: value}``;
``from_dict`` rebuilds the quantizer from a fixed set of classes, each checking
its own fields as at construction, so reading a manifest runs no code from it.
A quantizer that this cannot represent (a user's or modified format, a
non-scalar field) is refused when written, never saved approximately.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowbit import formats
from lowbit.quant.granularity import Block, Channel, Group, Tensor
from lowbit.quant.kinds import PTF, Log2, Twin, Uniform
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.sources import KL, MSE, Absmax, Delayed, Fixed, Learned, Percentile

__all__ = ["from_dict", "to_dict"]

_PARTS: dict[str, dict[str, type]] = {
    "granularity": {c.__name__: c for c in (Tensor, Channel, Group, Block)},
    "scale": {c.__name__: c for c in (Absmax, Percentile, MSE, KL, Fixed, Learned, Delayed)},
    "kind": {c.__name__: c for c in (Uniform, Log2, Twin, PTF)},
}
_SCALARS = ("scale_format", "rounding", "saturate")
_KEYS = {"format", *_PARTS, *_SCALARS}


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _part(field: str, part: object) -> dict[str, Any]:
    if type(part).__name__ not in _PARTS[field] or not dataclasses.is_dataclass(part):
        raise ValueError(f"Quantizer.{field}={part!r} cannot be saved; allowed: {', '.join(_PARTS[field])}")
    out: dict[str, Any] = {"type": type(part).__name__}
    for f in dataclasses.fields(part):
        if not f.init:
            continue
        value = getattr(part, f.name)
        if isinstance(value, tuple) and all(_scalar(v) for v in value):
            value = list(value)
        elif not _scalar(value):
            raise ValueError(f"Quantizer.{field}.{f.name}={value!r} cannot be saved; allowed: numbers, strings, tuples")
        out[f.name] = value
    return out


def to_dict(q: Quantizer) -> dict[str, Any]:
    """``q`` as JSON-ready data (``from_dict(to_dict(q)) == q``).

    Raises:
      TypeError: ``q`` is not a ``Quantizer``.
      ValueError: a format that is not the registered one of its name (a
        user's, or a registered one modified), or a part this cannot represent.
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"quantizer has type {type(q).__name__}; allowed: a lowbit.quant.Quantizer")
    name = getattr(q.format, "name", None)
    try:
        registered = formats.get(name) if isinstance(name, str) else None
    except ValueError:
        registered = None
    if registered != q.format:
        raise ValueError(
            f"Quantizer.format={q.format!r} cannot be saved; allowed: a registered format, unmodified "
            "(lowbit.formats.names())"
        )
    out: dict[str, Any] = {"format": name}
    for field in _PARTS:
        out[field] = _part(field, getattr(q, field))
    for field in _SCALARS:
        out[field] = getattr(q, field)
    if from_dict(out) != q:
        raise ValueError(f"quantizer {q} cannot be saved: it does not survive the round trip through data")
    return out


def _from_part(field: str, data: object) -> Any:
    if not isinstance(data, dict) or data.get("type") not in _PARTS[field]:
        kind = data.get("type") if isinstance(data, dict) else data
        raise ValueError(f"quantizer.{field}.type={kind!r} is invalid; allowed: {', '.join(_PARTS[field])}")
    cls = _PARTS[field][data["type"]]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key == "type":
            continue
        if key not in names:
            raise ValueError(f"quantizer.{field}.{key} is invalid; allowed fields of {cls.__name__}: {sorted(names)}")
        if isinstance(value, list):
            value = tuple(value)
        if not (_scalar(value) or (isinstance(value, tuple) and all(_scalar(v) for v in value))):
            raise ValueError(f"quantizer.{field}.{key}={value!r} is invalid; allowed: a number, string or list")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"quantizer.{field}: {e}") from None


def from_dict(data: object) -> Quantizer:
    """The ``Quantizer`` that ``to_dict`` wrote.

    Raises:
      ValueError: a missing or unknown key, an unknown part type or format, or
        a field value the part refuses (each named).
    """
    if not isinstance(data, dict):
        raise ValueError(f"quantizer={data!r} is invalid; allowed: a dict from lowbit.quant.serialize.to_dict")
    if set(data) != _KEYS:
        missing, extra = sorted(_KEYS - set(data)), sorted(set(data) - _KEYS)
        raise ValueError(f"quantizer has missing keys {missing} and unknown keys {extra}; allowed: {sorted(_KEYS)}")
    if not isinstance(data["format"], str):
        raise ValueError(f"quantizer.format={data['format']!r} is invalid; allowed: a registered format name")
    for field in _SCALARS:
        want = bool if field == "saturate" else str
        if not isinstance(data[field], want):
            raise ValueError(f"quantizer.{field}={data[field]!r} is invalid; allowed: a {want.__name__}")
    try:
        fmt = formats.get(data["format"])
    except ValueError as e:
        raise ValueError(f"quantizer.format: {e}") from None
    parts = {field: _from_part(field, data[field]) for field in _PARTS}
    try:
        return Quantizer(format=fmt, **parts, **{f: data[f] for f in _SCALARS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"quantizer: {e}") from None
