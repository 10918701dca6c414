"""Narrow accumulators for dot products: chunked partial sums rounded to a format, promoted to a wider one.

Tensor cores do not accumulate exactly. The DeepSeek-V3 report measured about
14 bits of accumulation precision in H800 FP8 GEMMs and promotes the partial
sums to FP32 every 128 elements of K; Wang et al. 2018 ("Training deep neural
networks with 8-bit floating point numbers") accumulate in FP16 in chunks for
the same reason. ``accumulated_dot_general`` computes ``lax.dot_general``'s
result the way such an accumulator would, so a training run can be emulated
with it on any backend.

The model, for each output element, with ``p_k = f32(lhs_k) * f32(rhs_k)`` the
products along the (flattened) contraction axis ``K`` (int32 products for an
integer accumulator):

1. ``K`` splits into chunks of ``chunk`` consecutive elements. A chunk's sum
   ``c`` is one float32 (int32) dot, in XLA's order: it stands for the wide
   adder tree that sums one tensor-core instruction's products before they
   reach the accumulator, and is exact wherever float32 holds the products
   and their partial sums (small integers, values of similar magnitude).
2. The narrow partial sum ``s`` starts at 0 and takes each chunk in order:
   ``s = round_fmt(f32(s + c))``, a float32 addition (round to nearest even)
   rounded to ``fmt``. That is how XLA's CPU backend adds bfloat16 numbers;
   rounding to nearest, it equals the singly rounded narrow sum unless the
   float32 addition itself rounds onto a midpoint of ``fmt``'s grid. Integers add exactly and
   then saturate or wrap to ``fmt`` bits.
3. After every ``promote_every`` elements of ``K`` (and after the last one),
   ``s`` is added into the wide accumulator, ``total = round_promote(total +
   s)``, and reset to 0. ``promote_every=None`` never promotes inside ``K``:
   the result is the narrow sum (promoted once, into a zero total).

Several contracting dimensions are flattened row-major in the order
``dimension_numbers`` lists them (the first listed varies slowest): that
order is the summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from lowbit import formats
from lowbit.formats import FloatFormat
from lowbit.formats._checks import check_int, checked_int, require
from lowbit.formats.protocol import AnyFormat, BuiltinFormat, Format

__all__ = ["Accumulator", "accumulated_dot_general"]

_F32: np.dtype[np.float32] = np.dtype(np.float32)
# A float level once built: a format whose rounding sums are rounded to, or float32 (no rounding).
FloatLevel = Format | np.dtype[np.float32]
# What the constructor takes for a level: an int width, a format or its name, or a dtype.
LevelSpec = int | AnyFormat | DTypeLike
# Dot-general dimension numbers: ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)).
DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]
Dims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
# The grids of the two 16-bit float dtypes as lowbit formats, so one rounding
# helper (formats.quantize) serves every accumulator format.
_DTYPE_FORMATS: dict[np.dtype[np.generic], FloatFormat] = {
    np.dtype(jnp.bfloat16): FloatFormat(name="bfloat16", ebits=8, mbits=7),
    np.dtype(np.float16): FloatFormat(name="float16", ebits=5, mbits=10),
}
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_FLOAT_ALLOWED = (
    "a signed lowbit FloatFormat (e.g. FloatFormat(ebits=5, mbits=10)), a user format, a registered "
    "float format name, or the dtype float32, bfloat16 or float16 (or its name)"
)
_INT_OVERFLOWS = ("saturate", "wrap")
_FLOAT_ROUNDINGS = ("nearest", "toward_zero")


def _float_level(own: str, field: str, value: LevelSpec) -> FloatLevel:
    """``value`` as a float accumulator level: a format object, or the float32 dtype (no rounding)."""
    if isinstance(value, str) and value not in _DTYPE_NAMES:
        try:
            value = formats.get(value)
        except ValueError:
            raise ValueError(f"{own}.{field}={value!r} is invalid; allowed: {_FLOAT_ALLOWED}") from None
    if isinstance(value, FloatFormat):
        require(value.signed, own, field, value, "a signed format (partial sums have signs)")
        return value
    if isinstance(value, BuiltinFormat):  # integer, codebook, block, adaptive: not a grid for sums
        raise ValueError(f"{own}.{field}={value!r} is invalid; allowed: {_FLOAT_ALLOWED}")
    if not isinstance(value, str) and isinstance(value, Format):  # it has every member of the protocol
        return value  # a user format: formats.quantize calls its own rounding
    dtype: np.dtype[np.generic] | None = None
    if not isinstance(value, int):  # an int width is no dtype (np.dtype(8) is a TypeError too)
        try:
            dtype = np.dtype(value)
        except TypeError:
            pass
    if dtype == _F32:
        return _F32
    if dtype in _DTYPE_FORMATS:
        return _DTYPE_FORMATS[dtype]
    raise TypeError(f"{own}.{field}={value!r} is invalid; allowed: {_FLOAT_ALLOWED}")


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class Accumulator:
    """A narrow dot-product accumulator (hashable: a static ``jax.jit`` argument).

    Attributes:
      fmt: what partial sums are rounded to. A float level: a signed lowbit
        ``FloatFormat`` (any radix-2 minifloat up to 32 bits, e.g. the e8m13
        "FP22" ``FloatFormat(ebits=8, mbits=13)``, about the 14 bits of
        precision DeepSeek-V3 measured), a user format, a registered
        float format name, or the dtypes ``float32`` (no rounding beyond
        float32's own), ``bfloat16`` / ``float16`` (stored as the equal
        ``FloatFormat``). Or an ``int`` in [2, 32]: a two's-complement
        integer accumulator of that many bits (integer operands only).
      chunk: products summed in one float32/int32 dot (taken as exact) before
        each rounded addition to the partial sum; 1 rounds after every product.
      promote_every: elements of K after which the partial sum is added into
        the wide accumulator and reset; a multiple of ``chunk``, or ``None``
        (never: the whole K accumulates in ``fmt``).
      promote_fmt: the wide accumulator: a float level as ``fmt`` takes
        (float32 by default) for a float ``fmt``; an int width in [2, 32]
        (32 by default) for an integer ``fmt``. It may be narrower than ``fmt``.
      overflow: float levels: ``None`` follows the format's own overflow
        (inf, or NaN for formats without inf), ``"saturate"`` clamps to
        +-max (float32 levels always follow IEEE). Integer levels:
        ``"saturate"`` or ``"wrap"`` (modulo 2^bits), which must be chosen.
      rounding: float levels only: ``"nearest"`` (half to even) or
        ``"toward_zero"`` (truncation, as some tensor-core adders do).
        Integer accumulators take the default.
    """

    fmt: int | FloatLevel  # normalised: an int width, a format, or the float32 dtype
    chunk: int = 1
    promote_every: int | None = None
    promote_fmt: int | FloatLevel  # normalised as ``fmt``
    overflow: str | None = None
    rounding: str = "nearest"

    def __init__(
        self,
        *,
        fmt: LevelSpec = _F32,
        chunk: int = 1,
        promote_every: int | None = None,
        promote_fmt: LevelSpec | None = None,
        overflow: str | None = None,
        rounding: str = "nearest",
    ) -> None:
        # Written out, not generated: the levels are given as names, dtypes or formats and stored normalised.
        for field, value in (("chunk", chunk), ("promote_every", promote_every), ("overflow", overflow)):
            object.__setattr__(self, field, value)
        object.__setattr__(self, "rounding", rounding)
        self._validate(fmt, promote_fmt)

    def _validate(self, fmt: LevelSpec, promote_fmt: LevelSpec | None) -> None:
        """Check every field (``ValueError``/``TypeError`` naming it) and store the normalised levels."""
        own = "Accumulator"
        check_int(own, "chunk", self.chunk, 1)
        if self.promote_every is not None:
            check_int(own, "promote_every", self.promote_every, self.chunk)
            require(
                self.promote_every % self.chunk == 0,
                own,
                "promote_every",
                self.promote_every,
                f"None or a multiple of chunk={self.chunk}",
            )
        if isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool):
            width = checked_int(own, "fmt", fmt, 2, 32)
            promote_width = checked_int(own, "promote_fmt", 32 if promote_fmt is None else promote_fmt, 2, 32)
            require(
                self.overflow in _INT_OVERFLOWS,
                own,
                "overflow",
                self.overflow,
                "'saturate' or 'wrap' for an integer accumulator",
            )
            require(
                self.rounding == "nearest",
                own,
                "rounding",
                self.rounding,
                "'nearest' (the default) for an integer accumulator: integer sums are exact",
            )
            object.__setattr__(self, "fmt", width)
            object.__setattr__(self, "promote_fmt", promote_width)
            return
        level = _float_level(own, "fmt", fmt)
        object.__setattr__(self, "fmt", level)
        promote = _F32 if promote_fmt is None else _float_level(own, "promote_fmt", promote_fmt)
        object.__setattr__(self, "promote_fmt", promote)
        rounded = not (isinstance(level, np.dtype) and isinstance(promote, np.dtype))
        require(
            self.overflow in (None, "saturate"),
            own,
            "overflow",
            self.overflow,
            "None or 'saturate' for a float accumulator",
        )
        require(
            self.overflow is None or rounded,
            own,
            "overflow",
            self.overflow,
            "None when fmt and promote_fmt are float32 (float32 overflows to inf as IEEE)",
        )
        require(
            isinstance(self.rounding, str) and self.rounding in _FLOAT_ROUNDINGS,
            own,
            "rounding",
            self.rounding,
            ", ".join(_FLOAT_ROUNDINGS),
        )
        require(
            self.rounding == "nearest" or rounded,
            own,
            "rounding",
            self.rounding,
            "'nearest' when fmt and promote_fmt are float32 (float32 adds round to nearest)",
        )

    @property
    def integer(self) -> bool:
        """Whether this is an integer accumulator."""
        return isinstance(self.fmt, int)


def _add(acc: Accumulator, level: int | FloatLevel, s: jax.Array, c: jax.Array) -> jax.Array:
    """``s + c`` at one level of ``acc`` (its ``fmt`` or ``promote_fmt``): float32 then rounded, or integer."""
    if isinstance(level, int):  # an integer accumulator (both its levels are int widths)
        return _int_add(s, c, level, acc.overflow)
    t = s + c
    if isinstance(level, np.dtype):  # float32: the addition's own rounding is the level's
        return t
    return formats.quantize(level, t, saturate=acc.overflow == "saturate", rounding=acc.rounding)


def _int_add(s: jax.Array, c: jax.Array, bits: int, overflow: str | None) -> jax.Array:
    """``s + c`` for int32 ``s`` (inside ``bits``) and any int32 ``c``, saturated or wrapped to ``bits``."""
    r = s + c  # modulo 2^32, which is already right for "wrap"
    if overflow == "wrap":
        if bits == 32:
            return r
        shift = jnp.int32(32 - bits)
        return lax.shift_right_arithmetic(lax.shift_left(r, shift), shift)  # sign-extend the low bits
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # The exact sum leaves int32 only if s and c share a sign that r lacks; it then lies past
    # int32 (and so past the narrower range) on c's side.
    past_int32 = ((s ^ r) & (c ^ r)) < 0
    return jnp.where(past_int32, jnp.where(c < 0, jnp.int32(lo), jnp.int32(hi)), jnp.clip(r, lo, hi))


def _to_bmk(x: jax.Array, batch: tuple[int, ...], contract: tuple[int, ...]) -> jax.Array:
    """``x`` as (batch, free, K): each group flattened row-major in the given dim order."""
    free = [d for d in range(x.ndim) if d not in batch and d not in contract]
    shape = tuple(math.prod(x.shape[d] for d in dims) for dims in (batch, free, contract))
    return jnp.transpose(x, [*batch, *free, *contract]).reshape(shape)


def accumulated_dot_general(
    lhs: ArrayLike,
    rhs: ArrayLike,
    dimension_numbers: DimensionNumbers,
    acc: Accumulator,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
    """``lax.dot_general`` summed the way ``acc``'s narrow accumulator sums (see the module docstring).

    Jit-able with ``dimension_numbers`` (tuples), ``acc`` and
    ``preferred_element_type`` static. Cost: ``ceil(K / chunk)`` dependent
    steps of a ``lax.scan`` (nested: intervals of ``promote_every``, chunks
    inside), each a batched (B, M, chunk) x (B, N, chunk) dot and one rounding
    of the (B, M, N) partial sums. Flops stay those of the product and memory
    O(B*M*N), but the K-long chain of small steps replaces one fused kernel:
    with ``chunk=1`` expect it to run orders of magnitude slower than
    ``lax.dot_general`` (emulation, not a fast path); larger chunks are
    proportionally cheaper.

    Args:
      lhs, rhs: operands as ``lax.dot_general`` takes them. Float accumulators
        need float operands of at most 32 bits (float32, bfloat16, float16,
        float8 ...), cast exactly to float32; integer accumulators need
        integer operands, multiplied in int32 (exact for 8- and 16-bit
        operands; wider products wrap modulo 2^32).
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch,
        rhs_batch))``, as ``lax.dot_general``.
      acc: the ``Accumulator``.
      preferred_element_type: the result dtype, as ``lax.dot_general``
        (default: the operands' common dtype). Accumulation is float32/int32
        whatever it is; the total is cast to it at the end.

    Returns:
      ``lax.dot_general``'s shape (batch dims, lhs free dims, rhs free dims)
      and dtype. Its derivative is the exact product's (straight through the
      rounding, whose own derivative is zero); a quantized matmul's backward
      products, if they too are to be emulated, call this function themselves.

    Raises:
      TypeError: ``acc`` is not an ``Accumulator``, or an operand dtype does
        not suit it.
    """
    if not isinstance(acc, Accumulator):
        raise TypeError(f"acc={acc!r} is invalid; allowed: a lowbit.training.Accumulator")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        # Read before jnp.asarray, which would narrow float64 silently (lists: numpy's reading).
        dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
        ok = (
            jnp.issubdtype(dtype, jnp.integer)
            if acc.integer
            else jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize <= 4
        )
        if not ok:
            allowed = "an integer dtype" if acc.integer else "a float dtype of at most 32 bits"
            raise TypeError(f"{name} has dtype {dtype}; allowed for Accumulator(fmt={acc.fmt!r}): {allowed}")
    la, ra = jnp.asarray(lhs), jnp.asarray(rhs)
    # lax's own checks of the dimension numbers, and its result shape and dtype.
    out = jax.eval_shape(
        functools.partial(
            lax.dot_general, dimension_numbers=dimension_numbers, preferred_element_type=preferred_element_type
        ),
        la,
        ra,
    )
    (lc, rc), (lb, rb) = dimension_numbers
    dims: Dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    result: jax.Array = _emulate(la, ra, dims, acc, out.shape, out.dtype)
    return result


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _emulate(
    lhs: jax.Array, rhs: jax.Array, dims: Dims, acc: Accumulator, out_shape: tuple[int, ...], out_dtype: DTypeLike
) -> jax.Array:
    (lc, rc), (lb, rb) = dims
    wide = jnp.int32 if acc.integer else jnp.float32
    a, b = _to_bmk(lhs, lb, lc).astype(wide), _to_bmk(rhs, rb, rc).astype(wide)
    (nb, m, k), n = a.shape, b.shape[1]
    chunks = max(1, -(-k // acc.chunk))
    interval = acc.promote_every or chunks * acc.chunk
    n_int = -(-k // interval)
    # Zero padding to whole intervals adds exact zeros, which leave every sum as it is.
    pad = n_int * interval - k
    steps = (n_int, interval // acc.chunk, acc.chunk)

    def split(
        x: jax.Array,
    ) -> jax.Array:  # (B, F, K) -> (intervals, chunks per interval, B, F, chunk): the scans' leading axes
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad))).reshape(x.shape[:2] + steps)
        return jnp.moveaxis(x, (2, 3), (0, 1))

    def chunk_step(s: jax.Array, ab: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        a_chunk, b_chunk = ab
        c = lax.dot_general(
            a_chunk, b_chunk, (((2,), (2,)), ((0,), (0,))), precision=lax.Precision.HIGHEST, preferred_element_type=wide
        )  # HIGHEST: no TF32/bf16 passes on GPUs
        return _add(acc, acc.fmt, s, c), None

    def interval_step(total: jax.Array, ab: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        s, _ = lax.scan(chunk_step, jnp.zeros((nb, m, n), wide), ab)
        return _add(acc, acc.promote_fmt, total, s), None

    total, _ = lax.scan(interval_step, jnp.zeros((nb, m, n), wide), (split(a), split(b)))
    return total.astype(out_dtype).reshape(out_shape)


@_emulate.defjvp
def _emulate_jvp(
    dims: Dims,
    acc: Accumulator,
    out_shape: tuple[int, ...],
    out_dtype: DTypeLike,
    primals: tuple[jax.Array, jax.Array],
    tangents: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    # Straight through: the accumulator's rounding error is a constant, so the derivative is the exact
    # product's (rounding itself has a zero derivative almost everywhere, which would stop training).
    (lhs, rhs), (dlhs, drhs) = primals, tangents
    dot = functools.partial(lax.dot_general, dimension_numbers=dims, preferred_element_type=out_dtype)
    return _emulate(lhs, rhs, dims, acc, out_shape, out_dtype), dot(dlhs, rhs) + dot(lhs, drhs)
