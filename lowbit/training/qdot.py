"""A quantized ``dot_general`` with independent forward and backward quantizers.

Forward: ``out = dot(Q_lhs(lhs), Q_rhs(rhs))``. Backward (straight-through for the
operands), with ``g`` the incoming gradient:

* ``dlhs = dot_transpose(Q_dlhs_grad(g), Q_dlhs_rhs(rhs))``
* ``drhs = dot_transpose(Q_drhs_lhs(lhs), Q_drhs_grad(g))``

like AQT's fwd / dlhs / drhs split, but as one frozen config.

**Per-GEMM placement** (``placement="gemm"``, the default): each of the three
products quantizes both of its operands with their scale groups on *its own*
axes, from the unquantized tensors (rowwise and columnwise copies, as cuBLAS,
TransformerEngine, torchao and the VJP of ``jax.nn.scaled_dot_general`` do):
blocks (MX, NVFP4) and groups along the product's contraction, channel scales
along the operand's last free dim. For ``out = lhs · rhs`` (``M x K · K x N``)
that is ``lhs`` and ``rhs`` along K in the forward, ``g`` and ``rhs`` along N in
``dlhs = g · rhsᵀ``, ``lhs`` and ``g`` along M in ``drhs = lhsᵀ · g``. A product
that contracts several dims (the weight gradient of a ``(batch, tokens,
features)`` activation contracts batch and tokens) blocks along them
flattened into one, in the order the product pairs them, the last fastest: the
``(batch * tokens, features)`` matrix a GEMM library sees. A convolution
contracts its feature axes in the forward (input features) and the input
gradient (output features), and batch x spatial in the weight gradient.
The forward's quantized copy is reused in a backward product only where it
is exactly what that product would compute (per-tensor scales; 2-D blocks,
which lie along both of a weight's axes) or where that product runs in float
(no gradient quantizer: then the forward's copy gives the exact derivative of
the quantized forward). ``placement="quantizer"`` applies every quantizer
along its own ``axis`` and, with ``reuse_fwd=True``, reuses the forward's
quantized operands in the backward: lowbit's numerics before per-GEMM
placement (issue 19), kept for comparison.

Radix-4 FP4 gradients (Sun et al. 2020) add two things:

* **GradScale**: pass ``grad_scale`` (a float32 scalar, the layer's state). The
  backward pass updates it from the current gradient (see ``gradscale``) and
  quantizes ``g * s_new``. The updated scale leaves the backward pass as the
  *cotangent* of ``grad_scale``: the caller replaces the state with its
  "gradient" instead of feeding it to the optimizer (flax's fp8
  overwrite-with-gradient trick; ``lowbit.nn`` does this for you).
* **Two-phase rounding** (``tpr=True``): ``g`` is quantized on the even grid for
  the dlhs product and on the odd grid (the same format at twice the scale) for
  the drhs product.

**Accumulation** (``accumulator=Accumulator(...)``): every product (forward,
input gradient, weight gradient) runs through ``accumulated_dot_general``
instead of ``lax.dot_general``: K-chunks summed exactly in float32, partial
sums rounded to the accumulator's format, promoted every ``promote_every``
elements. The two backward products are written out as dot_generals of their
own (``dlhs = g . rhs`` over rhs's free dims, ``drhs = lhs . g`` over lhs's
free dims, in the pairing order of ``_Dot.roles``), so each sums its own
contraction the narrow way. The operands are the fake-quantized floats (the
real int8/float8 path is not used with an accumulator).

**Random Hadamard transform** (``rht=RHT(products=..., block=16)``): each
listed product rotates both of its operands along its contraction (several
contracted dims flattened in pairing order, as the block quantizers see them)
before their quantizers; the rotation cancels in the product. Each product has
its own sign key, from the same split as the quantizers' keys (without a key,
the fixed ``jax.random.key(0)`` gives one sign vector to every op and step, as
TransformerEngine's hard-coded one). A rotated product never reuses the
forward's quantized copy (it quantizes the rotated operand), and a rotated
forward's copy lies in the rotated basis, so no backward product reuses it.
A contraction that is not whole blocks keeps its last, partial block as it is
(an identity block: still orthogonal). A delayed forward quantizer's amax is
the rotated operand's (what it quantizes); GradScale and the gradient's
delayed history read the unrotated gradient (one statistic for both products).

**Block-scaled kernel** (off-CPU, ``uses_block_kernel``): where both forward
quantizers are the ``mxfp8`` recipe's (round to nearest, ``rceil`` scales,
whose codes and scales equal JAX's MX quantizer bit for bit), the forward
product is ``jax.nn.scaled_dot_general``'s MXFP8 GEMM; it differs from the
emulation only in the order of its float32 sums. The backward products stay
emulated. On CPU (no lowering) everything is emulated.

**Delayed scaling** (``Quantizer(scale=Delayed())`` on ``lhs``, ``rhs``,
``dlhs_grad`` or ``drhs_grad``): pass ``amax_history``, one float32 ``(L,)``
history per delayed site (``lhs``, ``rhs``, ``grad``; see ``delayed``). The
updated histories leave the backward pass as their cotangents, like GradScale.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import DotDimensionNumbers
from jax.typing import ArrayLike, DTypeLike

from lowbit import formats, quant
from lowbit.quant import Quantizer
from lowbit.training import delayed
from lowbit.training.accumulate import Accumulator, accumulated_dot_general
from lowbit.training.gradscale import gradscale_update
from lowbit.training.hadamard import RHT, rht

MATMULS = ("fake", "real", "auto")
PLACEMENTS = ("gemm", "quantizer")
# Storage dtypes of the real matmul path; 4- and 2-bit integers ride in int8
# containers, which every backend multiplies natively.
REAL_DTYPES = {
    "int8": jnp.int8,
    "int4": jnp.int8,
    "int2": jnp.int8,
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}


def _name(q: Quantizer | None) -> str:
    return "None" if q is None else q.format.name


def real_ok(q: Quantizer | None) -> TypeGuard[Quantizer]:
    """Whether quantizer ``q`` can feed the real matmul path (symmetric uniform int8/int4/int2/float8)."""
    return (
        q is not None
        and isinstance(q.kind, quant.Uniform)
        and q.kind.symmetric
        and isinstance(q.granularity, (quant.Tensor, quant.Channel))
        and getattr(q.format, "name", None) in REAL_DTYPES
    )


# The one block-scaled GEMM of jax.nn.scaled_dot_general that lowbit's emulation matches bit for bit in its
# operands: MXFP8 (E4M3 elements, 32-blocks, E8M0 scales of amax/448 rounded up; test_scale_modes checks the
# quantizer). JAX's NVFP4 takes a caller-given global scale where lowbit computes a tensor scale: emulated.
_KERNEL_MXFP8 = quant.Quantizer(format=formats.with_scale_mode("mxfp8_e4m3", "rceil"))


def uses_block_kernel(
    config: DotQuantConfig, lhs_shape: tuple[int, ...], dimension_numbers: DotDimensionNumbers
) -> bool:
    """Whether the forward product runs as ``jax.nn.scaled_dot_general``'s MXFP8 GEMM instead of emulation.

    Off-CPU only (it has no CPU lowering), with ``matmul`` not ``fake``, per-GEMM
    placement, no accumulator and no forward RHT, both forward quantizers
    round-to-nearest MXFP8 with ``rceil`` scales (the ``mxfp8`` recipe's), and
    one contracted dim per operand of a length that is a multiple of 32 (JAX's
    quantizer takes whole blocks). The backward products stay emulated.

    Args:
      config: the product's ``DotQuantConfig``.
      lhs_shape: the forward lhs operand's shape.
      dimension_numbers: the forward product's, as ``lax.dot_general`` takes them.
    """
    (lc, _), _ = dimension_numbers
    mx = all(q is not None and q.along(-1) == _KERNEL_MXFP8 for q in (config.lhs, config.rhs))
    return (
        jax.default_backend() != "cpu"
        and config.matmul != "fake"
        and config.placement == "gemm"
        and config.accumulator is None
        and not _rotates(config, "fwd")
        and mx
        and len(lc) == 1
        and lhs_shape[lc[0]] % _KERNEL_MXFP8.format.block_size == 0
    )


def uses_real_matmul(config: DotQuantConfig) -> bool:
    """Whether ``config`` runs the forward product on integer/float8 operands (see ``matmul``)."""
    if config.matmul == "fake" or config.accumulator is not None or not (real_ok(config.lhs) and real_ok(config.rhs)):
        return False  # nothing quantizes an operand here (an LSQ layer supplies its own grid), or it is emulated
    ints = all(REAL_DTYPES[q.format.name] == jnp.int8 for q in (config.lhs, config.rhs))
    return config.matmul == "real" or ints or jax.default_backend() != "cpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotQuantConfig:
    """Which quantizer touches which operand of one matmul (``None`` = leave as is).

    Attributes:
      lhs, rhs: forward operands.
      dlhs_grad, dlhs_rhs: the incoming gradient and ``rhs`` in the input-gradient product.
      drhs_grad, drhs_lhs: the incoming gradient and ``lhs`` in the weight-gradient product.
      reuse_fwd: where a backward product has no quantizer of its own for
        ``lhs`` (``drhs_lhs``) or ``rhs`` (``dlhs_rhs``), it quantizes that
        operand with the forward's quantizer (placed on its own axes, or the
        forward's copy itself where that is exact; see the module docstring);
        ``False`` leaves it unquantized there.
      placement: ``gemm`` (the quantizers' ``axis`` is set per product by the
        product: see the module docstring) or ``quantizer`` (every quantizer
        along its own ``axis``; the backward reuses the forward's copies).
      grad_scale: the gradient quantizers take their scale from the GradScale
        state (``1/s``) instead of their own scale source.
      tpr: two-phase rounding of the gradient (odd grid for the drhs product).
      Any of ``lhs``, ``rhs``, ``dlhs_grad``, ``drhs_grad`` may use delayed
      scaling (``scale=Delayed()``); the two gradient quantizers then share one
      history (both quantize the incoming gradient).
      matmul: ``fake`` (dequantized operands in the compute dtype), ``real``
        (integer / float8 operands into ``lax.dot_general``, int32 or float32
        accumulation, scales applied to the result; with no operand quantizer
        there is nothing to feed it and the product stays float) or ``auto``: real when both
        forward quantizers are integer formats (every backend has fast int8
        dots), or float8 formats on a GPU/TPU backend (XLA's CPU backend
        converts float8 operands to float32 before the dot, so there it is fake).
        With an ``accumulator``, ``auto`` is ``fake``. Separately, MXFP8 forward
        products take ``jax.nn.scaled_dot_general`` off-CPU unless ``fake``
        (module docstring, ``uses_block_kernel``).
      accumulator: ``None`` (exact float32 sums) or a float ``Accumulator``
        that every product (forward, input gradient, weight gradient) sums
        with (module docstring). Dot products only: ``quantized_conv`` refuses it.
      rht: ``None`` or an ``RHT`` naming the products whose operands are
        rotated before their quantizers (module docstring); ``placement="gemm"`` only.
    """

    lhs: Quantizer | None = None
    rhs: Quantizer | None = None
    dlhs_grad: Quantizer | None = None
    dlhs_rhs: Quantizer | None = None
    drhs_grad: Quantizer | None = None
    drhs_lhs: Quantizer | None = None
    reuse_fwd: bool = True
    grad_scale: bool = False
    tpr: bool = False
    matmul: str = "auto"
    placement: str = "gemm"
    accumulator: Accumulator | None = None
    rht: RHT | None = None

    def __post_init__(self) -> None:
        if self.grad_scale and (self.dlhs_grad is None or self.drhs_grad is None):
            raise ValueError("DotQuantConfig.grad_scale=True needs dlhs_grad and drhs_grad quantizers")
        if self.matmul not in MATMULS:
            raise ValueError(f"DotQuantConfig.matmul={self.matmul!r} is invalid; allowed: {', '.join(MATMULS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"DotQuantConfig.placement={self.placement!r} is invalid; allowed: {', '.join(PLACEMENTS)}"
            )
        if self.matmul == "real" and not all(q is None or real_ok(q) for q in (self.lhs, self.rhs)):
            raise ValueError(
                "DotQuantConfig.matmul='real' needs symmetric uniform lhs and rhs quantizers of a format in "
                f"{', '.join(REAL_DTYPES)} (got lhs={_name(self.lhs)}, rhs={_name(self.rhs)})"
            )
        if self.accumulator is not None:
            if not isinstance(self.accumulator, Accumulator):
                raise TypeError(
                    f"DotQuantConfig.accumulator={self.accumulator!r} is invalid; allowed: None or a "
                    "lowbit.training.Accumulator"
                )
            if self.accumulator.integer:
                raise ValueError(
                    f"DotQuantConfig.accumulator={self.accumulator!r} is invalid; allowed: a float "
                    "Accumulator (the products take fake-quantized float operands)"
                )
            if self.matmul == "real":
                raise ValueError(
                    "DotQuantConfig.matmul='real' is invalid with an accumulator; allowed: 'auto' or "
                    "'fake' (the emulated accumulator sums the fake-quantized operands)"
                )
        if self.rht is not None:
            if not isinstance(self.rht, RHT):
                raise TypeError(
                    f"DotQuantConfig.rht={self.rht!r} is invalid; allowed: None or a lowbit.training.hadamard.RHT"
                )
            if self.placement != "gemm":
                raise ValueError(
                    f"DotQuantConfig.rht={self.rht!r} is invalid with placement={self.placement!r}; "
                    "allowed: placement='gemm' (a rotated product quantizes its own operands)"
                )
        if self.tpr and not self.grad_scale:
            raise ValueError("DotQuantConfig.tpr=True needs grad_scale=True (the odd grid is 2x the GradScale step)")
        for field in ("dlhs_rhs", "drhs_lhs"):
            if _delayed(getattr(self, field)):
                raise ValueError(
                    f"DotQuantConfig.{field} has scale=Delayed(); allowed: delayed scaling on lhs, rhs, "
                    "dlhs_grad and drhs_grad only (they own the histories)"
                )
        grads = [s for q in (self.dlhs_grad, self.drhs_grad) if (s := _delayed_scale(q)) is not None]
        if grads and self.grad_scale:
            raise ValueError(
                "DotQuantConfig.grad_scale=True sets the gradient quantizers' scale; allowed: "
                "dlhs_grad/drhs_grad without Delayed() scales when grad_scale=True"
            )
        if len({s.history for s in grads}) > 1:
            raise ValueError(
                "DotQuantConfig.dlhs_grad and drhs_grad share one amax history (both quantize the "
                f"gradient); allowed: equal Delayed.history (got {[s.history for s in grads]})"
            )

    @property
    def amax_histories(self) -> dict[str, int]:
        """The amax histories of the delayed sites: ``{"lhs" | "rhs" | "grad": length}``."""
        sites = dict(lhs=self.lhs, rhs=self.rhs, grad=self.dlhs_grad if _delayed(self.dlhs_grad) else self.drhs_grad)
        return {site: s.history for site, q in sites.items() if (s := _delayed_scale(q)) is not None}

    @property
    def stochastic(self) -> bool:
        """Whether any quantizer rounds stochastically (then a key is required)."""
        qs = (self.lhs, self.rhs, self.dlhs_grad, self.dlhs_rhs, self.drhs_grad, self.drhs_lhs)
        return any(getattr(q, "rounding", None) == "stochastic" for q in qs)


def _delayed_scale(q: Quantizer | None) -> quant.Delayed | None:
    """``q``'s ``Delayed()`` source, or None (no quantizer, or another source)."""
    return q.scale if q is not None and isinstance(q.scale, quant.Delayed) else None


def _delayed(q: Quantizer | None) -> TypeGuard[Quantizer]:
    """Whether ``q`` is a quantizer with delayed scaling."""
    return _delayed_scale(q) is not None


Hists = tuple[jax.Array | None, ...]
"""The ``(lhs, rhs, grad)`` amax histories of ``_qprod`` (None where a site is not delayed)."""
DN = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
"""Dot dimension numbers as ``_check_dims`` normalizes them: ``((lc, rc), (lb, rb))`` of int tuples."""


def _histories(config: DotQuantConfig, amax_history: dict[str, jax.Array] | None) -> Hists:
    """``amax_history`` checked against ``config``'s delayed sites, as a ``(lhs, rhs, grad)`` tuple."""
    want = config.amax_histories
    given = {} if amax_history is None else amax_history
    if not isinstance(given, dict) or set(given) != set(want):
        raise ValueError(
            f"amax_history={None if amax_history is None else sorted(given)} does not match the "
            f"config's delayed sites; allowed: a dict with keys {sorted(want)}" + (" (or None)" if not want else "")
        )
    hists: list[jax.Array | None] = []
    for site in ("lhs", "rhs", "grad"):
        h = given.get(site)
        if h is not None:
            h = jnp.asarray(h)
            if h.shape != (want[site],) or h.dtype != jnp.float32:
                raise ValueError(
                    f"amax_history[{site!r}] has shape {h.shape} and dtype {h.dtype}; allowed: "
                    f"float32 of shape ({want[site]},)"
                )
        hists.append(h)
    return tuple(hists)


def _check_dims(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DotDimensionNumbers) -> DN:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise ValueError(
            f"dimension_numbers={dimension_numbers!r} is invalid; allowed: "
            "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))"
        ) from None
    for name, dims, arr in (
        ("lhs_contracting", lc, lhs),
        ("rhs_contracting", rc, rhs),
        ("lhs_batch", lb, lhs),
        ("rhs_batch", rb, rhs),
    ):
        if any(not (0 <= d < arr.ndim) for d in dims):
            raise ValueError(f"{name}={tuple(dims)} is out of range for an operand of rank {arr.ndim}")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers={dimension_numbers!r}: contracting/batch dims must pair up")
    for a, b in zip(list(lc) + list(lb), list(rc) + list(rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"lhs dim {a} (size {lhs.shape[a]}) does not match rhs dim {b} (size {rhs.shape[b]})")
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def _fq(q: Quantizer | None, x: jax.Array, key: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    if q is None:
        return x
    g = q.granularity
    pad = _pad_rows_cols(g, x.shape) if isinstance(g, quant.Block) else None
    if pad is None:
        return quant.fake_quant(q, x, key, scale=scale)
    # Partial edge tiles (a layer's 10 classes, 4 input features): zeros fill them, as 1-D blocks pad their
    # last block; zeros change no tile's (or the tensor's) absmax, so whole tiles quantize as they would alone.
    rows, cols = pad
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, cols)])
    return quant.fake_quant(q, padded, key, scale=scale)[..., : x.shape[-2], : x.shape[-1]]


def _pad_rows_cols(g: quant.Block, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The zeros completing ``shape``'s last two axes to whole ``g`` tiles, or None if none are needed."""
    pad = tuple(-n % b for n, b in zip(shape[-2:], g.shape))
    return pad if any(pad) else None


def quantized_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: DotDimensionNumbers,
    config: DotQuantConfig,
    *,
    key: jax.Array | None = None,
    grad_scale: jax.Array | None = None,
    amax_history: dict[str, jax.Array] | None = None,
    lhs_scale: ArrayLike | None = None,
    rhs_scale: ArrayLike | None = None,
    precision: lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
    """``lax.dot_general`` with quantized operands and gradients.

    Args:
      lhs, rhs: float operands (float32, bfloat16 or float16).
      dimension_numbers: as ``lax.dot_general`` (batch dims supported, so
        attention's QK and AV products work).
      config: the quantizers (a frozen ``DotQuantConfig``); with
        ``placement="gemm"`` each product places their axes (module docstring).
      key: ``jax.random`` key for stochastic rounding (split once between the six
        quantizer sites); required when any quantizer rounds stochastically.
      grad_scale: float32 scalar GradScale state, required iff ``config.grad_scale``.
      amax_history: ``{site: float32 (L,) history}`` for the delayed sites of
        ``config`` (``config.amax_histories``), else ``None``. The updated
        histories are their cotangents (see ``delayed``).
      lhs_scale, rhs_scale: steps of ``Learned()`` forward quantizers
        (e.g. LSQ steps; no gradient flows to them through this function).
      precision: passed to ``lax.dot_general``.
      preferred_element_type: result dtype (default: the operands' result type).

    Returns:
      The product, of dtype ``preferred_element_type`` or the operands' dtype.
    """
    dn = _check_dims(lhs, rhs, dimension_numbers)
    key, gs, hists = _state_args(config, key, grad_scale, amax_history)
    scales = tuple(
        None if s is None else lax.stop_gradient(jnp.asarray(s, jnp.float32)) for s in (lhs_scale, rhs_scale)
    )
    product = _Dot(dn, precision, preferred_element_type, config.accumulator)
    return _qprod(product, config, uses_real_matmul(config), lhs, rhs, key, gs, scales, hists)


def _state_args(
    config: DotQuantConfig,
    key: jax.Array | None,
    grad_scale: jax.Array | None,
    amax_history: dict[str, jax.Array] | None,
) -> tuple[jax.Array, jax.Array, Hists]:
    """``(key, grad_scale, histories)`` as ``_qprod`` takes them, after checking they fit ``config``."""
    hists = _histories(config, amax_history)
    if config.grad_scale != (grad_scale is not None):
        raise ValueError("grad_scale must be given exactly when config.grad_scale is True")
    if key is None:
        if config.stochastic:
            raise ValueError("config rounds stochastically: pass key=jax.random.key(...)")
        key = jax.random.key(0)  # never drawn from: every quantizer rounds deterministically
    gs = jnp.zeros((), jnp.float32) if grad_scale is None else grad_scale
    return key, gs, hists


def quantized_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    config: DotQuantConfig,
    *,
    key: jax.Array | None = None,
    grad_scale: jax.Array | None = None,
    amax_history: dict[str, jax.Array] | None = None,
    **conv_kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` with quantized operands and gradients.

    The same forward / dlhs / drhs quantizers, GradScale and two-phase rounding as
    ``quantized_dot_general``; the product is always fake-quantized (XLA has no
    integer or float8 convolution on the backends lowbit targets).

    Args:
      lhs, rhs: the input and the kernel, float.
      config: the quantizers; ``config.matmul`` is ignored. ``config.accumulator``
        must be ``None`` (a convolution's sums are not emulated), and ``config.rht``
        may rotate ``fwd`` and ``dlhs`` only: those contract feature axes, which
        each window offset pairs alone; the weight gradient pairs the input's
        and the gradient's batch x spatial at shifted windows, where no
        rotation cancels.
      key, grad_scale, amax_history: as ``quantized_dot_general``.
      **conv_kwargs: ``lax.conv_general_dilated``'s arguments after the operands
        (``window_strides``, ``padding``, ``dimension_numbers``...).

    Returns:
      The convolution, as ``lax.conv_general_dilated`` returns it.

    Raises:
      ValueError: ``config.accumulator`` is set, or ``config.rht`` rotates ``drhs``.
    """
    if config.accumulator is not None:
        raise ValueError(
            f"DotQuantConfig.accumulator={config.accumulator!r} is not supported for convolutions; allowed there: None"
        )
    if config.rht is not None and "drhs" in config.rht.products:
        raise ValueError(
            f"DotQuantConfig.rht.products={config.rht.products!r} is not supported for convolutions "
            "(the weight gradient pairs shifted windows: no rotation cancels); allowed there: "
            "'fwd', 'dlhs'"
        )
    key, gs, hists = _state_args(config, key, grad_scale, amax_history)
    product = _Conv(conv_key(conv_kwargs))
    return _qprod(product, config, False, lhs, rhs, key, gs, (None, None), hists)


ConvKey = tuple[tuple[str, Any], ...]
"""``lax.conv_general_dilated`` keyword arguments as sorted, hashable ``(name, value)`` pairs."""


def conv_key(conv_kwargs: dict[str, Any]) -> ConvKey:
    """``lax.conv_general_dilated`` keyword arguments as sorted, hashable ``(name, value)`` pairs.

    Lists (as users pass paddings and strides) become tuples: the product is a
    static jit argument. Raises ``TypeError`` for an unhashable value.
    """
    key = tuple(sorted((k, _hashable(v)) for k, v in conv_kwargs.items()))
    hash(key)
    return key


def _hashable(v: Any) -> Any:
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # ConvDimensionNumbers and other named tuples
        return type(v)(*(_hashable(x) for x in v))
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


class Axes(NamedTuple):
    """One operand's dims in one product.

    Attributes:
      contract: the dims the product sums over, in the order it pairs them with
        the other operand's (blocks and groups run along them, flattened).
      free: its kept dims that are not batch dims (a channel scale runs along
        the last).
    """

    contract: tuple[int, ...]
    free: tuple[int, ...]


class _Dot(NamedTuple):
    """A ``lax.dot_general`` with fixed dimension numbers, precision, result type and accumulator."""

    dn: DN
    precision: lax.PrecisionLike
    pet: DTypeLike | None
    acc: Accumulator | None = None

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self._dot(a, b, self.dn, self.pet)

    def _dot(self, a: jax.Array, b: jax.Array, dn: DN, pet: DTypeLike | None = None) -> jax.Array:
        if self.acc is None:
            return lax.dot_general(a, b, dn, precision=self.precision, preferred_element_type=pet)
        out: jax.Array = accumulated_dot_general(a, b, dn, self.acc, preferred_element_type=pet)
        return out

    def transposed(
        self, g_dlhs: jax.Array, rhs: jax.Array, lhs: jax.Array, g_drhs: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``(dlhs, drhs)`` as two products of their own, each summed by this product's accumulator.

        ``dlhs = g_dlhs . rhs`` over rhs's free dims and ``drhs = lhs . g_drhs``
        over lhs's free dims (the contractions of ``roles``, batch dims kept),
        each transposed to its operand's layout. (Autodiff of an accumulated
        product would give exact transposed products: its JVP is the exact one.)

        Args:
          g_dlhs, g_drhs: the gradient as the two products take it, the output's shape.
          rhs, lhs: the operands as the input- and weight-gradient products take them.

        Returns:
          ``dlhs`` of ``lhs``'s shape and ``drhs`` of ``rhs``'s shape.
        """
        (lc, rc), (lb, rb) = self.dn
        r = self.roles(lhs.ndim, rhs.ndim)
        g_b = tuple(range(len(lb)))
        dl = self._dot(g_dlhs, rhs, ((r["dlhs_grad"].contract, r["dlhs_rhs"].contract), (g_b, tuple(rb))))
        dr = self._dot(lhs, g_drhs, ((r["drhs_lhs"].contract, r["drhs_grad"].contract), (tuple(lb), g_b)))
        # Result dims as the operand's dims: batch, the other operand's kept dims (ascending), own free dims.
        dl_dims = [*lb, *r["lhs"].free, *(lc[rc.index(d)] for d in sorted(rc))]
        dr_dims = [*rb, *(rc[lc.index(d)] for d in sorted(lc)), *r["rhs"].free]
        return jnp.transpose(dl, _argsort(dl_dims)), jnp.transpose(dr, _argsort(dr_dims))

    def roles(self, lhs_ndim: int, rhs_ndim: int) -> dict[str, Axes]:
        """``{site: Axes}``: each operand's dims in the forward, input-gradient and weight-gradient products.

        The output (and ``g``) is ``(batch..., lhs free..., rhs free...)``. The
        input gradient contracts ``g``'s rhs-free dims with ``rhs``'s free dims,
        the weight gradient ``lhs``'s free dims with ``g``'s lhs-free dims; both
        keep the batch dims, pairing dims in ascending order.
        """
        (lc, rc), (lb, rb) = self.dn
        lf = tuple(d for d in range(lhs_ndim) if d not in lc and d not in lb)
        rf = tuple(d for d in range(rhs_ndim) if d not in rc and d not in rb)
        g_lf = tuple(range(len(lb), len(lb) + len(lf)))
        g_rf = tuple(range(len(lb) + len(lf), len(lb) + len(lf) + len(rf)))
        return dict(
            lhs=Axes(tuple(lc), lf),
            rhs=Axes(tuple(rc), rf),
            dlhs_grad=Axes(g_rf, g_lf),
            dlhs_rhs=Axes(rf, tuple(rc)),
            drhs_lhs=Axes(lf, tuple(lc)),
            drhs_grad=Axes(g_lf, g_rf),
        )


class _Conv(NamedTuple):
    """A ``lax.conv_general_dilated`` with fixed keyword arguments."""

    kwargs: ConvKey

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(a, b, **dict(self.kwargs))

    def roles(self, lhs_ndim: int, rhs_ndim: int) -> dict[str, Axes]:
        """``{site: Axes}`` of a convolution, from its dimension numbers.

        Forward: input and kernel along the input features; input gradient:
        ``g`` and kernel along the output features; weight gradient: input and
        ``g`` along batch x spatial (in the specs' order). The window's spatial
        offsets are not blocked over (a block's elements share one window
        position, as in an implicit GEMM with features fastest). Channel scales
        run along the batch (input, ``g``) and the other feature axis (kernel).
        """
        spec = dict(self.kwargs).get("dimension_numbers")
        dn = lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * rhs_ndim, spec)
        (ln, lc, *ls), (ro, ri, *_), (on, oc, *os_) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        return dict(
            lhs=Axes((lc,), (ln,)),
            rhs=Axes((ri,), (ro,)),
            dlhs_grad=Axes((oc,), (on,)),
            dlhs_rhs=Axes((ro,), (ri,)),
            drhs_lhs=Axes((ln, *ls), (lc,)),
            drhs_grad=Axes((on, *os_), (oc,)),
        )


Product = _Dot | _Conv
Scales = tuple[jax.Array | None, ...]
"""The forward operands' given steps ``(lhs, rhs)`` (``Learned()`` or ``Delayed()``), None elsewhere."""


def _argsort(dims: Sequence[int]) -> list[int]:
    """``np.argsort(dims)`` as a list of ints (the inverse permutation, as ``jnp.transpose`` is typed to take it)."""
    return [int(i) for i in np.argsort(dims)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _qprod(
    product: Product,
    config: DotQuantConfig,
    real: bool,
    lhs: jax.Array,
    rhs: jax.Array,
    key: jax.Array,
    gs: jax.Array,
    scales: Scales,
    hists: Hists,
) -> jax.Array:
    out, _ = _qprod_fwd(product, config, real, lhs, rhs, key, gs, scales, hists)
    return out


def _delayed_operand(
    q: Quantizer | None, x: jax.Array, history: jax.Array | None, scale: jax.Array | None
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(step, new history)`` of a delayed forward operand, or ``(scale, None)`` for any other quantizer."""
    if not _delayed(q):
        return scale, None
    assert history is not None  # _histories: every delayed site has one
    return delayed.step(q, history), delayed.update(history, delayed.amax(q, x))


def _real_operand(q: Quantizer, x: jax.Array, key: jax.Array, scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(values, step)``: ``x`` on ``q``'s grid in its narrow storage dtype, and its kept-dims step."""
    step = quant.qparams(q, x, scale=scale).step()
    v: jax.Array = formats.quantize(q.format, x.astype(jnp.float32) / step, rounding=q.rounding, key=key)
    return v.astype(REAL_DTYPES[q.format.name]), step


def _out_scale(
    step: jax.Array,
    ndim_out: int,
    own_batch: Sequence[int],
    own_free: Sequence[int],
    own_contract: Sequence[int],
    lhs_side: bool,
    n_other_free: int,
) -> jax.Array:
    """Reshape an operand's kept-dims step to broadcast against the dot_general output."""
    if any(step.shape[d] != 1 for d in own_contract):
        raise ValueError(
            "matmul='real' needs scales that are constant along the contracting dims "
            f"(scale shape {step.shape}, contracting dims {own_contract})"
        )
    dims = [step.shape[d] for d in own_batch]
    free = [step.shape[d] for d in own_free]
    dims += free + [1] * n_other_free if lhs_side else [1] * n_other_free + free
    assert len(dims) == ndim_out
    return step.reshape(dims)


def _real_dot(
    product: _Dot,
    q_lhs: Quantizer,
    q_rhs: Quantizer,
    lhs: jax.Array,
    rhs: jax.Array,
    k_lhs: jax.Array,
    k_rhs: jax.Array,
    scales: Scales,
) -> tuple[jax.Array, _Narrow, _Narrow]:
    dn, precision, pet = product.dn, product.precision, product.pet
    (lc, rc), (lb, rb) = dn
    cl, sl = _real_operand(q_lhs, lhs, k_lhs, scales[0])
    cr, sr = _real_operand(q_rhs, rhs, k_rhs, scales[1])
    acc = jnp.int32 if cl.dtype == jnp.int8 and cr.dtype == jnp.int8 else jnp.float32
    out = lax.dot_general(cl, cr, dn, precision=precision, preferred_element_type=acc)
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    out = (
        out.astype(jnp.float32)
        * _out_scale(sl, out.ndim, lb, lf, lc, True, len(rf))
        * _out_scale(sr, out.ndim, rb, rf, rc, False, len(lf))
    )
    return (
        out.astype(pet or jnp.result_type(lhs.dtype, rhs.dtype)),
        _Narrow(cl, sl, jnp.zeros((), lhs.dtype)),
        _Narrow(cr, sr, jnp.zeros((), rhs.dtype)),
    )


def _block_kernel(product: _Dot, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """The forward product as ``jax.nn.scaled_dot_general``'s MXFP8 GEMM (quantizing both operands itself)."""
    mx = jax.nn.get_scaled_dot_general_config("mxfp8")
    pet = product.pet or jnp.result_type(lhs.dtype, rhs.dtype)
    out = jax.nn.scaled_dot_general(lhs, rhs, product.dn, preferred_element_type=jnp.float32, configs=[mx] * 3)
    return out.astype(pet)


class _Narrow(NamedTuple):
    """A residual kept in its narrow storage dtype plus its step (4x less memory than float32)."""

    codes: jax.Array
    step: jax.Array
    proto: jax.Array  # a scalar of the operand's dtype

    def value(self) -> jax.Array:
        return (self.codes.astype(jnp.float32) * self.step).astype(self.proto.dtype)


Residuals = tuple[jax.Array | _Narrow, jax.Array | _Narrow, tuple[jax.Array, ...], jax.Array, Hists]
"""What ``_qprod_fwd`` saves: the operands (raw, or the forward's copies), the backward's keys, GradScale, histories."""


# The keys one call splits: six quantizer sites, then the RHT signs of the forward, dlhs and drhs products.
N_KEYS = 9


def _split(config: DotQuantConfig, key: jax.Array) -> tuple[jax.Array, ...]:
    """``N_KEYS`` keys from ``key``; a config that draws nothing random reads none, so it splits nothing.

    ``split_key``'s child ``i`` does not depend on how many are split, so the
    quantizer sites get the keys they had before the RHT keys were added.
    """
    if not (config.stochastic or config.rht is not None):
        return (key,) * N_KEYS
    return tuple(_computed_once(k) for k in formats.split_key(key, N_KEYS))


def _computed_once(key: jax.Array) -> jax.Array:
    """``key`` itself (the same words), computed once instead of inside every elementwise pass that reads it.

    XLA fuses the split's scalar hashing into each consumer, and a loop fusion
    evaluates a broadcast operand per element: a stochastically rounded
    gradient spent about two thirds of its per-element work re-deriving its key.
    An integer remainder is an op XLA does not duplicate into a consumer that
    reuses its elements; on 16-bit halves, ``% 0x10001`` leaves every word as it is.
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    m = jnp.uint32(0x10001)
    data = (lax.rem(data >> 16, m) << 16) | lax.rem(data & jnp.uint32(0xFFFF), m)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


@functools.cache
def _on_axis(q: Quantizer, axis: int) -> Quantizer:
    return q.along(axis)


def _per_tensor(q: Quantizer) -> bool:
    return isinstance(q.granularity, quant.Tensor)


def _one_dim(dims: tuple[int, ...], q: Quantizer, what: str) -> None:
    if not dims:
        raise ValueError(
            f"Quantizer(format={q.format.name}, granularity={q.granularity!r}) needs a {what} dim "
            "in every product it quantizes an operand of; this product has none; allowed there: "
            "granularity=Tensor()"
        )


def _check_tiles(q: Quantizer | None, ndim: int, axes: Axes) -> None:
    """2-D blocks tile the last two axes: the product must contract one of them."""
    if q is not None and isinstance(q.granularity, quant.Block) and not {ndim - 2, ndim - 1} & set(axes.contract):
        raise ValueError(
            f"Quantizer.granularity={q.granularity!r} tiles the last two axes of an operand of rank "
            f"{ndim}, but a product contracts its dims {axes.contract}; allowed: 2-D blocks on "
            "operands whose every product contracts one of their last two axes (a weight)"
        )


def _placement(
    config: DotQuantConfig, q: Quantizer | None, ndim: int, axes: Axes
) -> tuple[Quantizer | None, tuple[int, ...] | None]:
    """``(quantizer, flatten)``: ``q`` on one product's axes, or ``q`` itself and the contracted dims to flatten
    first (``_quantize`` places it on the axis they flatten into)."""
    if q is None or config.placement == "quantizer" or _per_tensor(q):
        return q, None
    if isinstance(q.granularity, quant.Block):
        _check_tiles(q, ndim, axes)
        return q, None
    if isinstance(q.granularity, quant.Channel):  # no free dim: its contraction (as OpCall.axes)
        _one_dim(axes.free + axes.contract, q, "free or contracted")
        return _on_axis(q, (axes.free or axes.contract)[-1]), None
    _one_dim(axes.contract, q, "contracted")  # blocks of a block format, or groups
    if len(axes.contract) == 1:
        return _on_axis(q, axes.contract[0]), None
    return q, axes.contract


def _on_flattened(
    fn: Callable[[jax.Array, int], jax.Array], x: jax.Array, dims: tuple[int, ...], *, in_place: bool = True
) -> jax.Array:
    """``fn(y, axis)`` on ``x`` with ``dims`` flattened (in that order) into ``y``'s ``axis``, then undone.

    Dims that are adjacent and in order merge where they lie (a reshape: a
    weight gradient's batch and tokens) unless ``in_place`` is false; others are
    moved last first, a transposing copy that costs XLA:CPU several times the
    reduction or transform it feeds.
    """
    d, n = dims[0], len(dims)
    if in_place and dims == tuple(range(d, d + n)):
        return fn(x.reshape(*x.shape[:d], -1, *x.shape[d + n :]), d).reshape(x.shape)
    perm = [i for i in range(x.ndim) if i not in dims] + list(dims)
    moved = jnp.transpose(x, perm)
    y = fn(moved.reshape(*moved.shape[: x.ndim - n], -1), -1)
    return jnp.transpose(y.reshape(moved.shape), _argsort(perm))


def _quantize(
    config: DotQuantConfig,
    q: Quantizer | None,
    x: jax.Array,
    axes: Axes,
    key: jax.Array,
    scale: jax.Array | None = None,
) -> jax.Array:
    """``x`` fake-quantized by ``q`` as the product in which ``x`` plays ``axes`` needs it.

    Several contracted dims are flattened into one axis for the blocks, in the
    product's pairing order (``_on_flattened``); both ways give the same values.
    Stochastic rounding moves them last, since its random words follow the
    layout they are drawn in, and so does a given ``scale``, laid out for it.
    """
    placed, flatten = _placement(config, q, x.ndim, axes)
    if flatten is None:
        return _fq(placed, x, key, scale)
    assert placed is not None  # only a quantizer flattens
    in_place = placed.rounding != "stochastic" and scale is None
    return _on_flattened(lambda y, axis: _fq(_on_axis(placed, axis), y, key, scale), x, flatten, in_place=in_place)


def _rotates(config: DotQuantConfig, product: str) -> bool:
    """Whether ``product`` (``fwd``, ``dlhs`` or ``drhs``) rotates its operands."""
    return config.rht is not None and product in config.rht.products


def _rotate(config: DotQuantConfig, product: str, x: jax.Array, axes: Axes, key: jax.Array) -> jax.Array:
    """``x`` rotated by ``config.rht`` along its contraction in ``product`` (flattened), or ``x`` itself.

    A contraction whose length is not a multiple of the block keeps its last,
    partial block as it is (an identity block: the transform stays orthogonal
    and still cancels); hardware needs whole blocks, small test shapes do not.
    """
    if config.rht is None or not _rotates(config, product):
        return x
    block = config.rht.block

    def rotate(y: jax.Array, axis: int) -> jax.Array:  # the contraction flattened into y's axis
        n = y.shape[axis]
        whole = n - n % block
        if whole == n:
            return rht(y, axis, key, block)
        if not whole:
            return y
        head, tail = lax.slice_in_dim(y, 0, whole, axis=axis), lax.slice_in_dim(y, whole, n, axis=axis)
        return jnp.concatenate([rht(head, axis, key, block), tail], axis=axis)

    return _on_flattened(rotate, x, axes.contract)


def _exact_reuse(q: Quantizer) -> bool:
    """Whether ``q``'s forward copy is what any other product would compute from the raw operand.

    Per-tensor scales have no axis, 2-D blocks lie along both of a weight's
    axes, and a learned step belongs to the forward (the backward has no other).
    """
    return _per_tensor(q) or isinstance(q.granularity, quant.Block) or isinstance(q.scale, quant.Learned)


# The backward product that takes each forward operand again.
_BWD_PRODUCT = {"lhs": "drhs", "rhs": "dlhs"}


def _sides(config: DotQuantConfig, side: str) -> tuple[Quantizer | None, Quantizer | None, Quantizer | None]:
    """``(forward quantizer, own backward quantizer, gradient quantizer)`` of the product that takes ``side`` again."""
    if side == "lhs":
        return config.lhs, config.drhs_lhs, config.drhs_grad
    return config.rhs, config.dlhs_rhs, config.dlhs_grad


def _reuses(config: DotQuantConfig, side: str) -> bool:
    """Whether the backward product that takes operand ``side`` again reads the forward's quantized copy."""
    fwd, own, grad = _sides(config, side)
    # A rotated forward's copy lies in the rotated basis: no backward product can read it.
    if own is not None or not config.reuse_fwd or _rotates(config, "fwd"):
        return False
    # A float product (no gradient quantizer) takes the forward's copy: the exact derivative of the forward.
    if fwd is None or grad is None:
        return True
    # A rotated product quantizes the rotated operand, which the forward's copy is not.
    return not _rotates(config, _BWD_PRODUCT[side]) and (config.placement == "quantizer" or _exact_reuse(fwd))


def _bwd_operand(
    config: DotQuantConfig, side: str, x: jax.Array, axes: Axes, key: jax.Array, rht_key: jax.Array
) -> jax.Array:
    """Operand ``side`` as its backward product sees it (``x``: the residual the forward saved for it).

    The rotation (where that product has one) comes first: on the raw operand
    before its quantizer, or on the forward's copy where that product takes it
    unquantized.
    """
    fwd, own, _ = _sides(config, side)
    x = _rotate(config, _BWD_PRODUCT[side], x, axes, rht_key)
    if _reuses(config, side):
        return x
    return _quantize(config, own if own is not None else fwd if config.reuse_fwd else None, x, axes, key)


def _qprod_fwd(
    product: Product,
    config: DotQuantConfig,
    real: bool,
    lhs: jax.Array,
    rhs: jax.Array,
    key: jax.Array,
    gs: jax.Array,
    scales: Scales,
    hists: Hists,
) -> tuple[jax.Array, Residuals]:
    # One split for the forward's and the backward's sites (a hash, not Threefry: see split_key).
    k_lhs, k_rhs, k1, k2, k3, k4, r_fwd, r_dlhs, r_drhs = _split(config, key)
    roles = product.roles(lhs.ndim, rhs.ndim)
    # The forward's operands as its quantizers see them (rotated where it rotates); residuals stay raw.
    lhs_f = _rotate(config, "fwd", lhs, roles["lhs"], r_fwd)
    rhs_f = _rotate(config, "fwd", rhs, roles["rhs"], r_fwd)
    s_lhs, h_lhs = _delayed_operand(config.lhs, lhs_f, hists[0], scales[0])
    s_rhs, h_rhs = _delayed_operand(config.rhs, rhs_f, hists[1], scales[1])
    scales = (s_lhs, s_rhs)
    lhs_q: jax.Array | _Narrow
    rhs_q: jax.Array | _Narrow
    if real:  # real_ok quantizers are per tensor or per channel: no dims to flatten
        assert isinstance(product, _Dot)  # quantized_conv is never real
        q_lhs = _placement(config, config.lhs, lhs.ndim, roles["lhs"])[0]
        q_rhs = _placement(config, config.rhs, rhs.ndim, roles["rhs"])[0]
        assert q_lhs is not None and q_rhs is not None  # uses_real_matmul: both real_ok
        out, lhs_q, rhs_q = _real_dot(product, q_lhs, q_rhs, lhs_f, rhs_f, k_lhs, k_rhs, scales)
    else:
        # Where the kernel computes the product, these copies only feed residuals (XLA drops them if unread).
        lhs_q = _quantize(config, config.lhs, lhs_f, roles["lhs"], k_lhs, scales[0])
        rhs_q = _quantize(config, config.rhs, rhs_f, roles["rhs"], k_rhs, scales[1])
        if isinstance(product, _Dot) and uses_block_kernel(config, lhs.shape, product.dn):
            out = _block_kernel(product, lhs_f, rhs_f)
        else:
            out = product(lhs_q, rhs_q)
    for side, x, role in (("lhs", lhs, "drhs_lhs"), ("rhs", rhs, "dlhs_rhs")):
        if config.placement == "gemm" and _reuses(config, side):  # a reused 2-D copy must suit that product too
            _check_tiles(getattr(config, side), x.ndim, roles[role])
    # Only what the backward pass reads is saved: the quantized operand where reused, else the raw one.
    res_lhs = lhs_q if _reuses(config, "lhs") else lhs
    res_rhs = rhs_q if _reuses(config, "rhs") else rhs
    return out, (res_lhs, res_rhs, (k1, k2, k3, k4, r_dlhs, r_drhs), gs, (h_lhs, h_rhs, hists[2]))


def _qprod_bwd(
    product: Product, config: DotQuantConfig, real: bool, res: Residuals, g: jax.Array
) -> tuple[jax.Array, jax.Array, None, jax.Array, tuple[None, None], Hists]:
    lhs, rhs = (r.value() if isinstance(r, _Narrow) else r for r in res[:2])
    (k1, k2, k3, k4, r_dlhs, r_drhs), gs, (h_lhs, h_rhs, h_grad) = res[2:]
    roles = product.roles(lhs.ndim, rhs.ndim)
    ax_l, ax_r = roles["dlhs_grad"], roles["drhs_grad"]
    # g as each product's quantizer sees it (rotated where that product rotates); statistics read g itself.
    g_l, g_r = _rotate(config, "dlhs", g, ax_l, r_dlhs), _rotate(config, "drhs", g, ax_r, r_drhs)
    new_gs = gs
    if h_grad is not None:  # delayed gradient scaling: one history for g, each quantizer its own reduction
        q_amax = config.dlhs_grad if _delayed(config.dlhs_grad) else config.drhs_grad
        assert q_amax is not None  # h_grad: a gradient quantizer is delayed
        current = delayed.amax(q_amax, g)
        g_dlhs, g_drhs = (
            _quantize(config, q, gp, ax, k, scale=delayed.step(q, h_grad) if _delayed(q) else None)
            for q, gp, ax, k in ((config.dlhs_grad, g_l, ax_l, k1), (config.drhs_grad, g_r, ax_r, k2))
        )
        h_grad = delayed.update(h_grad, current)
    elif config.grad_scale:
        assert config.dlhs_grad is not None  # DotQuantConfig: grad_scale needs both gradient quantizers
        new_gs = gradscale_update(gs, jnp.max(jnp.abs(g)), config.dlhs_grad.format.max_value)
        inv = (1.0 / new_gs).astype(jnp.float32)  # s is a power of two: exact
        g_dlhs = _quantize(config, config.dlhs_grad, g_l, ax_l, k1, scale=inv)
        g_drhs = _quantize(config, config.drhs_grad, g_r, ax_r, k2, scale=inv * 2.0 if config.tpr else inv)
    else:
        g_dlhs = _quantize(config, config.dlhs_grad, g_l, ax_l, k1)
        g_drhs = _quantize(config, config.drhs_grad, g_r, ax_r, k2)
    rhs_b = _bwd_operand(config, "rhs", rhs, roles["dlhs_rhs"], k3, r_dlhs)
    lhs_b = _bwd_operand(config, "lhs", lhs, roles["drhs_lhs"], k4, r_drhs)
    g_dlhs, g_drhs = g_dlhs.astype(g.dtype), g_drhs.astype(g.dtype)
    if config.accumulator is None:  # the product is linear in each operand: its VJP is the transposed product
        _, vjp_l = jax.vjp(lambda a: product(a, rhs_b), lhs_b)
        _, vjp_r = jax.vjp(lambda b: product(lhs_b, b), rhs_b)
        (dlhs,), (drhs,) = vjp_l(g_dlhs), vjp_r(g_drhs)
    else:  # quantized_conv refuses an accumulator: this product is a _Dot
        assert isinstance(product, _Dot)
        dlhs, drhs = product.transposed(g_dlhs, rhs_b, lhs_b, g_drhs)
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None, new_gs, (None, None), (h_lhs, h_rhs, h_grad)


_qprod.defvjp(_qprod_fwd, _qprod_bwd)
