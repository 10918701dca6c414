"""Kernel dispatch by quantizer kind: fake quantization, encode to codes, decode."""

from __future__ import annotations

from lowbit import formats
from lowbit.quant import uniform, vit


def _int_grid(q) -> bool:
    return isinstance(q.format, formats.IntFormat)


def fake(q, x, p, rounding, key):
    """Fake-quantize float32 ``x`` (work layout) with parameters ``p``; float32 result."""
    if q.kind == "uniform":
        if _int_grid(q):
            return uniform.int_fake(q, x, p.step(), p.zero_point, rounding, key)
        return uniform.format_fake(q, x, p.step(), rounding, key)
    if q.kind == "ptf":
        return uniform.int_fake(q, x, vit.ptf_step(p), p.zero_point, rounding, key)
    return vit.with_nan(x, decode(q, encode(q, x, p, rounding, key), p))


def encode(q, x, p, rounding, key):
    """Codes of float32 ``x`` (work layout): ``uint8`` up to 8 bits, else ``uint16``."""
    if q.kind == "uniform":
        if _int_grid(q):
            return uniform.int_encode(q, x, p.step(), p.zero_point, rounding, key)
        return uniform.format_encode(q, x, p.step(), rounding, key)
    if q.kind == "ptf":
        return uniform.int_encode(q, x, vit.ptf_step(p), p.zero_point, rounding, key)
    if q.kind == "log2":
        return vit.log2_encode(q, x, p)
    return vit.twin_encode(q, x, p, rounding, key)


def decode(q, codes, p):
    """float32 values of ``codes`` (work layout)."""
    if q.kind == "uniform":
        if _int_grid(q):
            return uniform.int_decode(q, codes, p.step(), p.zero_point)
        return uniform.format_decode(q, codes, p.step())
    if q.kind == "ptf":
        return uniform.int_decode(q, codes, vit.ptf_step(p), p.zero_point)
    if q.kind == "log2":
        return vit.log2_decode(q, codes, p)
    return vit.twin_decode(q, codes, p)
