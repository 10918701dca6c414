"""ViT activation quantizers: log2 (FQ-ViT), twin uniform (PTQ4ViT), power-of-two factor (FQ-ViT).

Their codes live in an integer format's width (sign at bit ``bits-1`` when the
format is signed, as everywhere in lowbit). Fake quantization is
``decode(encode(x))`` with NaN passed through, so the two agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from lowbit.formats import _bits
from lowbit.formats._bits import u32
from lowbit.quant import _arith
from lowbit.quant.uniform import int_fake, scaled

if TYPE_CHECKING:
    from lowbit.quant.kinds import PTF, Twin
    from lowbit.quant.params import QParams
    from lowbit.quant.quantizer import Quantizer

# Mantissa field of float32(sqrt(2)) = 1.41421354 < sqrt(2): a mantissa above it is above sqrt(2).
_SQRT2_MANT = 0x3504F3
_LOG2_KMAX = -_arith.POW2_MIN  # 2^-k beyond float32 normals rounds to zero


def _sign_code(q: Quantizer, neg: jax.Array, mag: jax.Array) -> jax.Array:
    """Attach the sign bit (signed formats; never to a zero magnitude)."""
    if not q.format.signed:
        return mag.astype(q.format.code_dtype)
    sign = jnp.where(neg & (mag != 0), 1 << (q.format.bits - 1), 0)
    return (mag | sign).astype(q.format.code_dtype)


def _split_code(q: Quantizer, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative, magnitude code) of sign-magnitude codes."""
    c = codes.astype(jnp.int32)
    if not q.format.signed:
        return jnp.zeros(c.shape, bool), c
    top = 1 << (q.format.bits - 1)
    return (c & top) != 0, c & (top - 1)


def _signed(neg: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.where(neg, -v, v)


def _exponent(p: QParams) -> jax.Array:
    """``p``'s power-of-two factors: the parameters of ``twin`` and ``ptf`` always carry them."""
    assert p.exponent is not None, "twin and ptf parameters carry an exponent"
    return p.exponent


def with_nan(x: jax.Array, y: jax.Array) -> jax.Array:
    """``y``, but NaN where ``x`` is NaN (codes cannot hold NaN)."""
    return jnp.where(jnp.isnan(x), x, y)


# ----- log2: levels step * 2^-k, k = 0 .. 2^b - 2, and zero ----------------------------
def log2_encode(q: Quantizer, x: jax.Array, p: QParams) -> jax.Array:
    """Magnitude code 0 is zero, code ``c >= 1`` is ``step * 2^-(c-1)``.

    ``k = round(-log2 a)`` of ``a = |x| / step``, from the exponent bits: with
    ``a = m * 2^e`` (``1 <= m < 2``), ``k = -e`` if ``m < sqrt(2)`` else
    ``-e - 1`` (the geometric midpoint). ``a >= 1`` saturates at ``k = 0``;
    ``k`` beyond the last level rounds to zero.
    """
    a = jnp.abs(scaled(q, x, p.step()))
    up = (_bits.to_bits(a) & u32(_arith.MANT_MASK)) > u32(_SQRT2_MANT)
    k = jnp.maximum(-(_bits.exponent(a) + up.astype(jnp.int32)), 0)
    kmax = min(2 ** (q.format.bits - q.format.signed) - 2, _LOG2_KMAX)
    mag = jnp.where(k > kmax, 0, k + 1)
    return _sign_code(q, x < 0, mag)


def log2_decode(q: Quantizer, codes: jax.Array, p: QParams) -> jax.Array:
    neg, mag = _split_code(q, codes)
    v = jnp.where(mag == 0, jnp.float32(0), _arith.pow2(1 - mag))
    return _signed(neg, v * p.step())


# ----- twin uniform --------------------------------------------------------------------
def _twin_steps(p: QParams) -> tuple[jax.Array, jax.Array]:
    """(coarse step, fine step = coarse * 2^-exponent)."""
    coarse = p.step()
    return coarse, coarse * _arith.pow2(-_exponent(p))


def twin_encode(q: Quantizer, kind: Twin, x: jax.Array, p: QParams, rounding: str, key: jax.Array | None) -> jax.Array:
    """Codes ``[sign] [range] index``.

    ``magnitude``: range bit 0 is the fine step (used while the rounded index
    fits), 1 the coarse step; every value goes to the nearest level of the two
    grids. ``sign``: the sign bit picks the negative (fine) or positive
    (coarse) step and the rest is the index.
    """
    nb = kind.index_bits(q)
    top = 2**nb - 1
    rbits = _arith.random_bits(key, x.shape)
    coarse, fine = _twin_steps(p)
    neg = x < 0
    if kind.split == "sign":
        n = _arith.round_int(_arith.div(jnp.abs(x), jnp.where(neg, fine, coarse)), rounding, rbits)
        mag = jnp.minimum(n, jnp.float32(top)).astype(jnp.int32)
        return _sign_code(q, neg, mag)
    t = _arith.div(jnp.abs(x), coarse)
    nf = _arith.round_int(t * _arith.pow2(_exponent(p)), rounding, rbits)
    nc = jnp.minimum(_arith.round_int(t, rounding, rbits), jnp.float32(top))
    in_fine = nf <= jnp.float32(top)
    mag = jnp.where(in_fine, nf, nc).astype(jnp.int32) | jnp.where(in_fine, 0, 1 << nb)
    return _sign_code(q, neg, mag)


def twin_decode(q: Quantizer, kind: Twin, codes: jax.Array, p: QParams) -> jax.Array:
    neg, mag = _split_code(q, codes)
    coarse, fine = _twin_steps(p)
    nb = kind.index_bits(q)
    idx = (mag & (2**nb - 1)).astype(jnp.float32)
    if kind.split == "sign":
        return _signed(neg, idx * jnp.where(neg, fine, coarse))
    return _signed(neg, idx * jnp.where((mag >> nb) != 0, coarse, fine))


# ----- PTF: choose each channel's power-of-two factor ----------------------------------
def ptf_search(q: Quantizer, kind: PTF, x: jax.Array, reduce: tuple[int, ...]) -> Callable[[QParams], jax.Array]:
    """``params -> exponent``: per channel, the factor ``a`` in 0..K with the least squared error.

    FQ-ViT: ``argmin_a ||x_c - Q(x_c; s * 2^a, zp)||^2`` over the channel's
    data; ties go to the smaller factor (the finer step).
    """
    finite = jnp.isfinite(x)

    def choose(p: QParams) -> jax.Array:
        errs = []
        for a in range(kind.max_power + 1):
            y = int_fake(q, x, p.step() * jnp.float32(2.0**a), p.zero_point, "nearest", None)
            d = jnp.where(finite, y - x, jnp.float32(0))
            errs.append(jnp.sum(d * d, axis=reduce, keepdims=True))
        return jnp.argmin(jnp.stack(errs), axis=0).astype(jnp.int32)

    return choose


def ptf_step(p: QParams) -> jax.Array:
    """Per-channel step ``s * 2^exponent`` (exact)."""
    return p.step() * _arith.pow2(_exponent(p))
