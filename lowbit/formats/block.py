"""Block formats: OCP MX v1.0 (MXFP8/6/4, MXINT8) and NVIDIA's NVFP4.

A block format quantizes along the last axis in blocks of ``block_size``
elements that share one scale. A last axis that is not a multiple of the block
size is padded with zeros internally (zeros change no block maximum) and the pad
is cut from every output, so no element is ever grouped with the wrong block.

MX (``kind="mx"``): the shared scale is an E8M0 power of two ``X = 2^k``, ``k``
clamped to E8M0's ``[-127, 127]``, where ``amax`` is the block's largest finite
magnitude, ``max_elem`` the element format's largest value and ``emax_elem =
floor(log2 max_elem)`` (OCP's ``emax_elem``). ``scale_mode`` picks ``k``:

* ``floor`` (the default; OCP MX v1.0, section 6.3):
  ``k = floor(log2 amax) - emax_elem``. Blocks whose largest elements round
  above ``max_elem`` saturate them.
* ``rceil`` (cuBLAS's "computing scaling and conversion factors for FP8 with
  UE8M0 scaling", TransformerEngine's MXFP8, JAX's ``jax.nn.scaled_dot_general``
  through ``jax._src.cudnn.scaled_matmul_stablehlo.quantize``, torchao's
  ``ScaleCalculationMode.RCEIL``): ``k = ceil(log2(amax / max_elem))``, the
  smallest scale with ``amax / X <= max_elem``, so no element saturates.
* ``ceil`` (torchao ``ScaleCalculationMode.CEIL``):
  ``k = ceil(log2 amax) - emax_elem``.
* ``even`` (torchao ``ScaleCalculationMode.EVEN``):
  ``k = floor(log2 r) - emax_elem`` with ``r`` = ``amax`` rounded to the
  element's fraction width ``mbits`` (integer elements: ``bits - 2``), ties away
  from zero; so ``k`` is ``floor``'s plus one exactly when amax's significand is
  at least ``2 - 2^-(mbits+1)``.

Elements are ``x / X`` rounded onto the element grid and saturated. A zero
block gets the smallest scale, 2^-127, in every mode. Where the modes differ
from the reference code:

* ``rceil``: the references round the float32 quotient up to E8M0 from its bits
  (JAX divides ``amax / max_elem``; TransformerEngine and torchao multiply by the
  float32 ``1 / max_elem``). The exact ``ceil`` above equals JAX's whenever the
  quotient is a float32 normal: a quotient of two floats rounds onto a power of
  two only when it is one. It equals the reciprocal product for every FP element
  format; for MXINT8 the product rounds amax = (127/64 + 2^-23) * 2^e down to a
  power of two, one binade too low. A quotient below 2^-126 (amax under
  max_elem * 2^-126) can round a binade lower in the references, and XLA:CPU
  flushes it to zero (code 0, saturating the block); lowbit keeps
  ``amax / X <= max_elem`` there too.
* ``ceil``, ``even``: torchao reads a float32 subnormal amax's bits as they
  are; lowbit normalises it first. Both give code 0 for every element format
  with ``emax_elem >= 1`` (all but MXINT8, which torchao lacks). torchao's
  ``even`` rounds an amax at or above ``(2 - 2^-(mbits+1)) * 2^127`` to float32
  inf and gives that block a NaN scale; here it is ``2^128``, so
  ``k = 128 - emax_elem``.

MXINT8's elements are 8-bit two's complement integers with an implicit scale
2^-6 (values k/64); like the OCP reference code (microsoft/microxcaling) the
conversion saturates symmetrically to +-127/64, so the element format is
``int8_narrow`` and code 0x80 (-2.0) is never produced (``decode`` still reads
it as -2).

NVFP4 (``kind="nvfp4"``): E2M1 elements in blocks of 16; an FP32 tensor scale
``s = amax / (448 * 6)`` over the whole array (floored at 2^-126, the smallest
float32 normal, so an all-zero or subnormal-scale tensor keeps a usable scale),
an E4M3 block scale ``bs = e4m3(amax_block / 6 / s)`` (round half to even,
saturating), and elements ``e2m1(x / (bs * s))``, round half to even and
saturating. Every ``/`` is a float32 division, evaluated left to right.

``encode`` returns ``(codes, scales)`` for MX, ``(codes, block_scales,
tensor_scale)`` for NVFP4: codes are uint8 in the element format's layout with
``x``'s shape, scales are uint8 codes (E8M0 or E4M3) shaped ``(..., nblocks)``,
the tensor scale a float32 scalar. ``decode`` takes that tuple back.

Power-of-two scaling is done with float32 multiplies by exact powers of two
built from exponent bits, never ``log2``/``exp2``: the results equal a division
by ``X`` bit for bit whenever they are float32 normals (and the registered
element grids round anything smaller to zero).

Non-finite inputs (a deliberate choice; OCP leaves conversion of specials to
the implementation):

* the block scale comes from the block's largest *finite* magnitude, so one NaN
  or inf does not wipe out its 31 neighbours;
* ``quantize``: NaN stays NaN; +-inf becomes +-(element max) * X with
  ``saturate=True``, and follows the element format's own overflow (inf, NaN,
  or max) with ``saturate=False``. Finite values always saturate: the scale is
  chosen from them, and OCP's conversion saturates elements that round above
  the element maximum;
* ``encode`` never turns a NaN into a number: an element format with a NaN
  code stores it; one without (FP6, FP4, INT8) gets a NaN block scale (E8M0
  0xFF, E4M3 0x7F) instead, which by OCP's rule decodes the whole block as
  NaN. That is the one place where ``decode(encode(x))`` and ``quantize(x)``
  differ.

float32 subnormal inputs and results follow the platform's float arithmetic
(XLA's CPU flushes them to zero), and NVFP4's divisions are exact only where
the backend's float32 division is correctly rounded (XLA:CPU; XLA:GPU's is
within 2 ulp, openxla/xla#37181).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.formats import _bits
from lowbit.formats._bits import u32
from lowbit.formats._checks import check_int, check_name, check_range, require
from lowbit.formats.integer import IntFormat
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.protocol import BuiltinFormat, Encoded
from lowbit.formats.registry import get, register

KINDS = ("mx", "nvfp4")
SCALE_MODES = ("floor", "rceil", "ceil", "even")


def _float(name: str) -> FloatFormat:
    """The registered minifloat ``name`` (as a ``FloatFormat``, which the registry's own entries are)."""
    fmt = get(name)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"{name} is registered as {fmt!r}; expected a FloatFormat")
    return fmt


E8M0 = _float("float8_e8m0fnu")
E4M3 = _float("float8_e4m3fn")
_E8M0_NAN = 0xFF
_NV_TENSOR_FLOOR = 2.0**-126  # smallest float32 normal: keeps s usable on flush-to-zero hardware


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockFormat(BuiltinFormat[tuple[jax.Array, ...]]):
    """A block-scaled format (hashable: usable as a static jit argument).

    Attributes:
      element: the element format: a radix-2 ``FloatFormat`` with a zero, or
        (MX only) a signed ``IntFormat``, read as fixed point with one integer
        bit (value = integer * 2^-(bits-2)), as OCP's MXINT8.
      block_size: elements per block along the last axis, >= 1.
      scale: the block scale's format: E8M0 (``float8_e8m0fnu``) for ``mx``, a
        radix-2 ``FloatFormat`` (E4M3 for NVFP4) for ``nvfp4``.
      kind: ``mx`` (power-of-two shared scale) or ``nvfp4`` (block scale in
        ``scale`` under an FP32 per-tensor scale).
      scale_mode: how ``mx`` rounds its E8M0 scale, one of ``SCALE_MODES``
        (``floor``, ``rceil``, ``ceil``, ``even``; the module docstring defines
        them); None means ``floor`` for ``mx``. ``nvfp4`` takes only None: its
        E4M3 block scale rounds to nearest.
      name: display name; not part of equality. Left empty, it is derived from
        the fields (with a ``_{scale_mode}`` suffix unless the mode is floor).
    """

    element: FloatFormat | IntFormat
    block_size: int = 32
    scale: FloatFormat = E8M0
    kind: str = "mx"
    scale_mode: str | None = None
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        own = "BlockFormat"
        check_name(own, self.name)
        require(isinstance(self.kind, str) and self.kind in KINDS, own, "kind", self.kind, ", ".join(KINDS))
        check_int(own, "block_size", self.block_size, 1, 2**16)
        float_ok = (
            isinstance(self.element, FloatFormat)
            and self.element.radix == 2
            and self.element.zero
            and self.element.signed
        )
        int_ok = isinstance(self.element, IntFormat) and self.element.signed and self.kind == "mx"
        require(
            float_ok or int_ok,
            own,
            "element",
            self.element,
            "a signed radix-2 FloatFormat with a zero, or a signed IntFormat (kind='mx')",
        )
        if self.kind == "mx":
            require(self.scale == E8M0, own, "scale", self.scale, "float8_e8m0fnu for kind='mx'")
            if self.scale_mode is None:  # one spelling of the default, so equal formats compare and hash equal
                object.__setattr__(self, "scale_mode", "floor")
            require(
                isinstance(self.scale_mode, str) and self.scale_mode in SCALE_MODES,
                own,
                "scale_mode",
                self.scale_mode,
                f"{', '.join(SCALE_MODES)} (or None: floor) for kind='mx'",
            )
        else:
            require(
                self.scale_mode is None,
                own,
                "scale_mode",
                self.scale_mode,
                "None for kind='nvfp4' (its E4M3 block scale rounds to nearest; scale modes round E8M0 scales)",
            )
            require(
                isinstance(self.scale, FloatFormat)
                and self.scale.radix == 2
                and self.scale.zero
                and self.scale.has_nan,
                own,
                "scale",
                self.scale,
                "a radix-2 FloatFormat with a zero and a NaN code for kind='nvfp4'",
            )
        if not self.name:
            suffix = "" if self.scale_mode in (None, "floor") else f"_{self.scale_mode}"
            object.__setattr__(self, "name", f"{self.kind}_{self.element.name}_b{self.block_size}{suffix}")

    @property
    def bits(self) -> int:
        """Bits per element code (the block scales come on top)."""
        return self.element.bits

    @property
    def element_exp(self) -> int:
        """log2 of the implicit element scale: -(bits-2) for integers, else 0."""
        return -(self.element.bits - 2) if isinstance(self.element, IntFormat) else 0

    @property
    def element_max(self) -> float:
        """Largest element value (implicit element scale included)."""
        return self.element.max_value * 2.0**self.element_exp

    @property
    def max_value(self) -> float:
        """Largest element value before the block scale: the largest of ``values`` (``element_max``)."""
        return self.element_max

    @property
    def has_nan(self) -> bool:
        """Always True: a NaN block scale (E8M0 0xFF, the scale format's NaN) decodes its block as NaN."""
        return True

    @property
    def emax(self) -> int:
        """floor(log2) of the largest element value: OCP's ``emax_elem``."""
        return int(np.floor(np.log2(self.element_max)))

    # ----- kernels ------------------------------------------------------------------
    def _quantize(
        self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None, axis: int = -1
    ) -> jax.Array:
        """Three steps, each done once: the block maxima (one reduction over ``x``), the per-block
        factors (``1/X`` and ``X`` as the two exact powers of two ``_mul_pow2`` uses, or NVFP4's
        ``d``; ``_per_block`` keeps XLA from recomputing them for every element), and one
        elementwise pass that reads them broadcast along the blocks. The arithmetic per element
        and per block is ``_mx_in`` / ``_nv_in``'s, in the same order: the same bits.

        ``axis``: where the blocks run (``lowbit.quant``'s ``Group(axis)``; the public
        functions block the last axis). Another axis is cut into blocks where it lies: on
        XLA:CPU a reduction that reads ``x`` transposed runs ~10x slower than one down its
        rows (a weight gradient's operands block along tokens, their first axis). The bits
        are those of the blocks moved last. Stochastic rounding still moves them last: its
        words are drawn over the padded blocks in that layout.

        Without stochastic rounding an axis shorter than a block is one block as it is, unpadded
        (a sequence of 17 tokens: padding would nearly double what the reduction reads); the
        zeros a pad adds change no block's maximum, so the bits are the same.
        """
        a = axis % x.ndim if x.ndim else -1  # (a scalar: _blocks says why it is refused)
        stochastic = rounding == "stochastic"
        if a not in (-1, x.ndim - 1) and stochastic:
            return jnp.moveaxis(self._quantize(jnp.moveaxis(x, a, -1), saturate, rounding, key), -1, a)
        if x.ndim and 0 < x.shape[a] < self.block_size and not stochastic:
            xb, n = x.reshape(*x.shape[:a], 1, *x.shape[a:]), x.shape[a]
        else:
            xb, n = _blocks(x, self.block_size, a)
        factors: tuple[jax.Array, ...]
        if self.kind == "mx":
            code, _ = self._mx_scale(xb, a + 1)
            a1, a2 = _per_block(*_pow2_pair(127 - code - self.element_exp))
            # _pow2_pair(code - 127 + element_exp), the inverse scale's, is (1/a2, 1/a1): two integer subtracts.
            factors = (a1, a2, _inverse_pow2(a2), _inverse_pow2(a1))
        else:
            (d,) = _per_block(self._nv_divisor(_amax_bits(xb, a + 1)[0]))
            factors = (jnp.where(d > 0, d, jnp.float32(1)), d)
        if xb.shape[a] * xb.shape[a + 1] != n and not stochastic:
            # A padded last block: the factors broadcast over x itself, so the padded copy feeds
            # the reduction alone. (Stochastic rounding draws its words over the padded blocks.)
            def spread(f: jax.Array) -> jax.Array:
                full = jnp.broadcast_to(f, xb.shape)
                return _unblock(full, n, a)

            xf = x.astype(jnp.float32)
            return self._elementwise(xf, tuple(spread(f) for f in factors), saturate, rounding, key).astype(x.dtype)
        out = self._elementwise(xb.astype(jnp.float32), factors, saturate, rounding, key)
        return _unblock(out, n, a).astype(x.dtype)

    def _elementwise(
        self, xf: jax.Array, factors: tuple[jax.Array, ...], saturate: bool, rounding: str, key: jax.Array | None
    ) -> jax.Array:
        """The per-element pass of ``_quantize``: float32 ``xf`` and the per-block factors broadcast to it."""
        if self.kind == "mx":
            a1, a2, b1, b2 = factors  # x / X = x * a1 * a2 and q * X = q * b1 * b2, as _mul_pow2
            y = self._saturate_finite(xf * a1 * a2, saturate)
            return self.element._quantize(y, saturate, rounding, key) * b1 * b2
        d_safe, d = factors
        y = self._saturate_finite(_div(xf, d_safe), saturate)
        return self.element._quantize(y, saturate, rounding, key) * d

    def _encode(self, x: jax.Array, saturate: bool, rounding: str, key: jax.Array | None) -> tuple[jax.Array, ...]:
        xb, n = _blocks(x, self.block_size)
        no_nan_code = not self.element.has_nan
        if self.kind == "mx":
            code, has_nan = self._mx_scale(xb)
            codes = self.element._encode(self._mx_in(xb, code, saturate), saturate, rounding, key)
            if no_nan_code:
                code = jnp.where(has_nan, _E8M0_NAN, code)
            return _unblock(codes, n), code[..., 0].astype(jnp.uint8)
        y, d, (bs_code, s, has_nan) = self._nv_in(xb, saturate)
        # A flushed block (bs * s == 0) decodes to zeros whatever its codes; store zeros.
        y = jnp.where(d > 0, y, jnp.where(jnp.isfinite(y), jnp.float32(0), y))
        codes = self.element._encode(y, saturate, rounding, key)
        if no_nan_code:
            bs_code = jnp.where(has_nan, self.scale.nan_code(), bs_code)
        return _unblock(codes, n), bs_code[..., 0].astype(self.scale.code_dtype), s

    def _decode(self, encoded: Encoded, dtype: np.dtype[np.floating]) -> jax.Array:
        parts = "(codes, scales)" if self.kind == "mx" else "(codes, block_scales, tensor_scale)"
        if not isinstance(encoded, tuple) or len(encoded) != parts.count(",") + 1:
            raise ValueError(f"{self.name}: decode takes what encode returned, {parts}")
        codes, scales = encoded[0], encoded[1]
        if not jnp.issubdtype(scales.dtype, jnp.integer):
            raise TypeError(f"{self.name}: scales have dtype {scales.dtype}; allowed: integer codes (uint8)")
        if codes.ndim == 0:
            raise ValueError(f"{self.name}: codes must have at least one axis (blocks run along the last)")
        n = codes.shape[-1]
        nb = -(-n // self.block_size)
        if scales.shape != (*codes.shape[:-1], nb):
            raise ValueError(
                f"{self.name}: scales have shape {scales.shape}; codes of shape {codes.shape} "
                f"need {(*codes.shape[:-1], nb)} (one per block of {self.block_size})"
            )
        smax = 2**self.scale.bits - 1
        check_range(
            scales, 0, smax, "scales", f"{self.scale.name} codes 0 .. {smax} (under jit only the low bits are read)"
        )
        cb, _ = _blocks(codes, self.block_size)
        q = self.element._decode(cb, jnp.float32)
        if self.kind == "mx":
            code = (scales.astype(jnp.int32) & _E8M0_NAN)[..., None]  # the low 8 bits (traced codes)
            out = _mul_pow2(q, jnp.minimum(code, 254) - 127 + self.element_exp)
            out = jnp.where(code >= _E8M0_NAN, jnp.float32(jnp.nan), out)
        else:
            d = self.scale._decode(scales, jnp.float32)[..., None] * jnp.asarray(encoded[2], jnp.float32)
            out = q * d
        return _unblock(out, n).astype(dtype)

    def _values(self) -> np.ndarray:
        return (self.element._values() * np.float32(2.0**self.element_exp)).astype(np.float32)

    # ----- MX ---------------------------------------------------------------------
    @property
    def _scale_carry(self) -> int:
        """What ``_mx_scale`` adds to amax's 23-bit fraction ``f``: a carry out of it rounds ``k`` up.

        floor never carries; ceil carries any ``f > 0``; rceil carries ``f``
        above max_elem's fraction (there ``amax / 2^(floor(log2 amax) - emax)``
        exceeds max_elem); even adds half an ulp of an ``mbits`` fraction, so
        it carries from ``2 - 2^-(mbits+1)`` up, ties away from zero (torchao's
        own bit trick).
        """
        full = (1 << _bits.MANT) - 1
        max_fraction = int(np.float32(self.element_max).view(np.uint32)) & full
        mbits = self.element.mbits if isinstance(self.element, FloatFormat) else -self.element_exp
        carries = {"floor": 0, "ceil": full, "rceil": full - max_fraction, "even": 1 << (_bits.MANT - 1 - mbits)}
        return carries[str(self.scale_mode)]

    def _mx_scale(self, xb: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
        """Per block (its elements along ``axis`` of ``xb``): the E8M0 scale code (int32, kept dims) and
        whether the block holds a NaN.

        With ``amax = (1 + f / 2^23) * 2^e``, every mode is ``k = e - emax``
        plus one where ``f + _scale_carry`` carries into the exponent field, so
        the code is that field minus ``emax`` (the 127 biases cancel). A
        subnormal ``amax`` is first shifted up to a leading 1 (the shift comes
        off its exponent), so ``e`` and ``f`` are exact for it too. Codes clamp
        to E8M0's [0, 254] (2^-127 .. 2^127); a zero block gets 0.
        """
        amax_bits, has_nan = _amax_bits(xb, axis)
        shift = jnp.maximum(lax.clz(amax_bits).astype(jnp.int32) - (31 - _bits.MANT), 0)
        normal = lax.shift_left(amax_bits, shift.astype(jnp.uint32))
        field = lax.shift_right_logical(normal + u32(self._scale_carry), u32(_bits.MANT)).astype(jnp.int32)
        code = jnp.clip(field - shift - self.emax, 0, 254)
        # Zero has no exponent; the clip alone would lift it for elements with emax < -24.
        return jnp.where(amax_bits == 0, 0, code), has_nan

    def _mx_in(self, xb: jax.Array, code: jax.Array, saturate: bool) -> jax.Array:
        """Element inputs ``x / X`` (integer elements: on their integer grid)."""
        return self._saturate_finite(_mul_pow2(xb.astype(jnp.float32), 127 - code - self.element_exp), saturate)

    def _saturate_finite(self, y: jax.Array, saturate: bool) -> jax.Array:
        """Clip finite element inputs to the element max when the element kernel would not.

        Finite values saturate whatever ``saturate`` says (the module docstring
        says why); only +-inf may take the element format's own overflow.
        """
        if saturate or not self.element.has_nan:
            return y
        vmax = jnp.float32(self.element.max_value)
        return jnp.where(jnp.isinf(y), y, jnp.clip(y, -vmax, vmax))

    # ----- NVFP4 ------------------------------------------------------------------
    def _nv_in(
        self, xb: jax.Array, saturate: bool
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """Element inputs ``x / d``, the per-block divisor ``d = bs * s`` and ``(bs codes, s, has NaN)``.

        ``s`` is floored at the smallest float32 normal: below it (a tensor with
        amax < 2^-126 * 2688, or all zeros) the formula's ``s`` is a subnormal
        that flush-to-zero hardware reads as 0. A block whose ``bs * s`` is 0 is
        flushed: its elements divide by 1 and are multiplied back by 0.
        """
        xf = xb.astype(jnp.float32)
        amax_bits, has_nan = _amax_bits(xb)
        bsf, s = self._nv_block_scale(amax_bits)
        d = self._nv_d(bsf, s)
        bs_code = self.scale._encode(bsf, True, "nearest", None)
        y = self._saturate_finite(_div(xf, jnp.where(d > 0, d, jnp.float32(1))), saturate)
        return y, d, (bs_code, s, has_nan)

    def _nv_divisor(self, amax_bits: jax.Array) -> jax.Array:
        """The per-block divisor ``d = bs * s`` from the blocks' amax bits."""
        return self._nv_d(*self._nv_block_scale(amax_bits))

    def _nv_d(self, bsf: jax.Array, s: jax.Array) -> jax.Array:
        """``d = bs * s``: the block scale rounded to the scale format, times the tensor scale."""
        d: jax.Array = self.scale._quantize(bsf, True, "nearest", None) * s
        return d

    def _nv_block_scale(self, amax_bits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The unrounded block scales ``amax_block / 6 / s`` and the tensor scale ``s``."""
        amax_b = _bits.from_bits(amax_bits)
        # Reduced from the block maxima (behind a bitcast, which XLA does not fold into
        # one reduction over x): the tensor amax costs no extra pass over x.
        amax = jnp.max(amax_b, initial=jnp.float32(0))
        s = jnp.maximum(
            _div(amax, jnp.float32(self.scale.max_value * self.element.max_value)), jnp.float32(_NV_TENSOR_FLOOR)
        )
        # The barrier keeps XLA from merging (a / b) / s into a / (b * s), another rounding.
        per_elem = _div(amax_b, jnp.float32(self.element.max_value))
        # jax 0.10 leaves lax.optimization_barrier unannotated (its signature is (operand, /)).
        bsf = _div(lax.optimization_barrier(per_elem), s)  # type: ignore[no-untyped-call]
        return bsf, s


def _blocks(x: jax.Array, block_size: int, axis: int = -1) -> tuple[jax.Array, int]:
    """``x`` with its ``axis`` split into (nblocks, block_size), zero-padded at that axis's end; its length."""
    if x.ndim == 0:
        raise ValueError(
            "x has shape (); allowed: block formats need an array with at least one axis (blocks run along the last)"
        )
    a = axis % x.ndim
    n = x.shape[a]
    pad = -n % block_size
    if pad:
        x = jnp.pad(x, [(0, pad) if d == a else (0, 0) for d in range(x.ndim)])
    return x.reshape(*x.shape[:a], (n + pad) // block_size, block_size, *x.shape[a + 1 :]), n


def _unblock(xb: jax.Array, n: int, axis: int = -1) -> jax.Array:
    """Inverse of ``_blocks`` (``axis`` of the unblocked array): merge the block axes and cut the pad."""
    a = axis % (xb.ndim - 1)
    x = xb.reshape(*xb.shape[:a], xb.shape[a] * xb.shape[a + 1], *xb.shape[a + 2 :])
    return x if x.shape[a] == n else lax.slice_in_dim(x, 0, n, axis=a)


def _mul_pow2(v: jax.Array, k: jax.Array) -> jax.Array:
    """``v * 2^k`` for int32 ``k`` in [-252, 252], exact whenever the result is a float32 normal.

    Two factors because one float32 normal power of two reaches only
    [-126, 127] and E8M0's scales span [-127, 127] (plus the MXINT8 shift).
    Both factors have the sign of ``k``, so the partial product lies between
    ``v`` and the result and is a normal whenever the result is.
    """
    half = lax.shift_right_arithmetic(k, jnp.int32(1))
    return v * _bits.pow2(half) * _bits.pow2(k - half)


def _amax_bits(xb: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Per block (its elements along ``axis``, kept): the float32 bits of the largest finite magnitude, and
    whether a NaN is there.

    The integer max of non-negative float32 bit patterns is their float max, and
    integer compares see subnormals that flush-to-zero float compares would not.
    """
    abits = _bits.to_bits(xb.astype(jnp.float32)) & u32(_bits.ABS)
    finite = abits < u32(_bits.INF_BITS)
    amax_bits = jnp.max(jnp.where(finite, abits, u32(0)), axis=axis, keepdims=True)
    return amax_bits, jnp.any(abits > u32(_bits.INF_BITS), axis=axis, keepdims=True)


def _per_block(*factors: jax.Array) -> tuple[jax.Array, ...]:
    """The per-block float32 ``factors``, computed once per block (the same values, bit for bit).

    XLA fuses cheap per-block arithmetic into the elementwise pass that
    broadcasts it, and a loop fusion evaluates every operand per element: the
    scale's bit manipulation would run ``block_size`` times per block.
    ``optimization_barrier`` does not stop that (XLA removes barriers before
    fusion); an integer remainder does, being one of the ops XLA will not
    duplicate into a consumer that reuses its elements. ``bits % 0xFFFFFFFF`` is
    ``bits`` for every pattern but 0xFFFFFFFF (a negative NaN, which no factor is).
    """
    return tuple(_bits.from_bits(lax.rem(_bits.to_bits(f), u32(0xFFFFFFFF))) for f in factors)


def _inverse_pow2(p: jax.Array) -> jax.Array:
    """``1 / p`` for a float32 power of two ``p = 2^e``, ``e`` in [-126, 126]: exact, from its exponent field."""
    return _bits.from_bits(u32(254 << _bits.MANT) - _bits.to_bits(p))


def _pow2_pair(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two float32 factors of ``_mul_pow2(v, k)``: ``v * a * b`` is ``_mul_pow2(v, k)``."""
    half = lax.shift_right_arithmetic(k, jnp.int32(1))
    return _bits.pow2(half), _bits.pow2(k - half)


def _div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b``, correctly rounded where the backend's division is (XLA:CPU).

    XLA's algebraic simplifier rewrites ``a / constant`` and ``a / broadcast(b)``
    into ``a * (1 / b)``, which is off by an ulp for about a third of inputs. A
    divisor that also depends on ``a`` (1 where ``a`` is NaN, which divides to
    NaN either way) is neither, so the true division stays.
    """
    return a / jnp.where(jnp.isnan(a), jnp.ones_like(b), b)


def with_scale_mode(fmt: BlockFormat | str, scale_mode: str) -> BlockFormat:
    """An MX format with another E8M0 scale mode, named after it.

    Example: ``with_scale_mode("mxfp8_e4m3", "rceil")`` is MXFP8 E4M3 with
    cuBLAS / TransformerEngine / JAX scales, named ``mxfp8_e4m3_rceil``.
    ``BlockFormat(..., scale_mode=...)`` and ``dataclasses.replace`` build the
    same format (``replace`` keeps the old display name).

    Args:
      fmt: an MX ``BlockFormat`` or the registered name of one.
      scale_mode: one of ``SCALE_MODES``.

    Returns:
      ``fmt`` with ``scale_mode``, named ``{base}_{scale_mode}`` (``{base}``
      for floor), where ``{base}`` is ``fmt``'s name without its own mode suffix.

    Raises:
      TypeError: ``fmt`` is not a block format.
      ValueError: an unknown name, or ``scale_mode`` is not one of
        ``SCALE_MODES`` or ``fmt`` is not an MX format (naming the field).
    """
    found = get(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(found, BlockFormat):
        raise TypeError(f"with_scale_mode fmt={found!r} is invalid; allowed: an MX BlockFormat or its name")
    suffix = f"_{found.scale_mode}"
    base = found.name[: -len(suffix)] if found.scale_mode != "floor" and found.name.endswith(suffix) else found.name
    moded = dataclasses.replace(found, scale_mode=scale_mode)  # validates scale_mode (None reads as floor)
    return dataclasses.replace(moded, name=base if moded.scale_mode == "floor" else f"{base}_{moded.scale_mode}")


def _mx(name: str, element: FloatFormat | IntFormat) -> BlockFormat:
    return BlockFormat(element=element, block_size=32, scale=E8M0, kind="mx", name=name)


MX_FORMATS = (
    _mx("mxfp8_e4m3", _float("float8_e4m3fn")),
    _mx("mxfp8_e5m2", _float("float8_e5m2")),
    _mx("mxfp6_e3m2", _float("float6_e3m2fn")),
    _mx("mxfp6_e2m3", _float("float6_e2m3fn")),
    _mx("mxfp4_e2m1", _float("float4_e2m1fn")),
    _mx("mxint8", IntFormat(bits=8, narrow=True)),
)
NVFP4 = BlockFormat(element=_float("float4_e2m1fn"), block_size=16, scale=E4M3, kind="nvfp4", name="nvfp4")

for _fmt in (*MX_FORMATS, NVFP4):
    register(_fmt.name, _fmt)
